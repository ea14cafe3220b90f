"""What samplers and trainers know of a diffusers pipeline: the generator adapter contract and its shared parts.

An adapter is the one place that knows how a pipeline encodes prompts, applies classifier-free guidance, runs
its denoiser (a UNet or a transformer) and decodes latents; rollouts, trainers and noise optimisation only see
tensors. Each family (SD 1.x/2.x, SDXL, SD3, Flux, the video UNets, Wan) is one subclass; it also names its sampling policy (DDIM-η
for ε/v UNets, the flow-matching SDE for rectified-flow transformers), its forward process (for losses on noised
clean samples) and its LoRA targets, so generic code never branches on the family. Adapters drive the
pipeline's own modules, so LoRA adapters attached to the denoiser, attention processors and offloading keep
working.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from mmalign.models.ddim import StepOutput

__all__ = ["GeneratorAdapter", "PromptEmbeds", "SamplingPolicy"]


class SamplingPolicy(Protocol):
    """A sampler whose steps have log-probs: DDIM-η (``DDIMPolicy``) or the flow-matching SDE.

    ``step`` samples ``x_{t-1}`` or, given ``prev_sample``, re-scores that step, with one code path; ``timesteps``
    are what the denoiser receives at each step; ``stds`` each step's noise std (0 where it is deterministic).
    """

    num_steps: int
    timesteps: torch.Tensor
    stds: list[float]

    @property
    def stochastic(self) -> bool: ...

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, index: int,
             prev_sample: torch.Tensor | None = None, generator: torch.Generator | None = None) -> StepOutput: ...


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch, one row per sample in every tensor field: ``cond`` and ``uncond``
    ``(B, L, D)``. Families with more conditioning (pooled embeddings, size ids) subclass it with more fields;
    slicing and moving apply to every field, so trajectories store and select any family's conditioning."""

    cond: torch.Tensor
    uncond: torch.Tensor | None

    def _map(self, fn) -> PromptEmbeds:
        return type(self)(**{f.name: None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self)})

    def __getitem__(self, index) -> PromptEmbeds:
        return self._map(lambda v: v[index])

    def to(self, device) -> PromptEmbeds:
        return self._map(lambda v: v.to(device))

    @property
    def device(self) -> torch.device:
        return self.cond.device


class GeneratorAdapter:
    """Prompts → conditioning, (latents, t) → guided model output, latents → pixels, for one pipeline family.

    Subclasses set ``denoiser_name`` (the pipeline component that is trained), ``frozen_names`` (components that
    never train), ``lora_targets`` and implement ``encode_prompts``, ``model_output``, ``decode``, ``make_policy``
    and ``forward_process``; ``latent_shape`` may need overriding where latents are packed.
    """

    denoiser_name: ClassVar[str] = "unet"
    frozen_names: ClassVar[tuple[str, ...]] = ("vae", "text_encoder")
    #: default LoRA target modules of the denoiser (``LoRAConfig.target_modules: null``)
    lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]
    #: exported LoRA keys in diffusers' attention-processor names (``lora.down``/``lora.up``, as UNet LoRA
    #: loaders take them) rather than peft's (``lora_A``/``lora_B``, which transformer loaders such as SD3's and
    #: Flux's take as they are)
    lora_diffusers_keys: ClassVar[bool] = True

    def __init__(self, pipeline, guidance_scale: float = 5.0, negative_prompt: str = "") -> None:
        missing = [name for name in (self.denoiser_name, "vae") if getattr(pipeline, name, None) is None]
        if missing:
            raise TypeError(f"pipeline: expected a {type(self).__name__.removesuffix('Adapter')} pipeline with "
                            f"{' and '.join(missing)}, got {type(pipeline).__name__}")
        if not guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale: expected ≥ 1 (1 disables guidance), got {guidance_scale!r}")
        self.pipeline = pipeline
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt

    # ----------------------------------------------------------------------------------------- components
    @property
    def denoiser(self) -> torch.nn.Module:
        """The module the trainers train: the pipeline's UNet or transformer."""
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def frozen_modules(self) -> list[torch.nn.Module]:
        """The pipeline's modules that stay frozen (VAE, text encoders), those the pipeline has."""
        return [m for name in self.frozen_names if (m := getattr(self.pipeline, name, None)) is not None]

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def scheduler_config(self):
        return self.pipeline.scheduler.config

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """``(C, h, w)`` of the latents at the pipeline's default resolution (video families: ``(C, F, h, w)``)."""
        config = self.denoiser.config
        return (config.in_channels, config.sample_size, config.sample_size)

    def initial_noise(self, metadata: Sequence[dict[str, Any]], generator: torch.Generator | None = None
                      ) -> torch.Tensor:
        """``(len(metadata), *latent_shape)`` noise that samples start from, one per sample's ``metadata``, drawn
        with ``generator`` on its device (else the adapter's): standard normal here; video adapters may make it
        travel with each sample's stated motion. Rollouts, the trainers' forward-process noise and ReNO all
        draw through it, so training sees the noise sampling starts from."""
        device = generator.device if generator is not None else self.device
        shape = (len(metadata), *self.latent_shape)
        return torch.randn(shape, generator=generator, device=device).to(self.device)

    # ------------------------------------------------------------------------------------------- family
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        raise NotImplementedError

    def model_output(self, denoiser: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor | int,
                     embeds: PromptEmbeds) -> torch.Tensor:
        """The guided output of ``denoiser`` at ``latents`` (``timestep`` a scalar or ``(B,)``), in the model's
        prediction type (ε, v or flow velocity)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B,3,H,W)`` pixels in [0, 1] (differentiable), in at least fp32; video families ``(B,T,3,H,W)``."""
        raise NotImplementedError

    def make_policy(self, num_steps: int, eta: float) -> SamplingPolicy:
        """The sampling policy with per-step log-probs; ``eta`` is its stochasticity (0: the deterministic
        sampler, whose steps have no log-prob)."""
        raise NotImplementedError

    @property
    def forward_process(self) -> Any:
        """How clean latents are noised at training timesteps, and the model's regression target there."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- shared
    def guided(self, run, x: torch.Tensor, timestep: torch.Tensor | int, cond: dict, uncond: dict) -> torch.Tensor:
        """``u + w·(c − u)`` from ``run(x, timestep, **kwargs)`` with one batched call over both halves (a
        ``(B,)`` timestep is repeated for them); one call on ``cond`` alone when guidance is off."""
        if self.guidance_scale == 1.0:
            return run(x, timestep, **cond)
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 1:
            timestep = torch.cat([timestep, timestep])
        both = run(torch.cat([x, x]), timestep, **{k: torch.cat([uncond[k], cond[k]]) for k in cond})
        u, c = both.chunk(2)
        return u + self.guidance_scale * (c - u)

    def export_lora(self, denoiser: torch.nn.Module, folder) -> None:
        """Write ``denoiser``'s adapters in diffusers' LoRA format, so ``pipe.load_lora_weights(folder)`` on the
        same pipeline class loads them, with rank and alpha stored as metadata (the loaded scale is the trained
        one)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(denoiser)
        if self.lora_diffusers_keys:
            layers = convert_state_dict_to_diffusers(layers)
        metadata = denoiser.peft_config["default"].to_dict()
        type(self.pipeline).save_lora_weights(
            folder, safe_serialization=True,
            **{f"{self.denoiser_name}_lora_layers": layers, f"{self.denoiser_name}_lora_adapter_metadata": metadata},
        )
