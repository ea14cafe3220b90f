"""DRAGON's distributional rewards (Bai et al., TMLR): a generated image, or the generated set, against a set of
exemplars, in the unit embedding space of a CLIP-type encoder.

- instance to distribution, ``scope="sample"``: ``exemplar_similarity`` (mean cosine to the exemplars; with text
  exemplars this is DRAGON's cross-modal instance-to-instance reward) and ``exemplar_knn`` (minus the mean
  Euclidean distance of the unit embedding to its ``k`` nearest exemplars);
- distribution to distribution, ``scope="set"``: ``exemplar_fd`` (minus the Fréchet distance of the batch to the
  exemplars) and ``exemplar_kid`` (minus the unbiased MMD² with KID's kernel ``(xᵀy/d + 1)³``);
- ``vendi``: the Vendi score of the batch itself (no exemplars), ``scope="set"``.

A set reward gives every sample the set's score and puts each sample's leave-one-out contribution
``R(S) − R(S ∖ {i})`` in ``components["leave_one_out"]`` (detached): a sample belongs to the positive set when
removing it worsens the set's reward (contribution > 0). All five are differentiable in the pixels; the set
metrics (``mmalign.rewards.set_metrics``) are computed in float64. Exemplars (a folder of images, an image
tensor, or a list of texts) are embedded once; with ``cache_dir`` the embeddings are stored as safetensors under
a key made of the encoder and a hash of the exemplars' content, so a changed exemplar set (or encoder) is
embedded afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmalign.media import IMAGE_SUFFIXES, MediaBatch, open_image
from mmalign.rewards.backbones import Backend, CLIPBackbone, load_backbone
from mmalign.rewards.base import RewardOutput
from mmalign.rewards.clip import CLIPFamilyReward
from mmalign.rewards.set_metrics import (
    GaussianStats,
    frechet_distance,
    gaussian_stats,
    kid,
    kid_within,
    leave_one_out,
    vendi,
)

__all__ = [
    "ExemplarFD",
    "ExemplarKID",
    "ExemplarKNN",
    "ExemplarReward",
    "ExemplarSet",
    "ExemplarSimilarity",
    "VendiScore",
    "exemplar_embeddings",
]


# --------------------------------------------------------------------------------------- exemplars and cache
class ExemplarSet:
    """Exemplars to embed: a folder of images (``str`` or ``Path``; the image files directly in it, sorted by
    name), an image tensor ``(N, C, H, W)`` in [0, 1], or a list of texts."""

    def __init__(self, exemplars: str | Path | torch.Tensor | Sequence[str]) -> None:
        expected = "expected a folder of images, an image tensor (N, C, H, W) in [0, 1] or a list of texts"
        if isinstance(exemplars, torch.Tensor):
            if exemplars.ndim != 4 or exemplars.shape[1] not in (1, 3) or not exemplars.is_floating_point():
                raise ValueError(f"exemplars: {expected}, got a {exemplars.dtype} tensor of shape "
                                 f"{tuple(exemplars.shape)}")
            if len(exemplars) == 0:
                raise ValueError("exemplars: expected at least one exemplar, got an empty tensor")
            if not bool(((exemplars >= 0) & (exemplars <= 1)).all()):
                raise ValueError("exemplars: expected image values in [0, 1] (NaN is not), got values outside")
            self.kind, self.items = "images", exemplars.detach().cpu().expand(-1, 3, -1, -1).contiguous()
        elif isinstance(exemplars, (str, Path)):
            folder = Path(exemplars)
            if not folder.is_dir():
                raise ValueError(f"exemplars: {expected}, got {str(exemplars)!r}, which is not a folder")
            self.kind, self.items = "images", sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.items:
                raise ValueError(f"exemplars: expected images ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}, "
                                 "found none")
        elif isinstance(exemplars, Sequence) and all(isinstance(t, str) for t in exemplars):
            if not exemplars:
                raise ValueError("exemplars: expected at least one exemplar, got an empty list")
            self.kind, self.items = "texts", list(exemplars)
        else:
            raise TypeError(f"exemplars: {expected}, got {type(exemplars).__name__}")

    def __len__(self) -> int:
        return len(self.items)

    def content_hash(self) -> str:
        """sha256 of what the exemplars are: the texts, the tensor's bytes, or each file's name and bytes."""
        digest = hashlib.sha256(self.kind.encode())
        if self.kind == "texts":
            digest.update(json.dumps(self.items).encode())
        elif isinstance(self.items, torch.Tensor):
            digest.update(f"{self.items.dtype}{tuple(self.items.shape)}".encode())
            digest.update(self.items.view(torch.uint8).numpy().tobytes())
        else:
            for path in self.items:
                data = path.read_bytes()
                digest.update(f"{path.name}\0{len(data)}\0".encode())
                digest.update(data)
        return digest.hexdigest()

    def _image_runs(self, batch_size: int):
        """Chunks of at most ``batch_size`` images, each of one size, in order."""
        for start in range(0, len(self.items), batch_size):
            chunk = self.items[start : start + batch_size]
            if isinstance(chunk, torch.Tensor):
                yield chunk
                continue
            images = [torch.from_numpy(np.array(open_image(p))).permute(2, 0, 1).float() / 255 for p in chunk]
            for _, run in groupby(images, key=lambda im: im.shape):
                yield torch.stack(list(run))

    @torch.no_grad()
    def embed(self, backbone: CLIPBackbone, batch_size: int = 32) -> torch.Tensor:
        """``(N, D)`` unit embeddings through ``backbone``'s image or text tower, on the CPU."""
        if self.kind == "texts":
            chunks = (backbone.encode_text(self.items[s : s + batch_size]) for s in range(0, len(self), batch_size))
        else:
            chunks = (backbone.encode_image(pixels) for pixels in self._image_runs(batch_size))
        return torch.cat([c.cpu() for c in chunks])


