"""GRPO for diffusion (Flow-GRPO, DanceGRPO) on the DDIM-η policy.

Each epoch samples ``samples_per_prompt`` trajectories (a group) for each of ``prompts_per_epoch`` prompts,
optionally from one shared initial noise per group, and normalises rewards within the group:
``A = (r − mean_g)/(std_g + 1e-4)`` (population std of the group, or of the whole batch with
``std_scope: batch``), clipped to ``±adv_clip_max``. The update is the clipped surrogate of
``mmalign.trainers.ppo`` on a random ``timestep_fraction`` of the trained steps of each sample, plus, with
``beta > 0``, the exact per-step KL to the reference ``β·‖μ_θ − μ_ref‖²/(2σ_t²)`` (two Gaussians of equal std;
in nats, summed over latent dimensions like the log-probs). A group whose rewards are all equal has zero
advantages and teaches nothing: ``zero_spread_groups`` counts them.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mmalign.models.ddim import StepOutput
from mmalign.models.trajectory import Trajectory
from mmalign.trainers.diffusion import DiffusionTrainer
from mmalign.trainers.ppo import PPOConfig, ppo_update

__all__ = ["GRPOConfig", "GRPOTrainer", "group_advantages"]


class GRPOConfig(PPOConfig):
    """GRPO on a Stable Diffusion pipeline's DDIM-η policy."""

    task: Literal["diffusion_grpo"] = "diffusion_grpo"
    std_scope: Literal["group", "batch"] = Field("group", description="std of the group's rewards or the batch's")
    beta: float = Field(0.0, ge=0, description="KL to the reference per step, β·‖μ_θ − μ_ref‖²/(2σ²) (0: off)")
    timestep_fraction: float = Field(0.6, gt=0, le=1, description="random fraction of the trained steps each "
                                     "sample trains, drawn per sample and pass")
    shared_initial_noise: bool = Field(True, description="a group's samples start from one initial noise")
    output_dir: str = "runs/diffusion-grpo"


def group_advantages(rewards: torch.Tensor, group_size: int, batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` ``(r − mean_g)/(std + 1e-4)`` over consecutive groups of ``group_size``; NaN rewards are left out
    of their group's statistics and get NaN. ``batch_std`` replaces the groups' own std."""
    r = rewards.double().view(-1, group_size)
    finite = torch.isfinite(r)
    count = finite.sum(1, keepdim=True).clamp(min=1)
    mean = torch.where(finite, r, 0).sum(1, keepdim=True) / count
    std = (torch.where(finite, r - mean, 0).pow(2).sum(1, keepdim=True) / count).sqrt()
    if batch_std is not None:
        std = batch_std.double().expand_as(std)
    return ((r - mean) / (std + 1e-4)).view(-1)


class GRPOTrainer(DiffusionTrainer):
    """Runs a ``GRPOConfig`` on the shared loop; the algorithm is ``update``."""

    name = "GRPO"
    curve_keys = ("approx_kl", "clip_fraction")
    needs_reference = False

    def advantages(self, trajectory: Trajectory) -> torch.Tensor:
        """This process's clipped group advantages (groups never straddle processes)."""
        cfg, acc = self.config, self.loop.accelerator
        batch_std = None
        if cfg.std_scope == "batch":
            everyone = acc.gather(trajectory.rewards)
            batch_std = everyone[torch.isfinite(everyone)].double().std(unbiased=False)
        advantages = group_advantages(trajectory.rewards, cfg.samples_per_prompt, batch_std)
        return advantages.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)

    def kl_to_reference(self, index: int, rows: torch.Tensor, step: StepOutput, part: Trajectory) -> torch.Tensor:
        """``(n,)`` β·‖μ_θ − μ_ref‖²/(2σ²) of step ``index`` for ``rows`` of ``part`` (π_ref without gradients)."""
        loop = self.loop
        chosen = part.select(rows)
        x = chosen.latents[:, index]
        with torch.no_grad(), loop.reference() as ref:
            out = loop.adapter.model_output(ref, x, chosen.timesteps[index], chosen.embeds)
            ref_mean = loop.policy.step(out, x, index, prev_sample=chosen.latents[:, index + 1]).mean
        return self.config.beta * (step.mean - ref_mean).pow(2).flatten(1).sum(1) / (2 * step.std**2)

    def update(self, trajectory: Trajectory, epoch: int) -> dict[str, float]:
        cfg = self.config
        advantages = self.advantages(trajectory)
        penalty = self.kl_to_reference if cfg.beta > 0 else None
        metrics = ppo_update(self.loop, trajectory, epoch, advantages, cfg.clip_range, cfg.timestep_fraction, penalty)
        metrics["kl"] = metrics.pop("penalty") / cfg.beta if cfg.beta > 0 else float("nan")
        metrics["advantage/abs_mean"] = float(advantages[torch.isfinite(advantages)].abs().mean())
        return metrics
