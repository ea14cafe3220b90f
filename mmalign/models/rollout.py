"""Sampling trajectories with log-probs, re-scoring their steps under other weights, and sampling with
gradients through chosen steps (for rewards back-propagated through the sampler, and noise optimisation)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from mmalign.models.ddim import DDIMPolicy, StepOutput
from mmalign.models.stable_diffusion import StableDiffusionAdapter
from mmalign.models.trajectory import Trajectory

__all__ = [
    "GradSample",
    "backward_per_step",
    "backward_weighted_log_probs",
    "sample_trajectories",
    "sample_with_grad",
    "step_log_probs",
    "trajectory_log_probs",
]


@torch.no_grad()
def sample_trajectories(
    adapter: StableDiffusionAdapter,
    policy: DDIMPolicy,
    prompts: Sequence[str],
    metadata: Sequence[dict[str, Any]] | None = None,
    generator: torch.Generator | None = None,
    unet: torch.nn.Module | None = None,
    progress: bool = False,
    group_size: int = 1,
) -> Trajectory:
    """Sample one trajectory per prompt with ``unet`` (default: the pipeline's), storing every step's log-prob.

    The initial noise and every step's noise come from ``generator``, so a seeded generator reproduces the batch.
    With ``group_size`` k, each run of k consecutive samples starts from one initial noise: the initial noise is
    not an action of the policy (it has no log-prob), so within such a group every reward difference comes from
    the steps the policy is credited with.
    """
    unet = adapter.unet if unet is None else unet
    prompts = list(prompts)
    if not isinstance(group_size, int) or group_size < 1 or len(prompts) % group_size:
        raise ValueError(f"group_size: expected a positive int dividing the {len(prompts)} prompts, got {group_size!r}")
    embeds = adapter.encode_prompts(prompts)
    device = adapter.device
    shape = (len(prompts) // group_size, *adapter.latent_shape)
    noise_device = generator.device if generator is not None else device
    x = torch.randn(shape, generator=generator, device=noise_device).to(device).repeat_interleave(group_size, 0)
    latents, log_probs = [x], []
    for index, t in enumerate(tqdm(policy.timesteps, desc="sampling", leave=False, disable=not progress)):
        out = adapter.model_output(unet, x, t, embeds)
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
        metadata=[dict(m) for m in (metadata or [{} for _ in prompts])],
        pixels=pixels,
    )


def step_log_probs(
    adapter: StableDiffusionAdapter, policy: DDIMPolicy, unet: torch.nn.Module, trajectory: Trajectory, index: int
) -> torch.Tensor:
    """``(B,)`` fp64 log-probs of step ``index`` of each stored trajectory under ``unet`` (with autograd)."""
    x = trajectory.latents[:, index]
    out = adapter.model_output(unet, x, trajectory.timesteps[index], trajectory.embeds)
    return policy.step(out, x, index, prev_sample=trajectory.latents[:, index + 1]).log_prob


@torch.no_grad()
def trajectory_log_probs(
    adapter: StableDiffusionAdapter, policy: DDIMPolicy, unet: torch.nn.Module, trajectory: Trajectory
) -> torch.Tensor:
    """``(B, T)`` fp64 log-probs of every step under ``unet``, without gradients (reference or current)."""
    return torch.stack(
        [step_log_probs(adapter, policy, unet, trajectory, i) for i in range(trajectory.num_steps)], 1
    )


def backward_per_step(
    adapter: StableDiffusionAdapter,
    policy: DDIMPolicy,
    unet: torch.nn.Module,
    trajectory: Trajectory,
    mask: torch.Tensor,
    loss: Callable[[int, torch.Tensor, StepOutput], torch.Tensor],
    no_sync=None,
) -> None:
    """Back-propagate ``loss(t, rows, step)`` for every step ``t`` with ``mask[:, t]`` set, one timestep at a time.

    ``rows`` are the indices where ``mask[:, t]`` holds and ``step`` re-scores their stored step ``t`` under ``unet``
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
            out = adapter.model_output(unet, x, part.timesteps[index], part.embeds)
            step = policy.step(out, x, index, prev_sample=part.latents[:, index + 1])
            loss(index, rows, step).float().backward()


def backward_weighted_log_probs(
    adapter: StableDiffusionAdapter,
    policy: DDIMPolicy,
    unet: torch.nn.Module,
    trajectory: Trajectory,
    coef: torch.Tensor,
    no_sync=None,
) -> None:
    """Accumulate ``∇ Σ_{b,t} coef[b,t]·log π(step b,t)`` into the gradients (``backward_per_step`` over the
    non-zero coefficients): how a loss that depends on the network only through log-probs is trained."""

    def weighted(index: int, rows: torch.Tensor, step: StepOutput) -> torch.Tensor:
        return (coef[rows.to(coef.device), index].to(step.log_prob) * step.log_prob).sum()

    backward_per_step(adapter, policy, unet, trajectory, coef.ne(0), weighted, no_sync)


class GradSample(NamedTuple):
    """The end of a differentiable rollout: ``latents`` ``(B, C, h, w)`` x_0 and ``pixels`` ``(B, 3, H, W)``."""

    latents: torch.Tensor
    pixels: torch.Tensor


def sample_with_grad(
    adapter: StableDiffusionAdapter,
    policy: DDIMPolicy,
    prompts: Sequence[str],
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    unet: torch.nn.Module | None = None,
    grad_steps: int | None = None,
    gradient_checkpointing: bool = False,
) -> GradSample:
    """Sample from ``noise`` ``(B, C, h, w)`` with autograd through the last ``grad_steps`` steps (None: all).

    The earlier steps run without a graph and their output is detached: DRaFT-K's truncation (K = 1 is often
    enough), or AlignProp's when the caller draws K. With all steps kept and ``noise.requires_grad``, the
    gradient reaches the initial noise (ReNO). Each step's noise comes from ``generator`` and is fixed given it,
    so ``x_{t-1} = μ_θ(x_t) + σ_t·z`` is differentiable in θ and x_t (the reparameterised DDIM-η step).
    ``gradient_checkpointing`` recomputes each kept UNet call in backward instead of storing its activations:
    memory of one step's activations instead of K.
    """
    unet = adapter.unet if unet is None else unet
    prompts = list(prompts)
    if noise.shape != (len(prompts), *adapter.latent_shape):
        raise ValueError(f"noise: expected shape {(len(prompts), *adapter.latent_shape)}, got {tuple(noise.shape)}")
    kept = policy.num_steps if grad_steps is None else grad_steps
    if not isinstance(kept, int) or not 0 <= kept <= policy.num_steps:
        raise ValueError(f"grad_steps: expected None or an int in [0, {policy.num_steps}], got {grad_steps!r}")
    embeds = adapter.encode_prompts(prompts)
    x = noise.to(adapter.device)
    first_kept = policy.num_steps - kept
    for index, t in enumerate(policy.timesteps):
        with torch.enable_grad() if index >= first_kept else torch.no_grad():
            if index >= first_kept and gradient_checkpointing:
                out = checkpoint(adapter.model_output, unet, x, t, embeds, use_reentrant=False)
            else:
                out = adapter.model_output(unet, x, t, embeds)
            x = policy.step(out, x, index, generator=generator).prev_sample
        if index < first_kept:
            x = x.detach()
    return GradSample(x, adapter.decode(x))
