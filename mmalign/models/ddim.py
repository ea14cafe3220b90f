"""DDIM with η > 0 as a stochastic policy: every step returns, or re-scores, its log-probability.

diffusers' ``scheduler.step`` is a black box that samples; diffusion RL also needs ``log π(x_{t-1} | x_t)`` of
the step that was taken, under the sampling weights (PPO's old policy), the current weights and the reference.
One function does both, so sampling and re-scoring cannot drift apart:

    σ_t = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_prev)
    μ   = sqrt(ᾱ_prev)·x̂0 + sqrt(1 − ᾱ_prev − σ_t²)·ε̂
    x_{t-1} ~ N(μ, σ_t² I)

Conventions: the mean is computed in at least fp32 whatever the model dtype (fp64 inputs stay fp64, which
the finite-difference tests use), and the log-probability is the **sum over
latent dimensions** (the true log-density of the step, as the PRDP and DDPO papers define it), accumulated in
fp64 so that differences of large sums keep their precision. Code derived from DDPO averages over dimensions
instead, which is why its clip range is 1e-4; with sums, clip ranges and β are in nats per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["StepOutput", "DDIMPolicy", "alphas_cumprod", "gaussian_log_prob", "gaussian_step", "predictions_from_output"]


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # (B, C, h, w) fp32 (fp64 for fp64 inputs)
    log_prob: torch.Tensor  # (B,) fp64, summed over dimensions
    mean: torch.Tensor  # (B, C, h, w), the dtype of prev_sample
    std: float


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """``(B,)`` log N(x; mean, std² I), summed over all but the first dimension, in fp64."""
    z = (x.double() - mean.double()) / std
    dims = x[0].numel()
    return -0.5 * z.pow(2).flatten(1).sum(1) - dims * (math.log(std) + 0.5 * math.log(2 * math.pi))


def gaussian_step(mean: torch.Tensor, std: float, prev_sample: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> StepOutput:
    """The step ``x' ~ N(mean, std² I)`` of a policy: sampled from ``generator``, or ``prev_sample`` re-scored, with
    its log-prob (NaN where ``std`` is 0: a deterministic step is a point mass with no density)."""
    if prev_sample is None and std == 0:
        prev_sample = mean
    elif prev_sample is None:
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.to(mean.dtype)
    if std == 0:
        log_prob = torch.full((len(mean),), float("nan"), dtype=torch.float64, device=mean.device)
    else:
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return StepOutput(prev_sample, log_prob, mean, std)


def alphas_cumprod(scheduler_config) -> torch.Tensor:
    """``(num_train_timesteps,)`` fp64 ᾱ_t of a diffusers scheduler config (its betas, read as DDIM reads them)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler_config).alphas_cumprod.double()


def predictions_from_output(
    model_output: torch.Tensor, sample: torch.Tensor, alpha: float | torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂0, ε̂)`` in at least fp32 from a model output in ``prediction_type`` at ``x_t = sample`` with ᾱ_t
    ``alpha`` (a float, or a tensor broadcasting against the sample for per-sample timesteps)."""
    dtype = torch.promote_types(sample.dtype, torch.float32)
    out, x = model_output.to(dtype), sample.to(dtype)
    a = torch.as_tensor(alpha, dtype=dtype, device=x.device)
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
        eps = a.sqrt() * out + (1 - a).sqrt() * x
    elif prediction_type == "sample":
        x0 = out
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    else:
        raise ValueError(f"prediction_type: expected epsilon, v_prediction or sample, got {prediction_type!r}")
    return x0, eps


class DDIMPolicy:
    """The DDIM-η sampling schedule of a diffusers DDIM-compatible scheduler, with per-step log-probs.

    Args:
        scheduler_config: any diffusers scheduler config with ``num_train_timesteps`` and betas; it is read
            through ``DDIMScheduler.from_config`` so ``timestep_spacing``/``steps_offset`` mean what they do there.
        num_steps: sampling steps.
        eta: DDIM's η; > 0 for the steps to have a density (a policy), 0 for deterministic DDIM (the sampler
            of noise optimisation and of evaluation at the ODE limit), whose steps have no log-prob (NaN).
    """

    def __init__(self, scheduler_config, num_steps: int, eta: float = 1.0) -> None:
        from diffusers import DDIMScheduler

        if not eta >= 0:
            raise ValueError(f"eta: expected η ≥ 0 (> 0 for a stochastic policy with log-probs), got {eta!r}")
        if num_steps < 1:
            raise ValueError(f"num_steps: expected at least 1, got {num_steps!r}")
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        if self.scheduler.config.thresholding:
            raise ValueError("scheduler_config: dynamic thresholding is not supported by the log-prob sampler")
        self.scheduler.set_timesteps(num_steps)
        self.eta, self.num_steps = float(eta), num_steps
        self.timesteps = self.scheduler.timesteps.clone()
        self.prediction_type = self.scheduler.config.prediction_type
        stride = self.scheduler.config.num_train_timesteps // num_steps
        alphas = self.scheduler.alphas_cumprod.double()
        final = float(self.scheduler.final_alpha_cumprod)
        self._alpha = [float(alphas[t]) for t in self.timesteps]
        self._alpha_prev = [float(alphas[t - stride]) if t - stride >= 0 else final for t in self.timesteps]
        self.stds = [self._std(i) for i in range(num_steps)]
        if self.stochastic and min(self.stds) <= 0:
            raise ValueError(
                "scheduler_config: the last DDIM step is deterministic (set_alpha_to_one=True gives ᾱ_prev = 1); "
                "set set_alpha_to_one=False, as Stable Diffusion's scheduler does, so every step has a density"
            )

    @property
    def stochastic(self) -> bool:
        """Whether the steps sample (η > 0) and so have log-probs; deterministic DDIM's are NaN."""
        return self.eta > 0

    def _std(self, index: int) -> float:
        a, a_prev = self._alpha[index], self._alpha_prev[index]
        variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        return self.eta * math.sqrt(max(variance, 0.0))

    def predictions(self, model_output: torch.Tensor, sample: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x̂0, ε̂)`` in at least fp32 from the model's output in its prediction type."""
        x0, eps = predictions_from_output(model_output, sample, self._alpha[index], self.prediction_type)
        if self.scheduler.config.clip_sample:
            limit = self.scheduler.config.clip_sample_range
            x0 = x0.clamp(-limit, limit)
        return x0, eps

    def step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        index: int,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """Take step ``index`` (sampling ``x_{t-1}``) or, given ``prev_sample``, re-score that step."""
        x0, eps = self.predictions(model_output, sample, index)
        a_prev, std = self._alpha_prev[index], self.stds[index]
        mean = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - std**2, 0.0)) * eps
        return gaussian_step(mean, std, prev_sample, generator)
