"""Image preprocessing for vision backbones, in torch, so gradients reach the pixels.

A PIL round-trip (what ``open_clip``'s and ``transformers``' processors do) silently cuts the graph; these
functions reproduce the same resize → centre crop → normalise on tensors instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["resize_center_crop", "normalize", "to_model_input"]

_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


def resize_center_crop(pixels: torch.Tensor, size: int | tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """Resize ``(B,C,H,W)`` so the shorter side matches, then crop the centre to ``size``.

    Antialiased like PIL when shrinking; an image already at ``size`` is returned unchanged.
    """
    if interpolation not in _MODES:
        raise ValueError(f"interpolation: expected one of {sorted(_MODES)}, got {interpolation!r}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    h, w = pixels.shape[-2:]
    if (h, w) != (out_h, out_w):
        # torchvision's rule (what open_clip's transforms use): the longer side is truncated, not rounded
        scale = max(out_h / h, out_w / w)
        new_h, new_w = max(out_h, int(h * scale)), max(out_w, int(w * scale))
        if (new_h, new_w) != (h, w):
            mode = _MODES[interpolation]
            pixels = F.interpolate(
                pixels, size=(new_h, new_w), mode=mode, antialias=mode != "nearest",
                **({} if mode == "nearest" else {"align_corners": False}),
            )
        top, left = round((pixels.shape[-2] - out_h) / 2), round((pixels.shape[-1] - out_w) / 2)
        pixels = pixels[..., top : top + out_h, left : left + out_w]
    return pixels


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` for ``(B,C,H,W)``."""
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean_t) / std_t


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
