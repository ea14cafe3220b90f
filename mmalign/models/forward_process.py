"""The forward (noising) process of a generator family: how a clean latent becomes ``x_t``, what the model is
trained to predict there, and how a prediction gives back ``x̂0``.

Losses on noised clean samples need it (Direct-Align's one-step prior, DiffusionNFT's forward-process loss), as
does anything that picks training timesteps by a fraction of the noise range. Two families:

- ``DDPMProcess``: ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε`` at integer training timesteps; the target is ε, v or x0 by
  the scheduler's ``prediction_type``.
- ``FlowProcess``: rectified flow, ``x_t = (1−σ)·x0 + σ·ε`` with ``σ = t/1000``; the target is the velocity
  ``ε − x0``.

Timesteps are the values the denoiser receives (``(B,)``), so ``adapter.model_output(..., timestep, ...)`` takes
them unchanged; every computation is in at least fp32.
"""

from __future__ import annotations

import torch

from mmalign.media import per_sample
from mmalign.models.ddim import alphas_cumprod, predictions_from_output

__all__ = ["DDPMProcess", "FlowProcess"]


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` → ``(B, 1, …)`` broadcasting against ``like``, in ``like``'s dtype and device."""
    return per_sample(values.to(like.device, like.dtype), like)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


class DDPMProcess:
    """The variance-preserving process of a DDPM-trained UNet (SD 1.x/2.x, SDXL), read from its scheduler config."""

    def __init__(self, scheduler_config) -> None:
        self.alphas = alphas_cumprod(scheduler_config)
        self.num_train_timesteps = len(self.alphas)
        self.prediction_type = scheduler_config.prediction_type

    def sample_timesteps(self, n: int, low: float = 0.0, high: float = 1.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n,)`` integer training timesteps drawn uniformly from the fractions ``[low, high]`` of the noise range
        (0: cleanest, 1: pure noise)."""
        last = self.num_train_timesteps - 1
        return torch.randint(int(low * last), int(high * last) + 1, (n,), generator=generator)

    def _alpha(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _column(self.alphas[timesteps.cpu().long()], like)

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        x0, eps = _float(x0), _float(eps).to(x0)
        a = self._alpha(timesteps, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model predicts at ``x_t = noise(x0, eps, t)``: ε, v = √ᾱ·ε − √(1−ᾱ)·x0, or x0."""
        x0, eps = _float(x0), _float(eps).to(x0)
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            a = self._alpha(timesteps, x0)
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        if self.prediction_type == "sample":
            return x0
        raise ValueError(f"prediction_type: expected epsilon, v_prediction or sample, got {self.prediction_type!r}")

    def clean_prediction(self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x̂0`` from the model's output at ``x_t``."""
        x0, _ = predictions_from_output(model_output, x_t, self._alpha(timesteps, _float(x_t)), self.prediction_type)
        return x0


class FlowProcess:
    """Rectified flow on ``σ = t / num_train_timesteps`` (SD3, Flux, Wan): straight paths from data to noise."""

    prediction_type = "flow"

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.num_train_timesteps = num_train_timesteps

    def sample_timesteps(self, n: int, low: float = 0.0, high: float = 1.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n,)`` timesteps ``σ·num_train_timesteps`` with σ uniform in ``[low, high]``."""
        return (low + (high - low) * torch.rand(n, generator=generator)) * self.num_train_timesteps

    def _sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _column(timesteps.float() / self.num_train_timesteps, like)

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        x0, eps = _float(x0), _float(eps).to(x0)
        s = self._sigma(timesteps, x0)
        return (1 - s) * x0 + s * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity ``dx_t/dσ = ε − x0``."""
        return _float(eps).to(_float(x0)) - _float(x0)

    def clean_prediction(self, model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        x_t = _float(x_t)
        return x_t - self._sigma(timesteps, x_t) * model_output.to(x_t)
