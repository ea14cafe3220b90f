"""ReNO (Eyring et al., NeurIPS 2024): optimise each sample's initial noise against differentiable rewards, the
generator's weights untouched, many prompts in one batch.

For prompt ``i`` with initial noise ``z_i`` (``d`` numbers) and a few-step deterministic sampler ``G``, the loss is

    L_i(z_i) = −r(G(z_i, c_i), c_i) + λ_reg·(½‖z_i‖² − (d−1)·log‖z_i‖)

where ``r`` is one reward (several are one ``WeightedSum``, each member in its own scale times its weight) and
the second term is the negative log-density of ``‖z_i‖`` under the chi distribution the noise was drawn from:
it keeps ``z_i`` on the shell ``‖z‖ ≈ √d`` where the generator was trained. Each prompt's gradient is clipped
to its own norm, the update is SGD with Nesterov momentum (elementwise, so prompts never mix), and each prompt
returns its best iterate, not its last. The prompts of a batch are independent samples of the generator and
the reward scores each sample alone (``scope == "sample"``, ensembles with held statistics), so a batched run
gives each prompt what a run of that prompt alone gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mmalign.media import MediaBatch, per_prompt_metadata, per_sample
from mmalign.models.adapter import GeneratorAdapter
from mmalign.models.pipelines import adapter_for
from mmalign.models.rollout import sample_with_grad
from mmalign.rewards import Reward, build
from mmalign.rewards.ensemble import Ensemble

__all__ = ["IterationState", "NoiseOptimization", "chi_regularizer", "optimize_noise", "seeded_noise"]


def chi_regularizer(noise: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``½‖z‖² − (d−1)·log‖z‖`` of each row of ``noise`` ``(B, …)``, in at least fp32: the negative log
    chi density of the norm (d degrees of freedom) up to its constant. Minimal at ``‖z‖² = d − 1``."""
    z = noise.flatten(1).to(torch.promote_types(noise.dtype, torch.float32))
    norm_sq = z.pow(2).sum(1)
    return 0.5 * norm_sq - 0.5 * (z.shape[1] - 1) * norm_sq.log()


