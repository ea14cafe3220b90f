"""Sampling trajectories with log-probs, and re-scoring their steps under other weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from mmalign.models.stable_diffusion import StableDiffusionAdapter
from mmalign.trainers.sampler import DDIMPolicy
from mmalign.trainers.trajectory import Trajectory

__all__ = ["backward_weighted_log_probs", "sample_trajectories", "step_log_probs", "trajectory_log_probs"]


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


def backward_weighted_log_probs(
    adapter: StableDiffusionAdapter,
    policy: DDIMPolicy,
    unet: torch.nn.Module,
    trajectory: Trajectory,
    coef: torch.Tensor,
    no_sync=None,
) -> None:
    """Accumulate ``∇ Σ_{b,t} coef[b,t]·log π(step b,t)`` into the gradients, one timestep at a time.

    Only one UNet graph is alive at a time, so memory does not grow with the number of steps. ``no_sync``
    (e.g. ``accelerator.no_sync(model)``) is entered for every step but the last, so distributed gradients are
    all-reduced once per update rather than once per timestep. Steps whose coefficients are all zero are skipped.
    """
    from contextlib import nullcontext

    steps = [t for t in range(trajectory.num_steps) if bool(coef[:, t].ne(0).any())]
    for position, index in enumerate(steps):
        context = no_sync() if no_sync is not None and position < len(steps) - 1 else nullcontext()
        with context:
            log_prob = step_log_probs(adapter, policy, unet, trajectory, index)
            (coef[:, index].to(log_prob) * log_prob).sum().float().backward()
