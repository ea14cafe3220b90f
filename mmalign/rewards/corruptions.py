"""Artifacts that image generators produce, applied to clean images: the negatives that artifact rewards and
their benchmarks are tested on (any images, not only the world's).

Each corruption takes ``strength`` in [0, 1] (0 leaves the image as it is, 1 is the strongest) and keeps
values in [0, 1]. Randomised kinds (noise blotches, duplicated fragments) draw from ``seed``, so the same
call gives the same image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["CORRUPTIONS", "corrupt"]


def _grid(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Lines every few pixels, the tiling seams of patch-based decoders."""
    h, w = images.shape[-2:]
    period = max(3, h // 8)
    lines = (torch.arange(h) % period == 0)[:, None] | (torch.arange(w) % period == 0)[None, :]
    towards = torch.where(images.mean(-3, keepdim=True) < 0.5, 1.0, 0.0)  # lines stand out on any colour
    return torch.lerp(images, towards.expand_as(images), 0.6 * strength * lines.float())


def _checkerboard(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Alternating brighter and darker pixels, the mark of strided transposed convolutions."""
    h, w = images.shape[-2:]
    signs = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2) * 2.0 - 1.0
    return (images + 0.3 * strength * signs).clamp(0, 1)


def _overexposure(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness pushed up until colours clip to white."""
    return (images * (1 + 2 * strength) + 0.3 * strength).clamp(0, 1)


def _oversaturation(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Colours pushed away from grey until channels clip (the look of a too-high guidance scale)."""
    grey = images.mean(-3, keepdim=True)
    return (grey + (images - grey) * (1 + 4 * strength)).clamp(0, 1)


def _noise_blotches(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Smooth coloured stains where denoising left low-frequency noise."""
    b, c, h, w = images.shape
    coarse = (max(2, h // 8), max(2, w // 8))
    colour = F.interpolate(torch.rand((b, c, *coarse), generator=generator), (h, w), mode="bilinear")
    field = F.interpolate(torch.randn((b, 1, *coarse), generator=generator), (h, w), mode="bilinear")
    mask = torch.sigmoid(4 * (field - 0.5))  # blotches cover part of the image
    return torch.lerp(images, colour, strength * mask)


def _banding(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Too few colour levels: smooth shading (here a faint ramp across the image) turns into bands."""
    h, w = images.shape[-2:]
    ramp = torch.linspace(-0.5, 0.5, h)[:, None].expand(h, w) * 0.2 * strength
    levels = 2 + round(14 * (1 - strength))
    return (((images + ramp).clamp(0, 1) * (levels - 1)).round() / (levels - 1)).clamp(0, 1)


def _move(start: int, positions: int, size: int, generator: torch.Generator) -> int:
    """A new start among ``positions``, at least half a fragment away from ``start`` (wrapping around)."""
    least = min(size // 2, positions // 2)
    return (start + int(torch.randint(least, positions - least + 1, (), generator=generator))) % positions


def _duplicate(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """A fragment of an object repeated elsewhere, the way generators duplicate parts of objects.

    The fragment is centred on a pixel drawn with weight its distance from the border colour, so it holds
    part of an object rather than plain background.
    """
    b, _, h, w = images.shape
    ph, pw = max(2, int(h * (0.25 + 0.15 * strength))), max(2, int(w * (0.25 + 0.15 * strength)))
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    distance = (images - border.median(-1).values[..., None, None]).norm(dim=1).flatten(1) + 1e-6
    centres = torch.multinomial(distance, 1, generator=generator)[:, 0]
    out = images.clone()
    for i in range(b):
        sy = min(max(int(centres[i]) // w - ph // 2, 0), h - ph)
        sx = min(max(int(centres[i]) % w - pw // 2, 0), w - pw)
        ty, tx = _move(sy, h - ph + 1, ph, generator), _move(sx, w - pw + 1, pw, generator)
        target = out[i, :, ty : ty + ph, tx : tx + pw]
        target.copy_(torch.lerp(target, images[i, :, sy : sy + ph, sx : sx + pw], strength))
    return out


_KINDS: dict[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]] = {
    "grid": _grid,
    "checkerboard": _checkerboard,
    "overexposure": _overexposure,
    "oversaturation": _oversaturation,
    "noise_blotches": _noise_blotches,
    "banding": _banding,
    "duplicate": _duplicate,
}
CORRUPTIONS: tuple[str, ...] = tuple(_KINDS)


def corrupt(image: torch.Tensor, kind: str, strength: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``image`` (``(3, H, W)`` or ``(B, 3, H, W)``, float in [0, 1]) with the artifact ``kind`` applied."""
    if kind not in _KINDS:
        raise ValueError(f"kind: expected one of {', '.join(CORRUPTIONS)}, got {kind!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength: expected a float in [0, 1], got {strength!r}")
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or image.shape[-3] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a (3, H, W) or (B, 3, H, W) tensor, got {got}")
    if strength == 0:
        return image.clone()
    batch = image if image.ndim == 4 else image[None]
    generator = torch.Generator().manual_seed(seed)
    out = _KINDS[kind](batch.detach().float().cpu(), float(strength), generator)
    out = out.clamp(0, 1).to(device=image.device, dtype=image.dtype)
    return out if image.ndim == 4 else out[0]
