"""Sampling trajectories with log-probs, re-scoring their steps under other weights, and sampling with
gradients through chosen steps (for rewards back-propagated through the sampler, and noise optimisation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from mmalign.media import per_prompt_metadata, per_sample
from mmalign.models.adapter import GeneratorAdapter, PromptEmbeds, SamplingPolicy
from mmalign.models.ddim import StepOutput
from mmalign.models.trajectory import Trajectory

__all__ = [
    "GradSample",
    "backward_per_step",
    "backward_weighted_log_probs",
    "denoise_in_one_step",
    "sample_trajectories",
    "sample_with_grad",
    "step_log_probs",
    "trajectory_log_probs",
]


@torch.no_grad()
def sample_trajectories(
    adapter: GeneratorAdapter,
    policy: SamplingPolicy,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]] | None = None,
    generator: torch.Generator | None = None,
    denoiser: torch.nn.Module | None = None,
    progress: bool = False,
    group_size: int = 1,
) -> Trajectory:
    """Sample one trajectory per prompt with ``denoiser`` (default: the pipeline's), storing every step's log-prob.

    The initial noise (``adapter.initial_noise`` of each prompt's ``metadata``) and every step's noise come from
    ``generator``, so a seeded generator reproduces the batch.
    With ``group_size`` k, each run of k consecutive samples starts from one initial noise: the initial noise is
    not an action of the policy (it has no log-prob), so within such a group every reward difference comes from
    the steps the policy is credited with.
    """
    denoiser = adapter.denoiser if denoiser is None else denoiser
    prompts = list(prompts)
    if not isinstance(group_size, int) or group_size < 1 or len(prompts) % group_size:
        raise ValueError(f"group_size: expected a positive int dividing the {len(prompts)} prompts, got {group_size!r}")
    embeds = adapter.encode_prompts(prompts)
    metadata = per_prompt_metadata(metadata, len(prompts))
    x = adapter.initial_noise(metadata[::group_size], generator).repeat_interleave(group_size, 0)
    latents, log_probs = [x], []
    for index, t in enumerate(tqdm(policy.timesteps, desc="sampling", leave=False, disable=not progress)):
        out = adapter.model_output(denoiser, x, t, embeds)
        step = policy.step(out, x, index, generator=generator)
        x = step.prev_sample
        latents.append(x)
        log_probs.append(step.log_prob)
    pixels = adapter.decode(x).float()
    return Trajectory(
        latents=torch.stack(latents, 1),
        timesteps=policy.timesteps.clone(),
        log_probs=torch.stack(log_probs, 1),
        embeds=embeds,
        prompts=prompts,
        metadata=metadata,
        pixels=pixels,
    )


def step_log_probs(
    adapter: GeneratorAdapter, policy: SamplingPolicy, denoiser: torch.nn.Module, trajectory: Trajectory, index: int
) -> torch.Tensor:
    """``(B,)`` fp64 log-probs of step ``index`` of each stored trajectory under ``denoiser`` (with autograd)."""
    x = trajectory.latents[:, index]
    out = adapter.model_output(denoiser, x, trajectory.timesteps[index], trajectory.embeds)
    return policy.step(out, x, index, prev_sample=trajectory.latents[:, index + 1]).log_prob


@torch.no_grad()
def trajectory_log_probs(
    adapter: GeneratorAdapter, policy: SamplingPolicy, denoiser: torch.nn.Module, trajectory: Trajectory
) -> torch.Tensor:
    """``(B, T)`` fp64 log-probs of every step under ``denoiser``, without gradients (reference or current)."""
    return torch.stack(
        [step_log_probs(adapter, policy, denoiser, trajectory, i) for i in range(trajectory.num_steps)], 1
    )


def backward_per_step(
    adapter: GeneratorAdapter,
    policy: SamplingPolicy,
    denoiser: torch.nn.Module,
    trajectory: Trajectory,
    mask: torch.Tensor,
    loss: Callable[[int, torch.Tensor, StepOutput], torch.Tensor],
    no_sync=None,
) -> None:
    """Back-propagate ``loss(t, rows, step)`` for every step ``t`` with ``mask[:, t]`` set, one timestep at a time.

    ``rows`` are the indices where ``mask[:, t]`` holds and ``step`` re-scores their stored step ``t`` under ``denoiser``
    with autograd (``step.log_prob``, ``step.mean``). Any loss that is a sum over (sample, step) terms trains this
    way with one UNet graph alive, so memory does not grow with the number of steps. ``no_sync`` (e.g.
    ``lambda: accelerator.no_sync(model)``) is entered for every step but the last, so distributed gradients are
    all-reduced once per update rather than once per timestep.
    """
    mask = mask.cpu()
    steps = [t for t in range(trajectory.num_steps) if bool(mask[:, t].any())]
    for position, index in enumerate(steps):
        rows = mask[:, index].nonzero().squeeze(1)
        part = trajectory if len(rows) == len(trajectory) else trajectory.select(rows)
        context = no_sync() if no_sync is not None and position < len(steps) - 1 else nullcontext()
        with context:
            x = part.latents[:, index]
            out = adapter.model_output(denoiser, x, part.timesteps[index], part.embeds)
            step = policy.step(out, x, index, prev_sample=part.latents[:, index + 1])
            loss(index, rows, step).float().backward()


def backward_weighted_log_probs(
    adapter: GeneratorAdapter,
    policy: SamplingPolicy,
    denoiser: torch.nn.Module,
    trajectory: Trajectory,
    coef: torch.Tensor,
    no_sync=None,
) -> None:
    """Accumulate ``∇ Σ_{b,t} coef[b,t]·log π(step b,t)`` into the gradients (``backward_per_step`` over the
    non-zero coefficients): how a loss that depends on the network only through log-probs is trained."""

    def weighted(index: int, rows: torch.Tensor, step: StepOutput) -> torch.Tensor:
        return (coef[rows.to(coef.device), index].to(step.log_prob) * step.log_prob).sum()

    backward_per_step(adapter, policy, denoiser, trajectory, coef.ne(0), weighted, no_sync)


class GradSample(NamedTuple):
    """The end of a differentiable rollout: ``latents`` ``(B, *latent_shape)`` x_0, ``pixels`` ``(B, 3, H, W)``
    (videos ``(B, T, 3, H, W)``) and the sum of ``on_step``'s values over the kept steps (0 without one)."""

    latents: torch.Tensor
    pixels: torch.Tensor
    penalty: torch.Tensor | float = 0.0


#: ``on_step(index, x_t, model_output)``: a scalar added to ``GradSample.penalty`` at each kept step
StepHook = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_with_grad(
    adapter: GeneratorAdapter,
    policy: SamplingPolicy,
    prompts: Sequence[str],
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    denoiser: torch.nn.Module | None = None,
    grad_steps: int | torch.Tensor | None = None,
    gradient_checkpointing: bool = False,
    start_index: int = 0,
    embeds: PromptEmbeds | None = None,
    on_step: StepHook | None = None,
    decoder_checkpointing: bool = False,
) -> GradSample:
    """Sample from ``noise`` ``(B, *latent_shape)`` (the latent before step ``start_index``; 0: the initial noise) with
    autograd through the last ``grad_steps`` steps (None: all).

    The earlier steps run without a graph and their output is detached: DRaFT-K's truncation (K = 1 is often
    enough). A ``(B,)`` tensor gives each sample its own K (AlignProp's truncation, drawn once per trajectory):
    a sample's latent is detached before its first kept step. With all steps kept and ``noise.requires_grad``,
    the gradient reaches the initial noise (ReNO). Each step's noise comes from ``generator`` and is fixed given
    it, so ``x_{t-1} = μ_θ(x_t) + σ_t·z`` is differentiable in θ and x_t (the reparameterised DDIM-η step).
    ``gradient_checkpointing`` recomputes each kept UNet call in backward instead of storing its activations
    (memory of one step's activations instead of K); ``decoder_checkpointing`` does the same for the VAE decoder.
    ``embeds`` reuses stored prompt embeddings; ``on_step`` adds a per-step term, e.g. a penalty towards a
    reference model's output at the same ``x_t``.
    """
    denoiser = adapter.denoiser if denoiser is None else denoiser
    prompts = list(prompts)
    if noise.shape != (len(prompts), *adapter.latent_shape):
        raise ValueError(f"noise: expected shape {(len(prompts), *adapter.latent_shape)}, got {tuple(noise.shape)}")
    if not isinstance(start_index, int) or not 0 <= start_index < policy.num_steps:
        raise ValueError(f"start_index: expected an int in [0, {policy.num_steps}), got {start_index!r}")
    remaining = policy.num_steps - start_index
    kept = _kept_steps(grad_steps, remaining, len(prompts)).to(adapter.device)
    first_kept = policy.num_steps - kept  # (B,) index of each sample's first step with a graph
    embeds = adapter.encode_prompts(prompts) if embeds is None else embeds
    x = noise.to(adapter.device)
    penalty: torch.Tensor | float = 0.0
    for index in range(start_index, policy.num_steps):
        t = policy.timesteps[index]
        keep = first_kept <= index
        if not bool(keep.any()):
            with torch.no_grad():
                x = policy.step(adapter.model_output(denoiser, x, t, embeds), x, index, generator=generator).prev_sample
            continue
        x = torch.where(per_sample(keep, x), x, x.detach())  # samples whose truncation lies later
        if gradient_checkpointing:
            out = checkpoint(adapter.model_output, denoiser, x, t, embeds, use_reentrant=False)
        else:
            out = adapter.model_output(denoiser, x, t, embeds)
        if on_step is not None:
            penalty = penalty + on_step(index, x, out)
        x = policy.step(out, x, index, generator=generator).prev_sample
    pixels = checkpoint(adapter.decode, x, use_reentrant=False) if decoder_checkpointing else adapter.decode(x)
    return GradSample(x, pixels, penalty)


def _kept_steps(grad_steps: int | torch.Tensor | None, remaining: int, batch: int) -> torch.Tensor:
    """``(B,)`` number of final steps each sample keeps a graph through, validated against ``remaining``."""
    if grad_steps is None:
        return torch.full((batch,), remaining)
    if isinstance(grad_steps, torch.Tensor):
        kept = grad_steps.long().flatten()
        if kept.shape != (batch,) or bool((kept < 0).any()) or bool((kept > remaining).any()):
            raise ValueError(f"grad_steps: expected a ({batch},) tensor of ints in [0, {remaining}], got {grad_steps!r}")
        return kept
    if isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or not 0 <= grad_steps <= remaining:
        raise ValueError(f"grad_steps: expected None or an int in [0, {remaining}], got {grad_steps!r}")
    return torch.full((batch,), grad_steps)


def denoise_in_one_step(
    adapter: GeneratorAdapter,
    denoiser: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: PromptEmbeds,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct-Align's ground-truth-noise prior: noise ``x0`` with known ``noise`` by the adapter's forward process
    (``x_t = √ᾱ·x0 + √(1−ᾱ)·ε``, or ``(1−σ)·x0 + σ·ε`` for flow models) at per-sample ``timesteps`` ``(B,)``, and
    recover ``x̂0`` from one guided model call (with autograd).

    Returns ``(x̂0, x_t, model_output)``; the model output is in the pipeline's prediction type.
    """
    process = adapter.forward_process
    x_t = process.noise(x0, noise, timesteps)
    out = adapter.model_output(denoiser, x_t, timesteps.to(adapter.device), embeds)
    return process.clean_prediction(out, x_t, timesteps), x_t, out