def exemplar_embeddings(
    exemplars: ExemplarSet, backbone: CLIPBackbone, encoder: str, cache_dir: str | Path | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """``exemplars.embed(backbone)``, loaded from ``cache_dir`` when it holds them: the file
    ``exemplars-<sha256 of encoder and content>.safetensors`` (key ``embeddings``), written atomically."""
    if cache_dir is None:
        return exemplars.embed(backbone, batch_size)
    content = exemplars.content_hash()
    key = hashlib.sha256(f"{encoder}\n{content}".encode()).hexdigest()
    path = Path(cache_dir) / f"exemplars-{key}.safetensors"
    if path.is_file():
        return load_file(path)["embeddings"]
    embeddings = exemplars.embed(backbone, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary per process, not mmalign.files.write_atomic's one name: every rank of a launch may embed the
    # same exemplars at once, and each must replace the file whole, whoever is last
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        save_file({"embeddings": embeddings.contiguous()}, partial,
                  metadata={"encoder": encoder, "content": content, "kind": exemplars.kind})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return embeddings


def _encoder_key(backend: str, dtype: str | torch.dtype, *locations: str | None) -> str:
    """The encoder's identity in a cache key: its load settings, local paths made absolute (so a model folder
    whose weights are replaced under the same path needs its cache files deleted)."""
    located = [str(Path(s).resolve()) if s is not None and Path(s).exists() else str(s) for s in locations]
    return json.dumps([backend, str(dtype), *located])


# --------------------------------------------------------------------------------------------------- rewards
class _ImageEmbeddingReward(CLIPFamilyReward):
    """A CLIP backbone and the float64 unit embeddings of a batch of images (videos are refused)."""

    #: the fewest samples a batch may have
    min_batch = 1

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = "openai", backend: Backend = "open_clip",
                 processor: str | None = None, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 gradient_checkpointing: bool = False) -> None:
        super().__init__(load_backbone(backend, model, pretrained, processor, device, dtype, gradient_checkpointing))

    def image_embeddings(self, batch: MediaBatch) -> torch.Tensor:
        if batch.is_video:
            raise ValueError(f"batch: {self.name} scores images (B, C, H, W), got a video batch of shape "
                             f"{tuple(batch.pixels.shape)}; score its frames as images")
        if len(batch) < self.min_batch:
            raise ValueError(f"batch: {self.name} expected at least {self.min_batch} images (the set less one "
                             f"sample must still have a value), got {len(batch)}")
        return self.backbone.encode_image(batch.pixels).double()

    def set_output(self, value: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> RewardOutput:
        """Every sample gets the set's score ``value(x)``; ``leave_one_out`` holds each one's contribution."""
        return RewardOutput(value(x).float().repeat(len(x)), {"leave_one_out": leave_one_out(value, x).float()})


class VendiScore(_ImageEmbeddingReward):
    """Vendi score of the batch's unit image embeddings: the effective number of distinct images, 1 … B.

    ``scope="set"``: every sample gets the batch's score, ``components["leave_one_out"]`` each one's contribution.
    """

    name = "vendi"
    scope = "set"
    min_batch = 2

    def forward(self, batch: MediaBatch) -> RewardOutput:
        return self.set_output(vendi, self.image_embeddings(batch))


class ExemplarReward(_ImageEmbeddingReward):
    """Base of the rewards that compare images with an exemplar set (buffer ``exemplars``: ``(N, D)`` float64
    unit embeddings); subclasses derive what they need of the set once, in ``prepare``."""

    #: the fewest exemplars the reward needs
    min_exemplars = 1

    def __init__(self, exemplars: str | Path | torch.Tensor | Sequence[str], cache_dir: str | Path | None = None,
                 batch_size: int = 32, model: str = "ViT-B-32", pretrained: str | None = "openai",
                 backend: Backend = "open_clip", processor: str | None = None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32", gradient_checkpointing: bool = False) -> None:
        super().__init__(model, pretrained, backend, processor, device, dtype, gradient_checkpointing)
        exemplar_set = ExemplarSet(exemplars)
        if len(exemplar_set) < self.min_exemplars:
            raise ValueError(f"exemplars: {self.name} expected at least {self.min_exemplars} exemplars, "
                             f"got {len(exemplar_set)}")
        encoder = _encoder_key(backend, dtype, model, pretrained, processor)
        embeddings = exemplar_embeddings(exemplar_set, self.backbone, encoder, cache_dir, batch_size)
        self.exemplar_kind = exemplar_set.kind
        self.register_buffer("exemplars", F.normalize(embeddings.double(), dim=-1).to(self.backbone.device),
                             persistent=False)
        self.prepare()

    def prepare(self) -> None:
        """Register buffers derived from ``self.exemplars``; nothing by default."""


class ExemplarSimilarity(ExemplarReward):
    """Mean cosine of each image to the exemplars (``x · mean(e)``); text exemplars make it cross-modal."""

    name = "exemplar_similarity"

    def forward(self, batch: MediaBatch) -> RewardOutput:
        return RewardOutput((self.image_embeddings(batch) @ self.exemplars.mean(0)).float())


class ExemplarKNN(ExemplarReward):
    """Minus the mean Euclidean distance of each unit image embedding to its ``k`` nearest exemplars (0 … −2).

    The distance ``sqrt(2 − 2·cos)`` is floored at 1e-6, so a sample on an exemplar has a finite (zero) gradient.
    """

    name = "exemplar_knn"

    def __init__(self, exemplars: str | Path | torch.Tensor | Sequence[str], k: int = 1,
                 cache_dir: str | Path | None = None, batch_size: int = 32, model: str = "ViT-B-32",
                 pretrained: str | None = "openai", backend: Backend = "open_clip", processor: str | None = None,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 gradient_checkpointing: bool = False) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        super().__init__(exemplars, cache_dir, batch_size, model, pretrained, backend, processor, device, dtype,
                         gradient_checkpointing)
        if k > len(self.exemplars):
            raise ValueError(f"k: expected at most the number of exemplars ({len(self.exemplars)}), got {k}")
        self.k = k

    def forward(self, batch: MediaBatch) -> RewardOutput:
        distance = (2 - 2 * self.image_embeddings(batch) @ self.exemplars.T).clamp_min(1e-12).sqrt()
        return RewardOutput(-distance.topk(self.k, dim=1, largest=False).values.mean(1).float())


class _ExemplarSetReward(ExemplarReward):
    """A distribution-to-distribution reward: ``value`` of the batch's embeddings against the exemplars'.

    ``scope="set"``: every sample gets the batch's score, ``components["leave_one_out"]`` each one's contribution.
    """

    scope = "set"
    min_batch = 3
    min_exemplars = 2

    def value(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: MediaBatch) -> RewardOutput:
        return self.set_output(self.value, self.image_embeddings(batch))


class ExemplarFD(_ExemplarSetReward):
    """Minus the Fréchet distance of the batch's image embeddings to the exemplars' (``frechet_distance``)."""

    name = "exemplar_fd"

    def prepare(self) -> None:
        for field, value in gaussian_stats(self.exemplars)._asdict().items():
            self.register_buffer(f"exemplar_{field}", value, persistent=False)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        stats = GaussianStats(self.exemplar_mean, self.exemplar_sqrt_cov, self.exemplar_trace)
        return -frechet_distance(x, stats)


class ExemplarKID(_ExemplarSetReward):
    """Minus the kernel (inception) distance, the unbiased MMD² of the batch and the exemplars (``kid``)."""

    name = "exemplar_kid"

    def prepare(self) -> None:
        self.register_buffer("exemplar_within", kid_within(self.exemplars), persistent=False)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return -kid(x, self.exemplars, self.exemplar_within)
