"""DiffusionNFT (Zheng et al., ICLR 2026): negative-aware fine-tuning on the forward process.

No likelihoods and no trajectories: each epoch the old policy θ_old samples ``samples_per_prompt`` clean
latents ``x0`` per prompt with any solver (``eta: 0`` deterministic DDIM or the flow ODE, ``eta > 0`` the
stochastic policy), the reward scores them, and the loss is a regression on the clean samples noised by the
adapter's forward process (``x_t = noise(x0, ε, t)``, target ``v = target(x0, ε, t)``: ε, v or the flow
velocity, whichever the model predicts):

- optimality probability ``r = ½ + ½·clip(A / adv_clip_max, −1, 1)``, ``A = (r_raw − mean_group)/std`` (the
  batch's std by default, the group's with ``std_scope: group``), i.e. ``Z = adv_clip_max·std``; a sample
  whose reward is not finite gets no loss term;
- implicit policies ``v⁺ = (1 − β)·v_old + β·v_θ`` and ``v⁻ = (1 + β)·v_old − β·v_θ``, ``v_old`` from θ_old
  without gradient;
- ``L = (adv_clip_max/β)·E[r·ℓ(v⁺) + (1 − r)·ℓ(v⁻)]`` with ``weighting: adaptive`` (the public code's):
  ``ℓ(u) = ‖x̂0(u) − x0‖² / sg(mean|x̂0(u) − x0|)``, the error of the clean prediction ``x̂0`` of ``u`` at
  ``x_t`` normalised by its own mean size, per sample; ``weighting: none``: ``ℓ(u) = ‖u − v‖²`` (means over
  latent dimensions). The factor ``adv_clip_max/β`` makes the gradient at θ = θ_old
  ``≈ 2·clip(A, ±adv_clip_max)·∂ℓ``, independent of β and Z, as in the public code.

Timesteps (``timesteps: sampler``, the public code's): each sample trains ``ceil(timestep_fraction·num_steps)``
distinct timesteps of the rollout sampler's own schedule, drawn per sample and pass, one model call (and one
backward) each, so the loss is weighted where the sampler spends its steps; ``timesteps: uniform`` draws them from
the forward process's range ``timestep_range`` instead. Training is CFG-free: the loss sees the model's
conditional output (no CFG combination) whatever ``guidance_scale`` the rollouts sample with.

θ_old is a copy of the trained parameters (LoRA adapters or the whole denoiser), swapped into the denoiser for
the rollouts and ``v_old``; after each epoch it follows θ softly, ``θ_old ← η·θ_old + (1 − η)·θ`` with
``η = min(old_decay_rate·steps, old_decay_max)`` (0 at the start: a hard copy), as the paper does. It is
checkpointed, so a killed run resumes bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from pydantic import Field, model_validator

from mmalign.models.adapter import GeneratorAdapter
from mmalign.models.trajectory import Trajectory
from mmalign.trainers.diffusion import DiffusionConfig, DiffusionTrainer
from mmalign.trainers.diffusion_grpo import group_advantages
from mmalign.trainers.lora import trainable_state

__all__ = ["NFTConfig", "NFTTrainer", "OldPolicy", "conditional_output", "optimality_probability"]

#: the seeded-generator purpose of each pass's timesteps and noises (the loop's own purposes are 0 and 1 + pass)
_NOISE_PURPOSE = 2000


class NFTConfig(DiffusionConfig):
    """DiffusionNFT on any generator adapter (ε / v UNets, flow-matching transformers)."""

    task: Literal["diffusion_nft"] = "diffusion_nft"
    beta: float = Field(1.0, gt=0, description="β of the implicit policies v± = v_old ± β·(v_θ − v_old)")
    adv_clip_max: float = Field(5.0, gt=0, description="r = ½ + ½·clip(A/adv_clip_max, ±1): Z = adv_clip_max × std")
    std_scope: Literal["group", "batch"] = Field("batch", description="std of the batch's rewards or the group's")
    weighting: Literal["adaptive", "none"] = Field(
        "adaptive", description="adaptive: x̂0 errors over their own mean size (the public code); none: ‖v± − v‖²"
    )
    timesteps: Literal["sampler", "uniform"] = Field(
        "sampler", description="sampler: timesteps of the rollout sampler's schedule; uniform: from timestep_range"
    )
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="each sample trains ceil(this × num_steps) "
                                     "timesteps per pass, drawn per sample")
    timestep_range: tuple[float, float] = Field(
        (0.0, 1.0), description="timesteps: uniform: fractions of the forward process's noise range (0 clean, 1 noise)"
    )
    old_decay_rate: float = Field(0.001, ge=0, description="θ_old ← η·θ_old + (1−η)·θ after each epoch, "
                                  "η = min(old_decay_rate × optimiser steps, old_decay_max)")
    old_decay_max: float = Field(0.5, ge=0, lt=1)
    reference_weight: float = Field(0.0, ge=0, description="weight of ‖v_θ − v_ref‖² (the LoRA-disabled or frozen "
                                    "reference's conditional output)")
    eta: float = Field(0.0, ge=0, description="the rollout sampler's η: 0 deterministic (DDIM, flow ODE), > 0 the "
                       "stochastic policy")
    guidance_scale: float = Field(1.0, ge=1, description="CFG of the rollouts and the report (1: CFG-free, as the "
                                  "paper); the loss is CFG-free either way")
    output_dir: str = "runs/diffusion-nft"

    @model_validator(mode="after")
    def _range(self) -> NFTConfig:
        low, high = self.timestep_range
        if not 0 <= low <= high <= 1:
            raise ValueError(f"timestep_range: expected 0 ≤ low ≤ high ≤ 1, got {self.timestep_range}")
        return self


def optimality_probability(rewards: torch.Tensor, group_size: int, adv_clip_max: float,
                           batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """``(B,)`` ``½ + ½·clip(A/adv_clip_max, −1, 1)`` with ``A`` the group-normalised reward of
    ``group_advantages`` (``batch_std`` replacing the groups' std); NaN where the reward is not finite."""
    advantages = group_advantages(rewards, group_size, batch_std)
    advantages = torch.where(torch.isfinite(rewards.double()), advantages, float("nan"))
    return 0.5 + 0.5 * (advantages / adv_clip_max).clamp(-1.0, 1.0)


def _conditional_only(run, x: torch.Tensor, timestep, cond: dict, uncond: dict) -> torch.Tensor:
    return run(x, timestep, **cond)


@contextmanager
def conditional_output(adapter: GeneratorAdapter) -> Iterator[None]:
    """The adapter's ``model_output`` without classifier-free guidance: its ``guided`` combination gives the
    conditional call alone (the model's conditional prediction). Guidance a model takes as an input (Flux-dev's
    embedding) is part of the model and stays as the rollouts use it."""
    adapter.guided = _conditional_only  # shadows the method on this instance only
    try:
        yield
    finally:
        del adapter.guided


class OldPolicy:
    """θ_old: a copy of the trained parameters, swapped into the module for sampling and ``v_old``.

    Swapping exchanges the tensors behind the parameters (no copy), and clears their ``requires_grad`` for the
    time, so autocast's weight cache never serves one set for the other. Resumable (``state_dict``).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.params = params
        self.weights = {name: p.detach().clone() for name, p in params.items()}

    def _swap(self, requires_grad: bool) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                live = p.data
                p.data = self.weights[name]
                self.weights[name] = live
                p.requires_grad_(requires_grad)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        self._swap(False)
        try:
            yield
        finally:
            self._swap(True)

    @torch.no_grad()
    def soft_update(self, decay: float) -> None:
        """``θ_old ← decay·θ_old + (1 − decay)·θ``."""
        for name, p in self.params.items():
            self.weights[name].mul_(decay).add_(p.detach().to(self.weights[name]), alpha=1.0 - decay)

    def state_dict(self) -> dict:
        return {"weights": {name: w.detach().cpu().clone() for name, w in self.weights.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name, w in state["weights"].items():
            self.weights[name].copy_(w)


class NFTTrainer(DiffusionTrainer):
    """Runs an ``NFTConfig`` on the shared loop; the algorithm is ``update``."""

    name = "NFT"
    curve_keys = ("loss", "old_deviation")
    needs_reference = False
    needs_log_probs = False

    def setup(self) -> None:
        super().setup()
        self.old = OldPolicy(trainable_state(self.loop.raw_denoiser))
        self.loop.state["old_policy"] = self.old
        self.loop.sampling_weights = self.old.swapped_in

    def optimality(self, trajectory: Trajectory) -> torch.Tensor:
        """This process's ``r`` (groups never straddle processes; the batch std is over all of them)."""
        cfg, acc = self.config, self.loop.accelerator
        batch_std = None
        if cfg.std_scope == "batch":
            everyone = acc.gather(trajectory.rewards)
            finite = everyone[torch.isfinite(everyone)].double()
            batch_std = finite.std(unbiased=False) if finite.numel() else finite.new_tensor(float("nan"))
        return optimality_probability(trajectory.rewards, cfg.samples_per_prompt, cfg.adv_clip_max, batch_std)

    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n, k)`` the timesteps each of ``n`` samples trains in one pass (``k = ceil(fraction·num_steps)``)."""
        cfg, loop = self.config, self.loop
        k = math.ceil(cfg.timestep_fraction * cfg.num_steps)
        if cfg.timesteps == "uniform":
            return loop.adapter.forward_process.sample_timesteps(n * k, *cfg.timestep_range, generator=generator).view(n, k)
        schedule = loop.policy.timesteps.cpu()
        picks = torch.stack([torch.randperm(len(schedule), generator=generator)[:k] for _ in range(n)])
        return schedule[picks]

    def loss(self, part: Trajectory, noise: torch.Tensor, timesteps: torch.Tensor, r: torch.Tensor,
             valid: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The NFT loss of ``part``'s clean samples noised with ``noise`` at per-sample ``timesteps`` ``(n,)``,
        averaged over the ``valid`` samples (with autograd into the trained weights), and its per-sample parts."""
        cfg, loop = self.config, self.loop
        adapter, process = loop.adapter, loop.adapter.forward_process
        x0 = part.latents[:, -1].float()
        x_t = process.noise(x0, noise, timesteps)
        target = process.target(x0, noise, timesteps)
        t = timesteps.to(adapter.device)
        with conditional_output(adapter):
            with torch.no_grad(), self.old.swapped_in():
                out_old = adapter.model_output(loop.raw_denoiser, x_t, t, part.embeds).float()
            out = adapter.model_output(loop.denoiser, x_t, t, part.embeds).float()
            penalty = torch.zeros(len(part), device=out.device)
            if cfg.reference_weight > 0:
                with torch.no_grad(), loop.reference() as ref:
                    out_ref = adapter.model_output(ref, x_t, t, part.embeds).float()
                penalty = (out - out_ref).pow(2).flatten(1).mean(1)

        def branch(prediction: torch.Tensor) -> torch.Tensor:
            if cfg.weighting == "none":
                return (prediction - target).pow(2).flatten(1).mean(1)
            error = (process.clean_prediction(prediction, x_t, timesteps) - x0).flatten(1)
            return error.pow(2).mean(1) / error.detach().abs().mean(1).clamp(min=1e-5)

        delta = out - out_old
        r = r.to(out)
        terms = r * branch(out_old + cfg.beta * delta) + (1 - r) * branch(out_old - cfg.beta * delta)
        per_sample = cfg.adv_clip_max / cfg.beta * terms + cfg.reference_weight * penalty
        valid = valid.to(out.device)
        loss = torch.where(valid, per_sample, 0.0).sum() / valid.sum().clamp(min=1)
        parts = {"loss": per_sample.detach(), "old_deviation": delta.detach().pow(2).flatten(1).mean(1),
                 "reference_penalty": penalty.detach()}
        return loss, {key: value[valid] for key, value in parts.items()}

    def update(self, trajectory: Trajectory, epoch: int) -> dict[str, float]:
        """``inner_steps`` passes over the epoch's prompt groups, one optimiser step per ``prompts_per_update``
        groups, then θ_old's soft update."""
        cfg, loop, acc = self.config, self.loop, self.loop.accelerator
        r = self.optimality(trajectory)
        valid = torch.isfinite(r).cpu()
        r = torch.nan_to_num(r, nan=0.5)
        sums = {"loss": 0.0, "old_deviation": 0.0, "reference_penalty": 0.0}
        terms, grad_norms = 0, []
        loop.denoiser.train()
        for k in range(cfg.inner_steps):
            generator = loop.run.generator(epoch, _NOISE_PURPOSE + k)
            for index in loop.minibatches(trajectory, epoch, k):
                part = trajectory.select(index)
                draws = self.draw_timesteps(len(index), generator)
                slots = draws.shape[1]
                for j in range(slots):
                    noise = loop.adapter.initial_noise(part.metadata, generator).to(part.latents)  # as sampling's
                    with loop.no_sync() if j < slots - 1 else nullcontext(), acc.autocast():
                        loss, parts = self.loss(part, noise, draws[:, j], r[index.to(r.device)], valid[index])
                    acc.backward(loss / slots)
                    for key in sums:
                        sums[key] += float(parts[key].double().sum())
                    terms += len(parts["loss"])
                grad_norms.append(loop.optimizer_step())
        loop.denoiser.eval()
        decay = min(cfg.old_decay_rate * loop.step, cfg.old_decay_max)
        self.old.soft_update(decay)
        spread = (2 * r[valid.to(r.device)].double() - 1).abs()
        row = [terms, *sums.values(), len(spread), float(spread.sum())]
        totals = acc.gather(torch.tensor([row], dtype=torch.float64, device=acc.device)).sum(0)
        metrics = {key: float(v) for key, v in zip(sums, totals[1:4] / totals[0].clamp(min=1))}
        if cfg.reference_weight == 0:
            metrics.pop("reference_penalty")
        metrics.update(grad_norm=sum(grad_norms) / max(len(grad_norms), 1), old_decay=decay,
                       trained_terms=int(totals[0]), optimality_spread=float(totals[5] / totals[4].clamp(min=1)))
        return metrics
