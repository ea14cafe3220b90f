"""Trajectory records: what a rollout produces and every diffusion RL algorithm consumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from mmalign.media import MediaBatch
from mmalign.models.stable_diffusion import PromptEmbeds

__all__ = ["Trajectory"]


@dataclass
class Trajectory:
    """A batch of denoising trajectories ``x_T … x_0`` sampled from ``π_old``.

    Attributes:
        latents: ``(B, T+1, C, h, w)`` fp32 (video families: ``(B, T+1, C, F, h, w)``), ``latents[:, 0]`` the
            initial noise, ``latents[:, -1]`` x_0.
        timesteps: ``(T,)`` the scheduler timesteps of the steps.
        log_probs: ``(B, T)`` fp64 log-probs of each step under the sampling policy (summed over dims).
        embeds: text conditioning, ``(B, L, D)`` each.
        prompts, metadata: per sample; ``metadata[i]["group"]`` is the index of the sample's prompt group.
        pixels: ``(B, 3, H, W)`` decoded images in [0, 1], or ``(B, F, 3, H, W)`` videos.
        rewards: ``(B,)`` scores (NaN where the reward failed), with their components.
        ref_log_probs: ``(B, T)`` fp64 log-probs under the reference policy, when an algorithm needs them.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    embeds: PromptEmbeds
    prompts: list[str]
    metadata: list[dict[str, Any]]
    pixels: torch.Tensor
    rewards: torch.Tensor | None = None
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)
    ref_log_probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def groups(self) -> torch.Tensor:
        """``(B,)`` prompt-group index of each sample."""
        return torch.tensor([m["group"] for m in self.metadata])

    def media(self) -> MediaBatch:
        return MediaBatch(self.pixels, self.prompts, self.metadata)

    def select(self, index: Sequence[int] | torch.Tensor) -> Trajectory:
        """The trajectories at ``index`` (per-sample fields sliced, shared fields kept)."""
        ids = torch.as_tensor(index, dtype=torch.long)
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "timesteps" or value is None:
                picked[f.name] = value
            elif isinstance(value, torch.Tensor):
                picked[f.name] = value[ids.to(value.device)]
            elif isinstance(value, PromptEmbeds):
                picked[f.name] = value[ids.to(value.cond.device)]
            elif isinstance(value, dict):
                picked[f.name] = {k: v[ids.to(v.device)] for k, v in value.items()}
            else:
                picked[f.name] = [value[i] for i in ids.tolist()]
        return Trajectory(**picked)
