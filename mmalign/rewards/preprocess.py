"""Image preprocessing for vision backbones, in torch, so gradients reach the pixels.

A PIL round-trip (what ``open_clip``'s and ``transformers``' processors do) silently cuts the graph; these
functions reproduce the same resize → centre crop → normalise on tensors with
``torchvision.transforms.v2.functional``, whose size rule is the one open_clip's transforms use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["resize_center_crop", "normalize", "to_model_input"]

_MODES = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
          "nearest": InterpolationMode.NEAREST}


def resize_center_crop(pixels: torch.Tensor, size: int | tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """Resize ``(B,C,H,W)`` so the shorter side matches, then crop the centre to ``size``.

    Antialiased like PIL when shrinking; an image already at ``size`` is returned unchanged.
    """
    if interpolation not in _MODES:
        raise ValueError(f"interpolation: expected one of {sorted(_MODES)}, got {interpolation!r}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if pixels.shape[-2:] == (out_h, out_w):
        return pixels
    mode = _MODES[interpolation]
    if out_h == out_w:
        target = [out_h]  # the shorter side to the target, the longer by torchvision's (truncating) rule
    else:
        h, w = pixels.shape[-2:]
        scale = max(out_h / h, out_w / w)
        target = [max(out_h, int(h * scale)), max(out_w, int(w * scale))]
    pixels = TF.resize(pixels, target, interpolation=mode, antialias=mode != InterpolationMode.NEAREST)
    return TF.center_crop(pixels, [out_h, out_w])


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` for ``(B,C,H,W)``."""
    return TF.normalize(pixels, list(mean), list(std))


def to_model_input(
    pixels: torch.Tensor,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(B,C,H,W)`` images in [0,1] → a vision backbone's input: grey expanded to RGB, resized, normalised."""
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    pixels = resize_center_crop(pixels.to(dtype), size, interpolation)
    return normalize(pixels, mean, std)
