"""What the text-to-video adapters share: the frame count and size of their samples, checked against the VAE's
factors, and the frame-wise view of video latents.

Inside a video adapter latents are ``(B, C, F, h, w)``, as the diffusers video pipelines hold them; decoded pixels
come out as ``(B, T, C, H, W)`` in [0, 1], the layout of a video ``MediaBatch`` and of the video rewards. The
policies (DDIM-η, the flow SDE) are elementwise and sum their log-probs over every non-batch dimension, so they
run on 5-D latents unchanged.

A video adapter may start its samples from *travelling noise* instead of independent noise per frame: one draw
per sample, seen through a window that moves in the direction the sample's metadata states. Every frame's noise
is still standard normal, but frames share it, shifted as the caption's motion; a denoiser that draws each frame
from its own noise then draws frames that agree and move as told (the figures are in
``docs/studies/video-motion.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["MOTION_DIRECTIONS", "VIDEO_OPTIONS", "TravellingNoise", "checked_noise_speed", "checked_video_size",
           "frames_as_batch", "stated_directions", "travelling_noise"]

#: the adapter options of a video family (``DiffusionConfig.video``): the size of its samples and the speed of
#: travelling initial noise
VIDEO_OPTIONS = ("num_frames", "height", "width", "noise_speed")
#: the directions a sample's ``metadata["motion"]["direction"]`` may state, as ``(dx, dy)`` steps (y down)
MOTION_DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def checked_video_size(num_frames, height, width, spatial: int, temporal: int = 1) -> tuple[int, int, int]:
    """``(num_frames, height, width)`` after checking each is a positive int, the sizes multiples of ``spatial``
    (the VAE's factor times the patch size) and ``num_frames − 1`` a multiple of ``temporal`` (a causal video VAE's
    factor: the first frame is encoded alone)."""
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    for name, value in (("height", height), ("width", width)):
        if value % spatial:
            raise ValueError(f"{name}: expected a multiple of {spatial} (the VAE's spatial factor × the patch size), "
                             f"got {value}")
    if (num_frames - 1) % temporal:
        raise ValueError(f"num_frames: expected 1 + a multiple of {temporal} (the VAE's temporal factor), "
                         f"got {num_frames}")
    return num_frames, height, width


def checked_noise_speed(noise_speed) -> float | None:
    """``noise_speed`` (latent pixels per frame of travelling initial noise; None: independent noise per frame)
    after checking it is None or a number ≥ 0."""
    if noise_speed is None:
        return None
    if isinstance(noise_speed, bool) or not isinstance(noise_speed, (int, float)) or not noise_speed >= 0:
        raise ValueError(f"noise_speed: expected None or latent pixels per frame, a number >= 0, got {noise_speed!r}")
    return float(noise_speed)


def frames_as_batch(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, h, w)`` → ``(B·F, C, h, w)``: each frame's latent, video by video (what an image VAE decodes)."""
    return latents.transpose(1, 2).flatten(0, 1)


def stated_directions(metadata: Sequence[dict[str, Any]] | None, name: str = "metadata") -> list[tuple[int, int]]:
    """The ``(dx, dy)`` step of each sample's ``metadata["motion"]["direction"]`` (as world clip prompts carry it)."""
    if metadata is None or isinstance(metadata, dict):
        raise ValueError(f"{name}: travelling noise needs each sample's metadata with its motion direction, "
                         f"got {metadata!r}")
    steps = []
    for i, meta in enumerate(metadata):
        motion = meta.get("motion") if isinstance(meta, dict) else None
        direction = motion.get("direction") if isinstance(motion, dict) else None
        if direction not in MOTION_DIRECTIONS:
            raise ValueError(f"{name}[{i}]: travelling noise needs motion.direction in {sorted(MOTION_DIRECTIONS)}, "
                             f"got {meta!r}")
        steps.append(MOTION_DIRECTIONS[direction])
    return steps


def travelling_noise(directions: Sequence[tuple[int, int]], latent_shape: Sequence[int],
                     generator: torch.Generator | None = None, speed: float = 0.5) -> torch.Tensor:
    """``(B, C, F, h, w)`` noise in which frame ``f`` of sample ``b`` is one Gaussian field of that sample seen
    through an ``h × w`` window moved ``⌊f · speed + ½⌋`` latent pixels against ``directions[b]``, so the
    pattern moves along it.

    The field is drawn ``K`` pixels larger each way (``K`` the last frame's shift), so what enters the window is
    fresh noise, never the far edge wrapped around. Drawn on ``generator``'s device (CPU without one).
    """
    if not len(directions):
        raise ValueError(f"directions: expected one (dx, dy) per sample, got {directions!r}")
    if len(latent_shape) != 4:
        raise ValueError(f"latent_shape: expected (C, F, h, w), got {tuple(latent_shape)!r}")
    if checked_noise_speed(speed) is None:
        raise ValueError("speed: expected latent pixels per frame, a number >= 0, got None")
    channels, frames, height, width = latent_shape
    shifts = [int(f * speed + 0.5) for f in range(frames)]
    margin = shifts[-1]
    device = generator.device if generator is not None else "cpu"
    fields = torch.randn((len(directions), channels, height + margin, width + margin), generator=generator,
                         device=device)
    clips = []
    for field, (dx, dy) in zip(fields, directions):
        y0, x0 = margin * max(dy, 0), margin * max(dx, 0)
        windows = [field[:, y0 - dy * k : y0 - dy * k + height, x0 - dx * k : x0 - dx * k + width] for k in shifts]
        clips.append(torch.stack(windows, 1))
    return torch.stack(clips)


class TravellingNoise:
    """What the video adapters add to ``GeneratorAdapter.initial_noise``: with ``noise_speed`` set, samples start
    from ``travelling_noise`` along each one's ``metadata["motion"]["direction"]`` (the policy's step noise stays
    independent)."""

    noise_speed: float | None = None

    def initial_noise(self, metadata: Sequence[dict[str, Any]], generator: torch.Generator | None = None
                      ) -> torch.Tensor:
        if self.noise_speed is None:
            return super().initial_noise(metadata, generator)
        noise = travelling_noise(stated_directions(metadata), self.latent_shape, generator, self.noise_speed)
        return noise.to(self.device)
