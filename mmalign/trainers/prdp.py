"""PRDP: Proximal Reward Difference Prediction (Deng et al., CVPR 2024) for Stable Diffusion pipelines.

Each epoch samples ``prompts_per_epoch`` prompts × ``samples_per_prompt`` trajectories from π_old (= the
current weights), scores them, then takes ``inner_steps`` passes of gradient steps on the proximal RDP loss
(``mmalign.trainers.prdp_loss``). π_ref is the LoRA-disabled UNet (a frozen copy for full fine-tuning).
This module is the algorithm (config, update); the loop, run folder, checkpoints and report are the shared
``DiffusionLoop``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mmalign.models.rollout import backward_weighted_log_probs, trajectory_log_probs
from mmalign.models.trajectory import Trajectory
from mmalign.trainers.diffusion import DiffusionConfig, DiffusionTrainer
from mmalign.trainers.prdp_loss import pair_indices, rdp_coefficients

__all__ = ["PRDPConfig", "PRDPTrainer"]


class PRDPConfig(DiffusionConfig):
    """PRDP on a Stable Diffusion pipeline."""

    task: Literal["prdp"] = "prdp"
    beta: float = Field(0.1, gt=0, description="KL strength β: the loss fits r̂ to reward differences / β")
    clip_range: float = Field(1.0, gt=0, description="proximal clip ε on per-step implicit rewards (nats)")
    shared_initial_noise: bool = Field(
        True, description="a prompt's samples start from one initial noise, so reward differences are the steps' doing"
    )
    output_dir: str = "runs/prdp"


class PRDPTrainer(DiffusionTrainer):
    """Runs a ``PRDPConfig`` on the shared loop; the algorithm is ``update``."""

    name = "PRDP"
    curve_keys = ("approx_kl", "loss")
    needs_reference = True

    def update(self, trajectory: Trajectory, epoch: int) -> dict[str, float]:
        """``inner_steps`` passes of proximal RDP gradient steps over the epoch's prompt groups."""
        cfg, loop, acc = self.config, self.loop, self.loop.accelerator
        trained = loop.trained_steps.to(trajectory.log_probs.device)
        s_old = (trajectory.log_probs - trajectory.ref_log_probs) * trained
        valid = torch.isfinite(trajectory.rewards).cpu()
        rewards = torch.nan_to_num(trajectory.rewards, nan=0.0, posinf=0.0, neginf=0.0)
        totals = {"loss": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
        updates, pairs, changed = 0, 0, False
        loop.denoiser.train()
        for k in range(cfg.inner_steps):
            for index in loop.minibatches(trajectory, epoch, k):
                part = trajectory.select(index)
                old = s_old[index.to(s_old.device)]
                with acc.autocast():
                    if changed:
                        s = (trajectory_log_probs(loop.adapter, loop.policy, loop.denoiser, part) - part.ref_log_probs) * trained
                    else:  # θ is still θ_old: the sampled log-probs are exact
                        s = old
                    terms = rdp_coefficients(s, old, rewards[index.to(rewards.device)],
                                             pair_indices(part.groups, valid[index]), cfg.beta, cfg.clip_range)
                    terms.coef[:, ~trained.to(terms.coef.device)] = 0  # untrained steps are not back-propagated
                    backward_weighted_log_probs(loop.adapter, loop.policy, loop.denoiser, part, terms.coef, loop.no_sync)
                totals["grad_norm"] += loop.optimizer_step()
                totals["loss"] += terms.loss
                totals["clip_fraction"] += terms.clip_fraction
                updates, pairs, changed = updates + 1, pairs + terms.num_pairs, True
        loop.denoiser.eval()
        with torch.no_grad(), acc.autocast():
            new = trajectory_log_probs(loop.adapter, loop.policy, loop.raw_denoiser, trajectory)
        delta = new - trajectory.log_probs
        metrics = {k: v / max(updates, 1) for k, v in totals.items()}
        metrics["pairs"] = pairs
        # over the trained steps: an untrained low-noise step's log-prob moves by ~1/σ² for any change of the mean
        metrics["approx_kl"] = float(acc.gather(0.5 * delta[:, trained].pow(2).mean(1)).mean())
        metrics["implicit_reward"] = float(acc.gather(((new - trajectory.ref_log_probs) * trained).sum(1)).mean())
        return metrics
