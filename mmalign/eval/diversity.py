"""Diversity of a generator's samples, per prompt: the samples of one prompt form a set.

Two metrics read image embeddings (unit-normalised, from any encoder ``(B, 3, H, W) in [0, 1] -> (B, D)``, by
default the image tower of a CLIP-family reward, see ``image_encoder``):

- ``diversity/vendi``: the Vendi score ``exp(-Σ λᵢ log λᵢ)``, λ the eigenvalues of ``K / n`` with ``K`` the
  cosine-similarity kernel of the set's ``n`` embeddings (Friedman & Dieng, 2023): the effective number of
  distinct samples, 1 when all are identical, ``n`` when they are orthogonal.
- ``diversity/pairwise_distance``: mean ``1 - cos`` over the pairs ``i < j`` (NaN for a set of one).

Four read the pixels of all the set's samples together (videos: all frames):

- ``diversity/color_entropy``: entropy in bits of the joint RGB histogram, 8 bins per channel (0 for one
  colour, 1 for two colours in equal parts, at most 9 bits).
- ``diversity/brightness``: mean luma, Rec. 601 (``0.299 R + 0.587 G + 0.114 B``).
- ``diversity/saturation``: mean HSV saturation ``(max - min) / max`` (0 where ``max = 0``).
- ``diversity/overexposed``: fraction of pixels with every channel above 0.95 (blown-out, near-white).

The last three are not diversity in themselves; they are the usual signs of the collapse that comes with reward
hacking (washed-out, over-saturated or over-exposed images), reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mmalign.media import MediaBatch
from mmalign.rewards.set_metrics import vendi

__all__ = [
    "EMBEDDING_METRICS",
    "Encoder",
    "PIXEL_METRICS",
    "brightness",
    "color_entropy",
    "diversity_scores",
    "embed",
    "group_ids",
    "image_encoder",
    "overexposed_fraction",
    "pairwise_distance",
    "saturation",
    "vendi_score",
]

#: ``(B, 3, H, W)`` pixels in [0, 1] → ``(B, D)`` embeddings
Encoder = Callable[[torch.Tensor], torch.Tensor]
EMBEDDING_METRICS = ("diversity/vendi", "diversity/pairwise_distance")
PIXEL_METRICS = ("diversity/color_entropy", "diversity/brightness", "diversity/saturation", "diversity/overexposed")
#: a pixel is over-exposed when every channel exceeds this
OVEREXPOSED_LEVEL = 0.95
_LUMA = (0.299, 0.587, 0.114)


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"embeddings: expected (n, D) with n >= 1, got shape {tuple(embeddings.shape)}")
    return F.normalize(embeddings.detach().double(), dim=-1)


def vendi_score(embeddings: torch.Tensor) -> float:
    """``exp(-Σ λ log λ)`` over the eigenvalues of ``K / n``, ``K`` the cosine kernel of ``(n, D)`` embeddings
    (normalised here), in float64; tiny negative eigenvalues are clamped to 0 and ``0 · log 0 = 0``
    (``mmalign.rewards.set_metrics.vendi``, which the ``vendi`` reward uses too)."""
    return float(vendi(_unit(embeddings)))


def pairwise_distance(embeddings: torch.Tensor) -> float:
    """Mean cosine distance ``1 - cos`` over the pairs ``i < j`` of ``(n, D)`` embeddings; NaN when ``n = 1``."""
    x = _unit(embeddings)
    n = len(x)
    if n < 2:
        return math.nan
    i, j = torch.triu_indices(n, n, offset=1)
    return float((1 - (x[i] * x[j]).sum(-1)).mean())


def _rgb(pixels: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` float64 from images or videos, grey expanded to RGB."""
    if pixels.ndim == 5:
        pixels = pixels.flatten(0, 1)
    if pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
        raise ValueError(f"pixels: expected (N, 1 or 3, H, W) or (N, T, 1 or 3, H, W), got {tuple(pixels.shape)}")
    return pixels.detach().double().expand(-1, 3, -1, -1)


def color_entropy(pixels: torch.Tensor, bins: int = 8) -> float:
    """Entropy in bits of the joint RGB histogram (``bins`` per channel) over every pixel of ``pixels``."""
    x = _rgb(pixels)
    q = (x * bins).long().clamp(0, bins - 1)
    codes = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    p = torch.bincount(codes.flatten(), minlength=bins**3).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum()) + 0.0  # + 0.0: no -0.0 for one colour


def brightness(pixels: torch.Tensor) -> float:
    """Mean Rec. 601 luma ``0.299 R + 0.587 G + 0.114 B`` over every pixel."""
    x = _rgb(pixels)
    return float(sum(w * x[:, c] for c, w in enumerate(_LUMA)).mean())


