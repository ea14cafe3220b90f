"""Anti-aliased renders of scenes: each pixel is the mean of 4 x 4 samples at the centres of its sub-pixels,
each sample taking the colour of the shape it falls in (the last drawn on top), so that a pixel holds the
mix of object and background colour it covers.

Jitter (0 to 1) shifts each object by up to ``MAX_SHIFT`` of the canvas, scales it by up to ``MAX_SCALE``
and moves every colour by up to ``COLOUR_JITTER`` per channel: the variation a gold verifier must tolerate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

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


def _inside(
    obj: SceneObject, u: np.ndarray, v: np.ndarray, jitter: float, rng: np.random.Generator
) -> np.ndarray:
    """Which sample points ``(u, v)`` (fractions of the canvas) fall in ``obj``, shifted and scaled by jitter."""
    shift = rng.uniform(-1, 1, size=2) * MAX_SHIFT * jitter if jitter else np.zeros(2)
    scale = 1 + rng.uniform(-1, 1) * MAX_SCALE * jitter if jitter else 1.0
    x, y, half = obj.x + shift[0], obj.y + shift[1], obj.scale * scale / 2
    if obj.shape == "circle":
        return (u - x) ** 2 + (v - y) ** 2 <= half**2
    if obj.shape == "square":
        return (np.abs(u - x) <= half) & (np.abs(v - y) <= half)
    # apex up, base as wide as the triangle is tall; (x, y) is the centre of mass
    top, bottom = y - 4 * half / 3, y + 2 * half / 3
    return (v <= bottom) & (np.abs(u - x) <= (v - top) / 2)


def _coverage(mask: np.ndarray) -> np.ndarray:
    """Fraction of each pixel's samples set in a supersampled ``mask`` (sums of strided slices: fast)."""
    k = SUPERSAMPLE
    rows = sum(mask[i::k].astype(np.float32) for i in range(k))
    return sum(rows[:, j::k] for j in range(k)) / k**2


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
    centres = (np.arange(size * SUPERSAMPLE) + 0.5) / (size * SUPERSAMPLE)
    u, v = centres[None, :], centres[:, None]
    on_top = np.zeros(
        (size * SUPERSAMPLE, size * SUPERSAMPLE), dtype=np.int8
    )  # 0: background, i + 1: object i
    for i, obj in enumerate(scene.objects):
        on_top[_inside(obj, u, v, jitter, rng)] = i + 1
    background = np.asarray(_colour(BACKGROUNDS[scene.background], jitter, rng), dtype=np.float32)
    pixels = np.empty((3, size, size), dtype=np.float32)
    pixels[:] = background[:, None, None]
    for i, obj in enumerate(scene.objects):
        coverage = _coverage(on_top == i + 1)
        colour = np.asarray(_colour(COLOURS[obj.colour], jitter, rng), dtype=np.float32)
        pixels += coverage[None] * (colour - background)[:, None, None]
    return torch.from_numpy(pixels / 255.0).clamp_(0, 1)


def render_batch(scenes: Sequence[Scene], size: int = 32, jitter: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``(B, 3, size, size)`` renders of ``scenes``, the jitter drawn from one generator seeded by ``seed``."""
    if not len(scenes):
        raise ValueError("scenes: expected at least one Scene, got none")
    rng = np.random.default_rng(seed)
    return torch.stack([render(s, size, jitter, rng) for s in scenes])
