"""Video rewards (VBench-style) on ``(B, T, C, H, W)`` batches.

- ``frame_aggregate``: any sample-scope image reward applied to every frame (one batched call over the B·T
  frames) and reduced over time (``mean``, ``min``, ``max``, ``first``, ``last``); differentiable when the
  inner reward is.
- ``temporal_consistency``: subject consistency, the mean over frames ``t ≥ 1`` of
  ``½ (cos(e_t, e_{t−1}) + cos(e_t, e_0))`` of a CLIP-type encoder's unit frame embeddings.
- ``flicker``: minus the mean absolute difference of consecutive frames (VBench's temporal flickering).
- ``motion_smoothness``: minus the mean absolute deviation of each inner frame from the midpoint of its
  neighbours (half the second difference), on Gaussian-blurred frames.

Why blurred: on sharp frames, the second difference of a moving edge is the sum of its two first differences
whatever the speeds, so it cannot tell constant from jittered motion. Blurred wider than a frame's step, the
image is locally linear in the position, and the midpoint deviation measures the acceleration.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from mmalign.media import MediaBatch
from mmalign.rewards.backbones import Backend, load_backbone
from mmalign.rewards.base import Reward, RewardOutput
from mmalign.rewards.clip import CLIPFamilyReward, frame_embeddings
from mmalign.rewards.ensemble import RewardLike, as_reward

__all__ = ["FrameAggregate", "Flicker", "MotionSmoothness", "TemporalConsistency", "video_pixels"]

How = Literal["mean", "min", "max", "first", "last"]
HOWS: tuple[str, ...] = ("mean", "min", "max", "first", "last")


def video_pixels(batch: MediaBatch, name: str, min_frames: int = 1) -> torch.Tensor:
    """``(B, T, C, H, W)`` pixels of a video batch with at least ``min_frames`` frames; otherwise a
    ``ValueError`` naming the reward ``name``."""
    shape = tuple(batch.pixels.shape)
    if not batch.is_video:
        raise ValueError(f"batch.pixels: {name} scores videos (B, T, C, H, W), got an image batch {shape}")
    if batch.frames_per_sample < min_frames:
        raise ValueError(f"batch.pixels: {name} needs at least {min_frames} frames per video, got T = "
                         f"{batch.frames_per_sample} in {shape}")
    return batch.pixels


def _reduce(values: torch.Tensor, how: str) -> torch.Tensor:
    """``(B,)`` of ``(B, T)`` values reduced over time."""
    if how == "mean":
        return values.mean(1)
    if how in ("min", "max"):
        return values.amin(1) if how == "min" else values.amax(1)
    return values[:, 0] if how == "first" else values[:, -1]


class FrameAggregate(Reward):
    """An image reward on every frame of a video, reduced over time by ``how`` (mean, min, max, first, last).

    ``reward`` is a Reward or a registry spec (a name or ``{"name": ..., **options}``) of sample scope. The
    frames of all videos go to it as one image batch, each with its video's prompt, metadata and completion.
    Components: the inner reward's components reduced the same way; ``info`` is the inner reward's.
    """

    name = "frame_aggregate"

    def __init__(self, reward: RewardLike, how: How = "mean") -> None:
        super().__init__()
        if how not in HOWS:
            raise ValueError(f"how: expected one of {', '.join(HOWS)}, got {how!r}")
        self.reward = as_reward(reward)
        if self.reward.scope != "sample":
            raise ValueError(f"reward: frame_aggregate scores each frame as a sample, so it needs a reward of "
                             f"scope 'sample', got {self.reward.name} of scope {self.reward.scope!r}")
        self.how = how
        self.differentiable = self.reward.differentiable

    def forward(self, batch: MediaBatch) -> RewardOutput:
        pixels = video_pixels(batch, self.name)
        b, t = pixels.shape[:2]

        def each(values):
            return None if values is None else [v for v in values for _ in range(t)]

        frames = MediaBatch(pixels.flatten(0, 1), each(batch.prompts), each(batch.metadata), each(batch.completions))
        out = self.reward(frames)
        scores = _reduce(out.scores.view(b, t), self.how)
        components = {k: _reduce(v.view(b, t), self.how) for k, v in out.components.items()}
        return RewardOutput(scores, components, info=dict(out.info))

    def extra_repr(self) -> str:
        return f"how={self.how!r}, scope={self.scope!r}, differentiable={self.differentiable}"


class TemporalConsistency(CLIPFamilyReward):
    """Subject consistency (VBench): the mean over frames ``t ≥ 1`` of ``½ (cos(e_t, e_{t−1}) + cos(e_t, e_0))``
    of unit frame embeddings from a CLIP-type encoder; in [−1, 1], 1 for a still video.

    Options are the CLIP family's (``model``, ``pretrained``, ``backend``, ``processor``, ``device``, ``dtype``,
    ``gradient_checkpointing``). Components: ``previous`` and ``first``, the two means alone. Needs T ≥ 2.
    """

    name = "temporal_consistency"

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        backend: Backend = "open_clip",
        processor: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(load_backbone(backend, model, pretrained, processor, device, dtype, gradient_checkpointing))

    def forward(self, batch: MediaBatch) -> RewardOutput:
        video_pixels(batch, self.name, min_frames=2)
        e = frame_embeddings(self.backbone, batch)  # (B, T, D), unit, at least float32
        previous = (e[:, 1:] * e[:, :-1]).sum(-1).mean(1)
        first = (e[:, 1:] * e[:, :1]).sum(-1).mean(1)
        return RewardOutput(((previous + first) / 2).float(), {"previous": previous.float(), "first": first.float()})


class Flicker(Reward):
    """Minus the mean absolute difference of consecutive frames, over pixels and channels (VBench's temporal
    flickering as a reward): 0 for a still video, down to −1. Component ``mean_abs_diff`` (the difference
    itself) and ``max_abs_diff`` (of the worst pair of frames). Needs T ≥ 2."""

    name = "flicker"
    differentiable = True

    def forward(self, batch: MediaBatch) -> RewardOutput:
        x = video_pixels(batch, self.name, min_frames=2)
        diff = (x[:, 1:] - x[:, :-1]).abs().flatten(2).mean(2).float()  # (B, T - 1)
        mean = diff.mean(1)
        return RewardOutput(-mean, {"mean_abs_diff": mean, "max_abs_diff": diff.amax(1)})


class MotionSmoothness(Reward):
    """Minus the mean absolute deviation of each inner frame from the midpoint of its two neighbours
    ``|x_t − ½ (x_{t−1} + x_{t+1})|`` on frames blurred by a Gaussian of standard deviation ``blur`` (a fraction
    of the frame's shorter side; 0: no blur): 0 for constant-speed motion of a smooth image, lower as motion
    jerks. A still video scores 0 too; pair it with a motion reward. Component ``deviation``. Needs T ≥ 3."""

    name = "motion_smoothness"
    differentiable = True

    def __init__(self, blur: float = 0.1) -> None:
        super().__init__()
        if isinstance(blur, bool) or not isinstance(blur, (int, float)) or not 0 <= blur <= 0.5:
            raise ValueError(f"blur: expected a fraction of the frame's shorter side in [0, 0.5], got {blur!r}")
        self.blur = float(blur)

    def smoothed(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames`` (``(..., H, W)``) blurred by the Gaussian (reflected edges), differentiably."""
        from torchvision.transforms.functional import gaussian_blur

        h, w = frames.shape[-2:]
        sigma = self.blur * min(h, w)
        if sigma == 0:
            return frames
        radius = min(math.ceil(3 * sigma), min(h, w) - 1)  # reflection needs a radius below the side
        flat = frames.reshape(-1, 1, h, w)
        return gaussian_blur(flat, [2 * radius + 1] * 2, [sigma] * 2).view(frames.shape)

    def forward(self, batch: MediaBatch) -> RewardOutput:
        x = self.smoothed(video_pixels(batch, self.name, min_frames=3))
        deviation = (x[:, 1:-1] - (x[:, :-2] + x[:, 2:]) / 2).abs().flatten(2).mean(2).mean(1).float()
        return RewardOutput(-deviation, {"deviation": deviation})

    def extra_repr(self) -> str:
        return f"blur={self.blur:g}"
