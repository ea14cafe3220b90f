"""The flow-matching ODE made an SDE (Flow-GRPO) as a stochastic policy: every step returns, or re-scores, its
log-probability.

Rectified-flow transformers (SD3, Flux) sample by Euler steps of the ODE ``dx = v·dσ`` from σ = 1 (noise) to
σ = 0. Flow-GRPO (Liu et al., 2025) replaces it by the SDE with the same marginals and discretises it with
Euler–Maruyama; for ``σ → σ'`` (``dt = σ' − σ < 0``), velocity ``v`` and noise level ``a``:

    s_t = a·sqrt(σ/(1 − σ))          (σ' instead of σ in the denominator where σ = 1)
    μ   = x + [v + s_t²/(2σ)·(x + (1 − σ)·v)]·dt
    x'  ~ N(μ, (s_t·sqrt(−dt))² I)

One function samples and re-scores, as ``DDIMPolicy`` does, with the same conventions: means in at least fp32, the
log-probability summed over latent dimensions in fp64. ``a = 0`` is the Euler ODE of diffusers'
``FlowMatchEulerDiscreteScheduler.step`` (``x + dt·v`` with its fp32 ``dt``), deterministic, log-probs NaN.

The last step (σ' = 0) keeps its noise, ``std = a·σ/sqrt(1 − σ)`` at the last σ > 0, as Flow-GRPO samples it: every
step has a density when ``a > 0``, so none has to be left out of the likelihood. The sigmas are the scheduler's own
(``set_timesteps`` with the pipeline's shift, or dynamic shifting with ``mu``, and the pipeline's ``sigmas``).
"""

from __future__ import annotations

import math

import torch

from mmalign.models.ddim import StepOutput, gaussian_step

__all__ = ["FlowSDEPolicy", "dynamic_shift_mu", "scheduler_policy"]


