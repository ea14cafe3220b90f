"""CLIPScore on any OpenCLIP model: ``max(scale · cos(image, text), 0)`` (Hessel et al., 2021)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from mmalign.media import MediaBatch
from mmalign.rewards.base import Reward, RewardOutput
from mmalign.rewards.preprocess import to_model_input

__all__ = ["CLIPScore", "load_open_clip", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``"float32"``, ``"bfloat16"`` …) or itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_open_clip(model: str, pretrained: str | None, device: str | torch.device = "cpu"):
    """An OpenCLIP model and its tokenizer from a built-in name + tag/checkpoint, ``hf-hub:``, or a folder.

    A plain folder path is read as ``local-dir:`` (``open_clip_config.json`` + weights), the layout in which
    OpenCLIP models are published, so the same call serves the hub, a local copy and the shipped world proxy.
    """
    import open_clip

    if Path(model).is_dir():
        model = f"local-dir:{Path(model).resolve()}"
    if model.startswith(("local-dir:", "hf-hub:")):
        pretrained = None
    elif pretrained and not Path(pretrained).is_file() and pretrained not in open_clip.list_pretrained_tags_by_model(model):
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ValueError(f"pretrained: expected a checkpoint file or one of {tags} for {model!r}, got {pretrained!r}")
    clip_model = open_clip.create_model(model, pretrained=pretrained, device=device)
    return clip_model, open_clip.get_tokenizer(model)


class CLIPScore(Reward):
    """CLIPScore ``max(scale·cos, 0)`` of image and prompt embeddings from an OpenCLIP model.

    Args:
        model: OpenCLIP architecture name (with ``pretrained``), ``hf-hub:org/repo``, or a local folder.
        pretrained: a tag of ``open_clip.list_pretrained()`` or a checkpoint file; ignored for folders/hub ids.
        scale: multiplier of the cosine (100 as in torchmetrics; Hessel et al. use 2.5 with w=1).
        clamp: apply ``max(·, 0)``; turn off inside optimisation loops to keep gradients for negative cosines.
        gradient_checkpointing: recompute the backbone in the backward pass to save memory.
    Videos are scored per frame and averaged.
    """

    name = "clip"
    scope = "sample"
    differentiable = True

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        scale: float = 100.0,
        clamp: bool = True,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
        text_cache_size: int = 4096,
    ) -> None:
        super().__init__()
        from open_clip import get_model_preprocess_cfg

        self.dtype = resolve_dtype(dtype)
        self._work_dtype = torch.promote_types(self.dtype, torch.float32)  # cosines never in half precision
        self.model, self.tokenizer = load_open_clip(model, pretrained, device)
        self.model.to(dtype=self.dtype)
        if gradient_checkpointing:
            self.model.set_grad_checkpointing(True)
        cfg = get_model_preprocess_cfg(self.model)
        self.image_size = cfg["size"]
        self.mean, self.std = cfg["mean"], cfg["std"]
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.scale, self.clamp = float(scale), bool(clamp)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        self.freeze()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``(B, D)`` unit text embeddings; each distinct prompt is encoded once and cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            with torch.no_grad():
                tokens = self.tokenizer(missing).to(self.device)
                embeddings = F.normalize(self.model.encode_text(tokens).to(self._work_dtype), dim=-1)
            for prompt, embedding in zip(missing, embeddings):
                self._text_cache[prompt] = embedding
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        out = torch.stack([self._text_cache[p] for p in prompts])
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return out

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` unit image embeddings of ``(B,C,H,W)`` pixels in [0,1], differentiable in the pixels."""
        inputs = to_model_input(
            pixels.to(self.device), self.image_size, self.mean, self.std, self.interpolation, self.dtype
        )
        return F.normalize(self.model.encode_image(inputs).to(self._work_dtype), dim=-1)

    def forward(self, batch: MediaBatch) -> RewardOutput:
        frames = batch.pixels.flatten(0, 1) if batch.is_video else batch.pixels
        per_sample = frames.shape[0] // len(batch)
        image = self.encode_image(frames).view(len(batch), per_sample, -1)
        text = self.encode_text(batch.prompts).to(image.device)
        cosine = (image * text[:, None]).sum(-1).mean(1)
        scores = self.scale * cosine.float()
        if self.clamp:
            scores = scores.clamp_min(0.0)
        return RewardOutput(scores, {"cosine": cosine.float()})