def saturation(pixels: torch.Tensor) -> float:
    """Mean HSV saturation ``(max - min) / max`` over every pixel (0 for black)."""
    x = _rgb(pixels)
    high, low = x.amax(1), x.amin(1)
    return float(torch.where(high > 0, (high - low) / high.clamp_min(1e-12), 0.0).mean())


def overexposed_fraction(pixels: torch.Tensor, level: float = OVEREXPOSED_LEVEL) -> float:
    """Fraction of pixels whose every channel exceeds ``level``."""
    return float((_rgb(pixels) > level).all(1).double().mean())


def image_encoder(reward: torch.nn.Module) -> Encoder:
    """The image encoder of a reward: a CLIP-family reward's ``backbone.encode_image``; for a composite
    (``WeightedSum``, ``Ensemble``, ``UncertaintyWeighted``) that of its first member that has one.

    Raises ``ValueError`` naming the reward when none has an image encoder.
    """
    found = _find_encoder(reward)
    if found is None:
        name = getattr(reward, "name", type(reward).__name__)
        raise ValueError(
            f"reward {name!r} ({type(reward).__name__}) has no image encoder (a CLIP-family reward's "
            "backbone.encode_image); pass a CLIP-type reward or an encoder for the diversity embeddings"
        )
    return found


def _find_encoder(reward) -> Encoder | None:
    encode = getattr(getattr(reward, "backbone", None), "encode_image", None)
    if callable(encode):
        return encode
    members = list(getattr(reward, "members", None) or [])
    inner = getattr(reward, "reward", None)
    if isinstance(inner, torch.nn.Module):
        members.append(inner)
    for member in members:
        found = _find_encoder(member)
        if found is not None:
            return found
    return None


@torch.no_grad()
def embed(pixels: torch.Tensor, encoder: Encoder, batch_size: int = 32) -> torch.Tensor:
    """``(B, D)`` float64 unit embeddings on the CPU, in chunks of ``batch_size``; a video's is the normalised
    mean of its frames'."""
    frames = pixels.shape[1] if pixels.ndim == 5 else 1
    flat = pixels.flatten(0, 1) if pixels.ndim == 5 else pixels
    if flat.shape[1] == 1:
        flat = flat.expand(-1, 3, -1, -1)
    out = torch.cat([encoder(flat[s : s + batch_size]).detach().double().cpu() for s in range(0, len(flat), batch_size)])
    return F.normalize(F.normalize(out, dim=-1).view(len(pixels), frames, -1).mean(1), dim=-1)


def group_ids(batch: MediaBatch) -> torch.Tensor:
    """``(B,)`` the ``metadata["group"]`` of each sample (``evaluate_generator`` sets it per prompt)."""
    try:
        return torch.tensor([int(meta["group"]) for meta in batch.metadata])
    except KeyError:
        raise ValueError("batch: every sample's metadata needs a 'group' (its prompt's index)") from None


def diversity_scores(
    pixels: torch.Tensor | MediaBatch,
    groups: Sequence[int] | torch.Tensor | None = None,
    encoder: Encoder | None = None,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Per group (prompt): every metric of the module docstring, as ``{key: (G,) float64}`` in the order of the
    sorted group ids (``groups.unique()``); the embedding metrics only when ``encoder`` is given.

    ``pixels`` is ``(B, C, H, W)`` / ``(B, T, C, H, W)`` in [0, 1] or a ``MediaBatch``, whose
    ``metadata["group"]`` gives the groups when ``groups`` is None.
    """
    if isinstance(pixels, MediaBatch):
        groups = group_ids(pixels) if groups is None else groups
        pixels = pixels.pixels
    if groups is None:
        raise ValueError("groups: expected one group id per sample, got None")
    groups = torch.as_tensor(groups).cpu()
    if groups.shape != (len(pixels),):
        raise ValueError(f"groups: expected ({len(pixels)},) ids, one per sample, got shape {tuple(groups.shape)}")
    embeddings = embed(pixels, encoder, batch_size) if encoder is not None else None
    columns: dict[str, list[float]] = {k: [] for k in (EMBEDDING_METRICS if encoder is not None else ()) + PIXEL_METRICS}
    for g in groups.unique():
        index = (groups == g).nonzero().squeeze(1)
        if embeddings is not None:
            columns["diversity/vendi"].append(vendi_score(embeddings[index]))
            columns["diversity/pairwise_distance"].append(pairwise_distance(embeddings[index]))
        images = pixels[index.to(pixels.device)]
        columns["diversity/color_entropy"].append(color_entropy(images))
        columns["diversity/brightness"].append(brightness(images))
        columns["diversity/saturation"].append(saturation(images))
        columns["diversity/overexposed"].append(overexposed_fraction(images))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in columns.items()}