def dynamic_shift_mu(scheduler_config, image_seq_len: int) -> float:
    """The ``mu`` of resolution-dependent shifting for ``image_seq_len`` image tokens, as SD3's and Flux's pipelines
    compute it (a line through ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler_config
    return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                           c.get("base_shift", 0.5), c.get("max_shift", 1.15))


class FlowSDEPolicy:
    """Flow-GRPO's SDE on the sigmas of a ``FlowMatchEulerDiscreteScheduler`` config, with per-step log-probs.

    Args:
        scheduler_config: the pipeline's flow-matching scheduler config (shift, dynamic shifting, …).
        num_steps: sampling steps.
        noise_level: ``a``; > 0 for the steps to have a density (0.7 in Flow-GRPO), 0 for the deterministic Euler
            ODE (evaluation, noise optimisation), whose steps have no log-prob (NaN).
        mu: the dynamic-shifting parameter (required when the config has ``use_dynamic_shifting``; the adapter
            computes it from the image sequence length, ``dynamic_shift_mu``).
        sigmas: custom sigmas passed to ``set_timesteps`` (Flux's pipeline passes ``linspace(1, 1/n, n)``).
        timesteps: what the denoiser receives at each step where that is not σ·num_train_timesteps (the integer
            timesteps of a multistep flow scheduler, ``scheduler_policy``).
    """

    def __init__(self, scheduler_config, num_steps: int, noise_level: float = 0.7, mu: float | None = None,
                 sigmas=None, timesteps: torch.Tensor | None = None) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not noise_level >= 0:
            raise ValueError(f"noise_level: expected a ≥ 0 (> 0 for a stochastic policy with log-probs), got "
                             f"{noise_level!r}")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps: expected at least 1, got {num_steps!r}")
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        config = self.scheduler.config
        for flag in ("invert_sigmas", "stochastic_sampling"):
            if config.get(flag):
                raise ValueError(f"scheduler_config: {flag}=True is not supported by the flow SDE policy")
        if config.use_dynamic_shifting and mu is None:
            raise ValueError("mu: the scheduler uses dynamic shifting, so mu (from the image sequence length) is "
                             "required, got None")
        self.scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
        self.noise_level, self.num_steps = float(noise_level), num_steps
        self.sigmas = self.scheduler.sigmas.clone().cpu()  # (T+1,) fp32, ending at 0
        # σ·num_train_timesteps unless given: what the denoiser gets
        self.timesteps = (self.scheduler.timesteps if timesteps is None else torch.as_tensor(timesteps)).clone().cpu()
        if self.timesteps.shape != (num_steps,):
            raise ValueError(f"timesteps: expected {num_steps} values, got shape {tuple(self.timesteps.shape)}")
        self._scales = [self._scale(i) for i in range(num_steps)]
        self.stds = [s * math.sqrt(float(self.sigmas[i]) - float(self.sigmas[i + 1])) for i, s in enumerate(self._scales)]
        if self.stochastic and min(self.stds) <= 0:
            raise ValueError(f"sigmas: every step must decrease σ for the SDE to have a density, got "
                             f"{self.sigmas.tolist()}")

    @property
    def stochastic(self) -> bool:
        """Whether the steps sample (a > 0) and so have log-probs; the Euler ODE's are NaN."""
        return self.noise_level > 0

    def _scale(self, index: int) -> float:
        """``s_t = a·sqrt(σ/(1 − σ))``, with the next sigma in the denominator where σ = 1 (it would be infinite)."""
        sigma, following = float(self.sigmas[index]), float(self.sigmas[index + 1])
        return self.noise_level * math.sqrt(sigma / (1 - (following if sigma == 1 else sigma)))

    def predictions(self, model_output: torch.Tensor, sample: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x̂0, ε̂) = (x − σ·v, x + (1 − σ)·v)`` in at least fp32: the ends of the straight path through ``x``."""
        dtype = torch.promote_types(sample.dtype, torch.float32)
        x, v = sample.to(dtype), model_output.to(dtype)
        sigma = float(self.sigmas[index])
        return x - sigma * v, x + (1 - sigma) * v

    def step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        index: int,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """Take step ``index`` (sampling ``x'``) or, given ``prev_sample``, re-score that step."""
        dtype = torch.promote_types(sample.dtype, torch.float32)
        x, v = sample.to(dtype), model_output.to(dtype)
        sigma = float(self.sigmas[index])
        dt = (self.sigmas[index + 1] - self.sigmas[index]).to(x.device, dtype)  # fp32 as the scheduler's, then cast
        drift = self._scales[index] ** 2 / (2 * sigma)
        mean = x + (v + drift * (x + (1 - sigma) * v)) * dt  # a = 0: x + v·dt, the scheduler's Euler step
        return gaussian_step(mean, self.stds[index], prev_sample, generator)


def scheduler_policy(scheduler, num_steps: int, noise_level: float, mu: float | None = None) -> FlowSDEPolicy:
    """The flow SDE on the sigmas and timesteps a pipeline's own ``scheduler`` sets for ``num_steps`` steps.

    A ``FlowMatchEulerDiscreteScheduler``'s config is read as it is. Another flow scheduler (UniPC or DPM-Solver with
    ``use_flow_sigmas``, as Wan ships) runs its own ``set_timesteps``; the SDE takes its sigmas (ending at 0, so on
    an unshifted Euler config) and the timesteps it gives the denoiser. At noise level 0 that is the Euler ODE on the
    multistep solver's schedule, not the solver itself.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowSDEPolicy(scheduler.config, num_steps, noise_level, mu=mu)
    config = scheduler.config
    if not config.get("use_flow_sigmas"):
        raise ValueError(f"scheduler: expected a flow-matching scheduler (FlowMatchEulerDiscreteScheduler, or one with "
                         f"use_flow_sigmas), got {type(scheduler).__name__} without use_flow_sigmas")
    own = type(scheduler).from_config(config)
    own.set_timesteps(num_steps)
    sigmas = own.sigmas.float().cpu()
    if sigmas.shape != (num_steps + 1,) or float(sigmas[-1]) != 0:
        raise ValueError(f"scheduler: {type(scheduler).__name__} sets {len(sigmas)} sigmas ending at "
                         f"{float(sigmas[-1]):g}; the flow SDE needs {num_steps} steps ending at σ = 0 "
                         "(final_sigmas_type='zero')")
    euler = {"num_train_timesteps": config.num_train_timesteps, "shift": 1.0}
    return FlowSDEPolicy(euler, num_steps, noise_level, sigmas=sigmas[:-1].numpy(), timesteps=own.timesteps)
