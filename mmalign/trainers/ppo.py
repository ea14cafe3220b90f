"""The clipped policy-gradient update on per-step likelihood ratios, shared by DDPO and diffusion GRPO.

For a trained step t of sample b with advantage A_b, ``ρ = exp(log π_θ − log π_old)`` and the loss term is
``max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))``, averaged over the (sample, step) pairs trained in a minibatch. Each step's
term depends on the network only through that step's log-prob, so it is back-propagated one timestep at a time
(``backward_per_step``): memory of one UNet graph whatever the number of steps.

Units. Log-probs are sums over latent dimensions (``mmalign.models.ddim``), so ρ is the true likelihood ratio
of a step and ε means what it means in PPO. A change δ of a step's mean gives
``log ρ ≈ N(−u²/2, u²)`` with ``u = ‖δ‖/σ_t`` over all D dimensions: ε bounds the mean's move at ``u ≈ ε``
standard deviations, a per-step KL of ``ε²/2`` nats. DDPO's code averages over dimensions, so its ε = 1e-4
clips ``Σ log ρ`` at ``±D·1e-4`` nats: 0.31 for the world's 12×16×16 latents, 1.6 for SD's 4×64×64. That
threshold moves with the resolution; the default here (ε = 0.2, u ≈ 0.2, 0.02 nats per step) does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pydantic import Field

from mmalign.models.ddim import StepOutput
from mmalign.models.rollout import backward_per_step
from mmalign.models.trajectory import Trajectory
from mmalign.trainers.diffusion import DiffusionConfig, DiffusionLoop, assert_ratio_is_one

__all__ = ["PPOConfig", "clipped_surrogate", "ppo_update", "timestep_mask"]

class PPOConfig(DiffusionConfig):
    """The fields of every algorithm on ``ppo_update`` (DDPO, diffusion GRPO)."""

    clip_range: float = Field(0.2, gt=0, lt=1, description="PPO clip ε on the per-step likelihood ratio "
                              "(log-probs summed over latent dims: see mmalign.trainers.ppo)")
    adv_clip_max: float = Field(5.0, gt=0, description="advantages are clipped to ±this")
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="random fraction of the trained steps each "
                                     "sample trains, drawn per sample and pass")


#: the seeded-generator purpose of the timestep subsets (the loop's own purposes are 0 and 1 + pass)
_TIMESTEP_PURPOSE = 1000
#: re-scoring a minibatch (a batch shape other than the rollout's) moves fp32 sums by rounding: 4e-5 nats on a
#: 256-dimension step of about −250 nats (1.6e-7 relative) on the tiny world; a real mismatch is far larger
_RESCORE_RTOL = 1e-5


def clipped_surrogate(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B,)`` PPO loss terms ``max(−A·ρ, −A·clip(ρ, 1±ε))`` and whether each was clipped (``|ρ − 1| > ε``)."""
    ratio = torch.exp(log_prob - old_log_prob.to(log_prob))
    advantages = advantages.to(log_prob)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    return loss, (ratio.detach() - 1).abs() > clip_range


def timestep_mask(n: int, trained: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """``(n, T)`` the steps each sample trains: a random ``fraction`` of the trained steps (at least one), drawn
    per sample, as DanceGRPO and DDPO's ``timestep_fraction`` do."""
    steps = trained.nonzero().squeeze(1)
    keep = max(1, math.ceil(fraction * len(steps)))
    mask = torch.zeros(n, len(trained), dtype=torch.bool)
    for b in range(n):
        mask[b, steps[torch.randperm(len(steps), generator=generator)[:keep]]] = True
    return mask


def ppo_update(
    loop: DiffusionLoop,
    trajectory: Trajectory,
    epoch: int,
    advantages: torch.Tensor,
    clip_range: float,
    timestep_fraction: float = 1.0,
    penalty: Callable[[int, torch.Tensor, StepOutput, Trajectory], torch.Tensor] | None = None,
) -> dict[str, float]:
    """``inner_steps`` passes of clipped policy-gradient steps over the epoch's samples.

    ``advantages`` ``(B,)`` are NaN where a reward failed (those samples are not trained). ``penalty(t, rows,
    step, part)`` adds a per-sample term (e.g. GRPO's KL to the reference) to the loss of step t. Before the
    first optimiser step of an epoch θ = θ_old: the re-scored log-probs must match the sampled ones (the rollout
    checks bit-for-bit equality on its own batch) and the first minibatch's ratio is exactly 1.
    Logged: loss, clip fraction, approx KL ``½·mean(Δ log π²)`` over the trained pairs, the penalty's mean.
    """
    cfg, acc = loop.config, loop.accelerator
    valid = torch.isfinite(advantages).cpu()
    advantages = torch.nan_to_num(advantages, nan=0.0)
    totals = {"loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0, "penalty": 0.0, "pairs": 0}
    grad_norms, first = [], True
    loop.denoiser.train()
    for k in range(cfg.inner_steps):
        generator = loop.run.generator(epoch, _TIMESTEP_PURPOSE + k)
        for index in loop.minibatches(trajectory, epoch, k):
            part = trajectory.select(index)
            mask = timestep_mask(len(index), loop.trained_steps, timestep_fraction, generator) & valid[index][:, None]
            count = max(int(mask.sum()), 1)
            adv = advantages[index.to(advantages.device)]

            def loss(t: int, rows: torch.Tensor, step: StepOutput, part=part, adv=adv, count=count, check=first):
                old = part.log_probs[rows.to(part.log_probs.device), t].to(step.log_prob)
                log_prob = step.log_prob
                if check:  # θ = θ_old: the sampled value, with the re-scored step's gradient, so ρ = 1 exactly
                    assert_ratio_is_one(log_prob, old, _RESCORE_RTOL)
                    log_prob = log_prob - log_prob.detach() + old
                terms, clipped = clipped_surrogate(log_prob, old, adv[rows.to(adv.device)], clip_range)
                delta = log_prob.detach() - old
                totals["clip_fraction"] += float(clipped.sum())
                totals["approx_kl"] += float(0.5 * delta.pow(2).sum())
                if penalty is not None:
                    extra = penalty(t, rows, step, part)
                    totals["penalty"] += float(extra.detach().sum())
                    terms = terms + extra
                totals["loss"] += float(terms.detach().sum())
                return terms.sum() / count

            with acc.autocast():
                backward_per_step(loop.adapter, loop.policy, loop.denoiser, part, mask, loss, loop.no_sync)
            grad_norms.append(loop.optimizer_step())
            totals["pairs"] += int(mask.sum())
            first = False
    loop.denoiser.eval()
    pairs = acc.gather(torch.tensor([totals["pairs"]], dtype=torch.float64, device=acc.device)).sum()
    sums = acc.gather(torch.tensor([[totals[k] for k in ("loss", "clip_fraction", "approx_kl", "penalty")]],
                                   dtype=torch.float64, device=acc.device)).sum(0) / pairs.clamp(min=1)
    metrics = dict(zip(("loss", "clip_fraction", "approx_kl", "penalty"), sums.tolist()))
    metrics["grad_norm"] = sum(grad_norms) / max(len(grad_norms), 1)
    metrics["trained_pairs"] = int(pairs)
    return metrics