def seeded_noise(adapter, seeds: Sequence[int], metadata: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``(len(seeds), *adapter.latent_shape)`` initial noise (``adapter.initial_noise``), row ``i`` from its own
    CPU generator seeded ``seeds[i]`` and ``metadata[i]``: a prompt's noise does not depend on which batch it is
    in."""
    rows = [adapter.initial_noise([meta], torch.Generator().manual_seed(int(seed)))
            for seed, meta in zip(seeds, metadata, strict=True)]
    return torch.cat(rows)


@dataclass
class IterationState:
    """What a callback sees after each iteration's evaluation (before the update); all ``(B,)`` but ``pixels``."""

    iteration: int
    scores: torch.Tensor
    best_scores: torch.Tensor
    pixels: torch.Tensor  # (B, 3, H, W) of this iteration, detached
    active: torch.Tensor  # prompts still updated


@dataclass
class NoiseOptimization:
    """The outcome per prompt: the initial and the best iterate (noise, image, reward) and every iteration's trace.

    ``trace`` maps ``reward`` (the optimised score), each reward component, ``regularizer``, ``noise_norm``
    (``‖z‖/√d``, 1 on the shell) and ``grad_norm`` (before clipping) to ``(iterations, B)`` tensors. ``best_iteration`` is 0 where no update beat the initial
    noise. ``stopped[i]`` says why prompt ``i`` stopped updating early (a non-finite reward or gradient), else None.
    """

    prompts: list[str]
    metadata: list[dict[str, Any]]
    initial_noise: torch.Tensor
    best_noise: torch.Tensor
    initial_pixels: torch.Tensor
    best_pixels: torch.Tensor
    initial_scores: torch.Tensor
    best_scores: torch.Tensor
    best_iteration: torch.Tensor
    trace: dict[str, torch.Tensor] = field(default_factory=dict)
    stopped: list[str | None] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        """Evaluations done (the reward calls per prompt), the initial noise's included."""
        return int(self.trace["reward"].shape[0])

    def media(self, which: str = "best") -> MediaBatch:
        """The ``best`` or ``initial`` images as a batch with the prompts and metadata."""
        if which not in ("best", "initial"):
            raise ValueError(f"which: expected 'best' or 'initial', got {which!r}")
        pixels = self.best_pixels if which == "best" else self.initial_pixels
        return MediaBatch(pixels, self.prompts, self.metadata)


def optimize_noise(
    generator: GeneratorAdapter | Any,
    prompts: Sequence[str],
    reward: Reward | str | dict | list,
    metadata: Sequence[dict[str, Any]] | None = None,
    seeds: Sequence[int] | None = None,
    noise: torch.Tensor | None = None,
    num_steps: int = 1,
    iterations: int = 50,
    lr: float = 5.0,
    momentum: float = 0.9,
    grad_clip: float = 0.1,
    regularization: float = 0.01,
    guidance_scale: float = 1.0,
    gradient_checkpointing: bool = True,
    callback: Callable[[IterationState], bool | None] | None = None,
    progress: bool = False,
) -> NoiseOptimization:
    """Optimise the initial noise of each prompt against ``reward`` (ReNO), all prompts in one batch.

    Args:
        generator: a ``GeneratorAdapter`` or a diffusers pipeline (wrapped in its family's adapter with ``guidance_scale``;
            1 disables guidance, as one-step models such as SD-Turbo sample).
        reward: a ``Reward`` or a reward spec (a list of specs with weights is their weighted sum); it must be
            differentiable in the pixels and score each sample alone.
        seeds: one per prompt, the seed of its initial noise (default ``0 … B−1``); or ``noise``
            ``(B, *adapter.latent_shape)`` (``(B, C, F, h, w)`` for video).
        num_steps: deterministic DDIM steps of the generator (1 for one-step models, from t = T with the
            scheduler's ``timestep_spacing``: "trailing" for the turbo models).
        iterations: reward evaluations per prompt, the initial noise's included (updates: one fewer).
        lr, momentum, grad_clip, regularization: SGD (Nesterov when momentum > 0), the per-prompt gradient-norm
            clip and λ_reg; the defaults are the paper's.
        gradient_checkpointing: recompute each UNet call and the VAE decoder in backward (memory of one step).
        callback: called with an ``IterationState`` after each evaluation; a true return stops the run.
    """
    adapter = adapter_for(generator, guidance_scale)
    prompts = list(prompts)
    reward = _checked_reward(reward)
    _check_settings(prompts, iterations, lr, momentum, grad_clip, regularization)
    metadata = per_prompt_metadata(metadata, len(prompts))
    noise = _initial(noise, seeds, adapter, metadata)
    device = adapter.device
    reward.to(device)
    policy = adapter.make_policy(num_steps, 0.0)
    embeds = adapter.encode_prompts(prompts)
    z = noise.to(device, torch.float32).clone().requires_grad_(True)
    optimizer = torch.optim.SGD([z], lr=lr, momentum=momentum, nesterov=momentum > 0)
    batch = len(prompts)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    best = _Best(batch, device)
    stopped: list[str | None] = [None] * batch
    trace: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(range(iterations), desc="ReNO", unit="iter", disable=not progress)
    for iteration in bar:
        sample = sample_with_grad(adapter, policy, prompts, z, embeds=embeds,
                                  gradient_checkpointing=gradient_checkpointing,
                                  decoder_checkpointing=gradient_checkpointing)
        pixels = sample.pixels.float()
        drawn = torch.isfinite(pixels.flatten(1)).all(1)
        out = reward(MediaBatch(torch.where(per_sample(drawn, pixels), pixels, 0.5), prompts, metadata))
        scores = torch.where(drawn, out.scores.float().to(device), math.nan)
        finite = torch.isfinite(scores)
        regularizer = chi_regularizer(z)
        best.update(iteration, scores.detach(), finite & active, z.detach(), pixels.detach())
        _record(trace, scores, out.components, regularizer, z.detach())
        bar.set_postfix(reward=f"{float(scores.detach()[finite].mean()) if finite.any() else math.nan:.4g}",
                        best=f"{float(best.scores[best.scores.isfinite()].mean()) if best.found else math.nan:.4g}")
        for i in (active & ~finite).nonzero().flatten().tolist():
            stopped[i] = f"iteration {iteration}: non-finite reward"
        active &= finite
        last = iteration == iterations - 1
        if callback is not None and callback(IterationState(iteration, scores.detach(), best.scores.clone(),
                                                           pixels.detach(), active.clone())):
            last = True
        if last or not bool(active.any()):
            trace.setdefault("grad_norm", []).append(torch.full((batch,), math.nan))
            break
        loss = torch.where(active, regularization * regularizer - scores, 0.0).sum()
        (grad,) = torch.autograd.grad(loss, z)
        grad_finite = torch.isfinite(grad.flatten(1)).all(1)
        for i in (active & ~grad_finite).nonzero().flatten().tolist():
            stopped[i] = f"iteration {iteration}: non-finite gradient"
        active &= grad_finite
        grad = torch.where(per_sample(active, grad), grad, 0.0)
        norms = grad.flatten(1).norm(dim=1)
        trace.setdefault("grad_norm", []).append(torch.where(active, norms, math.nan).cpu())
        z.grad = grad * per_sample((grad_clip / (norms + 1e-6)).clamp(max=1.0), grad)
        before = z.detach().clone()
        optimizer.step()
        with torch.no_grad():  # momentum would still move a stopped prompt's noise
            z.copy_(torch.where(per_sample(active, z), z, before))
    first = {k: v[0] for k, v in trace.items()}
    return NoiseOptimization(
        prompts=prompts, metadata=metadata, initial_noise=noise.float().cpu(), best_noise=best.noise.cpu(),
        initial_pixels=best.initial_pixels, best_pixels=best.pixels, initial_scores=first["reward"],
        best_scores=best.scores.cpu(), best_iteration=best.iteration.cpu(),
        trace={k: torch.stack(v) for k, v in trace.items()}, stopped=stopped,
    )


class _Best:
    """Each prompt's best iterate so far (NaN scores until a finite one is seen)."""

    def __init__(self, batch: int, device) -> None:
        self.scores = torch.full((batch,), math.nan, device=device)
        self.iteration = torch.zeros(batch, dtype=torch.long, device=device)
        self.noise = self.pixels = self.initial_pixels = None

    @property
    def found(self) -> bool:
        return bool(self.scores.isfinite().any())

    def update(self, iteration: int, scores, eligible, noise, pixels) -> None:
        if self.noise is None:
            self.noise, self.pixels, self.initial_pixels = noise.clone(), pixels.cpu(), pixels.cpu()
        better = eligible & (self.scores.isnan() | (scores > self.scores))
        self.scores = torch.where(better, scores, self.scores)
        self.iteration = torch.where(better, iteration, self.iteration)
        self.noise = torch.where(per_sample(better, noise), noise, self.noise)
        self.pixels = torch.where(per_sample(better, pixels).cpu(), pixels.cpu(), self.pixels)


def _record(trace: dict[str, list[torch.Tensor]], scores, components: dict, regularizer, noise) -> None:
    trace.setdefault("reward", []).append(scores.detach().float().cpu())
    for name, values in components.items():
        trace.setdefault(name, []).append(values.detach().float().cpu())
    trace.setdefault("regularizer", []).append(regularizer.detach().float().cpu())
    trace.setdefault("noise_norm", []).append((noise.flatten(1).norm(dim=1) / noise[0].numel() ** 0.5).cpu())


def _checked_reward(reward) -> Reward:
    reward = reward if isinstance(reward, Reward) else build(reward)
    if not reward.differentiable:
        raise ValueError(f"reward: {reward.name!r} has no gradients in the pixels; noise optimisation needs a "
                         "differentiable reward (e.g. clip, hps, pickscore, proxy, or an ensemble of them)")
    if reward.scope != "sample":
        raise ValueError(f"reward: {reward.name!r} scores a {reward.scope}, so each prompt's reward would depend on "
                         "the others in its batch; noise optimisation needs a per-sample reward")
    for module in reward.modules():
        if isinstance(module, Ensemble) and module.standardize and not module.statistics_held:
            raise ValueError(
                f"reward: the ensemble {module.member_names} standardises with running statistics, which would "
                "couple the prompts of a batch; calibrate it on samples first and call hold_statistics() "
                "(the recipe runner does), or set standardize: false")
    return reward


def _check_settings(prompts, iterations, lr, momentum, grad_clip, regularization) -> None:
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations: expected an int ≥ 1 (reward evaluations per prompt), got {iterations!r}")
    for name, value, ok, expected in (
        ("lr", lr, lambda v: v > 0, "> 0"),
        ("momentum", momentum, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("grad_clip", grad_clip, lambda v: v > 0, "> 0"),
        ("regularization", regularization, lambda v: v >= 0, "≥ 0"),
    ):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"{name}: expected a finite number {expected}, got {value!r}")


def _initial(noise, seeds, adapter, metadata) -> torch.Tensor:
    if noise is not None and seeds is not None:
        raise ValueError("noise, seeds: give one of them (seeds draw the noise)")
    expected = (len(metadata), *adapter.latent_shape)
    if noise is not None:
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise: expected shape {expected} (one per prompt), got {tuple(noise.shape)}")
        return noise
    seeds = list(range(len(metadata))) if seeds is None else list(seeds)
    if len(seeds) != len(metadata):
        raise ValueError(f"seeds: expected one per prompt ({len(metadata)}), got {len(seeds)}")
    return seeded_noise(adapter, seeds, metadata)
