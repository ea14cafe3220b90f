"""Anti-aliased renders of scenes: drawn with PIL at 4x the size, then box-filtered down, so that each
pixel holds the exact mix of object and background colour it covers (up to a quarter pixel).

Jitter (0 to 1) shifts each object by up to ``MAX_SHIFT`` of the canvas, scales it by up to ``MAX_SCALE``
and moves every colour by up to ``COLOUR_JITTER`` per channel: the variation a gold verifier must tolerate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmalign.world.scenes import BACKGROUNDS, COLOURS, MAX_SCALE, MAX_SHIFT, Scene, SceneObject, make_rng

__all__ = ["COLOUR_JITTER", "SUPERSAMPLE", "render", "render_batch"]

SUPERSAMPLE = 4
#: Largest colour change per RGB channel at ``jitter=1``, in 0-255 units.
COLOUR_JITTER = 12.0


def _colour(rgb: tuple[int, int, int], jitter: float, rng: np.random.Generator) -> tuple[int, int, int]:
    if jitter == 0:
        return rgb
    shifted = np.asarray(rgb, dtype=float) + rng.uniform(-1, 1, size=3) * COLOUR_JITTER * jitter
    return tuple(int(v) for v in np.clip(np.round(shifted), 0, 255))


def _draw(
    draw: ImageDraw.ImageDraw, obj: SceneObject, side: int, jitter: float, rng: np.random.Generator
) -> None:
    """Draw ``obj`` on a canvas of ``side`` pixels (the supersampled one)."""
    shift = rng.uniform(-1, 1, size=2) * MAX_SHIFT * jitter if jitter else np.zeros(2)
    scale = 1 + rng.uniform(-1, 1) * MAX_SCALE * jitter if jitter else 1.0
    x, y, s = (obj.x + shift[0]) * side, (obj.y + shift[1]) * side, obj.scale * scale * side
    fill = _colour(COLOURS[obj.colour], jitter, rng)
    if obj.shape == "circle":
        draw.ellipse([x - s / 2, y - s / 2, x + s / 2, y + s / 2], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x - s / 2, y - s / 2, x + s / 2, y + s / 2], fill=fill)
    else:  # apex up, base as wide as the triangle is tall; (x, y) is the centre of mass
        top, bottom = y - 2 * s / 3, y + s / 3
        draw.polygon([(x, top), (x + s / 2, bottom), (x - s / 2, bottom)], fill=fill)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size: expected an int of at least 8 pixels, got {size!r}")


def _check_jitter(jitter: float) -> None:
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter: expected a float in [0, 1], got {jitter!r}")


def render(
    scene: Scene, size: int = 32, jitter: float = 0.0, rng: int | np.random.Generator | None = None
) -> torch.Tensor:
    """``(3, size, size)`` float image in [0, 1] of ``scene``; ``rng`` (a seed or Generator) drives the jitter."""
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a Scene, got {type(scene).__name__}")
    _check_size(size)
    _check_jitter(jitter)
    rng = make_rng(rng)
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), _colour(BACKGROUNDS[scene.background], jitter, rng))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, side, jitter, rng)
    pixels = np.asarray(image.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def render_batch(scenes: Sequence[Scene], size: int = 32, jitter: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``(B, 3, size, size)`` renders of ``scenes``, the jitter drawn from one generator seeded by ``seed``."""
    if not len(scenes):
        raise ValueError("scenes: expected at least one Scene, got none")
    rng = np.random.default_rng(seed)
    return torch.stack([render(s, size, jitter, rng) for s in scenes])
