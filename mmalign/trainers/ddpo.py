"""DDPO (Black et al., 2023): PPO on the DDIM-η policy with advantages from per-prompt reward statistics.

Each epoch samples ``prompts_per_epoch`` prompts × ``samples_per_prompt`` trajectories from π_old, scores them,
and normalises each reward by its prompt's running statistics: the last ``buffer_size`` rewards of that prompt
once it has ``min_count`` of them, the epoch's mean and std before (DDPO's ``PerPromptStatTracker``).
Advantages are clipped to ``±adv_clip_max``; the update is the clipped surrogate of ``mmalign.trainers.ppo``
(whose docstring derives the clip range in nats per step).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mmalign.models.trajectory import Trajectory
from mmalign.trainers.diffusion import DiffusionTrainer
from mmalign.trainers.ppo import PPOConfig, ppo_update

__all__ = ["DDPOConfig", "DDPOTrainer", "PromptStats"]


class DDPOConfig(PPOConfig):
    """DDPO on a Stable Diffusion pipeline."""

    task: Literal["ddpo"] = "ddpo"
    buffer_size: int = Field(32, ge=1, description="rewards kept per prompt for its statistics")
    min_count: int = Field(8, ge=2, description="rewards a prompt needs before its own statistics are used")
    output_dir: str = "runs/ddpo"


class PromptStats:
    """Per-prompt reward buffers, keyed by the prompt's index in the prompt set; resumable (``state_dict``)."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[int, torch.Tensor] = {}

    def advantages(self, keys: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float64 ``(r − mean)/(std + 1e-6)`` per prompt after adding this batch (population std); NaN
        rewards are left out of every statistic and get NaN."""
        rewards, keys = rewards.double().cpu(), keys.cpu()
        finite = torch.isfinite(rewards)
        if not finite.any():
            return torch.full_like(rewards, float("nan"))
        epoch_mean, epoch_std = rewards[finite].mean(), rewards[finite].std(unbiased=False)
        out = torch.full_like(rewards, float("nan"))
        for key in keys.unique().tolist():
            rows = (keys == key) & finite
            buffer = torch.cat([self.buffers.get(key, rewards[:0]), rewards[rows]])[-self.buffer_size :]
            self.buffers[key] = buffer
            mean, std = (buffer.mean(), buffer.std(unbiased=False)) if len(buffer) >= self.min_count else (epoch_mean, epoch_std)
            out[rows] = (rewards[rows] - mean) / (std + 1e-6)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(k): v.clone() for k, v in self.buffers.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.buffers = {int(k): v.double() for k, v in state.items()}


class DDPOTrainer(DiffusionTrainer):
    """Runs a ``DDPOConfig`` on the shared loop; the algorithm is ``update``."""

    name = "DDPO"
    curve_keys = ("approx_kl", "clip_fraction")
    needs_reference = False

    def __init__(self, config: DDPOConfig, pipeline=None, progress: bool = True) -> None:
        super().__init__(config, pipeline, progress)
        self.stats = PromptStats(config.buffer_size, config.min_count)
        self.loop.state["prompt_stats"] = self.stats

    def advantages(self, trajectory: Trajectory) -> torch.Tensor:
        """This process's ``(B,)`` clipped advantages, from statistics over every process's samples (all
        processes hold the same buffers)."""
        acc = self.loop.accelerator
        keys = torch.tensor([m["prompt_index"] for m in trajectory.metadata], device=acc.device)
        everyone = self.stats.advantages(acc.gather(keys), acc.gather(trajectory.rewards))
        mine = everyone.view(acc.num_processes, -1)[acc.process_index]
        return mine.clamp(-self.config.adv_clip_max, self.config.adv_clip_max)

    def update(self, trajectory: Trajectory, epoch: int) -> dict[str, float]:
        advantages = self.advantages(trajectory)
        metrics = ppo_update(self.loop, trajectory, epoch, advantages.to(self.loop.accelerator.device),
                             self.config.clip_range, self.config.timestep_fraction)
        metrics.pop("penalty")
        metrics["advantage/abs_mean"] = float(advantages[torch.isfinite(advantages)].abs().mean())
        return metrics
