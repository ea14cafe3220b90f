"""Generator adapter for Stable Diffusion 1.x/2.x pipelines (ε or v prediction).

The adapter is the one place that knows how a pipeline encodes prompts, applies classifier-free guidance,
and decodes latents; trainers and samplers only see tensors. It drives the pipeline's own modules, so LoRA
adapters attached to the UNet, attention processors and offloading all keep working.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PromptEmbeds", "StableDiffusionAdapter"]


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch: ``cond`` and ``uncond`` are ``(B, L, D)``."""

    cond: torch.Tensor
    uncond: torch.Tensor

    def __getitem__(self, index) -> PromptEmbeds:
        return PromptEmbeds(self.cond[index], self.uncond[index])

    def to(self, device) -> PromptEmbeds:
        return PromptEmbeds(self.cond.to(device), self.uncond.to(device))


class StableDiffusionAdapter:
    """Prompts → embeddings, (latents, t) → guided model output, latents → pixels, for an SD pipeline."""

    def __init__(self, pipeline, guidance_scale: float = 5.0, negative_prompt: str = "") -> None:
        if not hasattr(pipeline, "unet") or not hasattr(pipeline, "vae"):
            raise TypeError(f"pipeline: expected a Stable Diffusion pipeline (unet + vae), got {type(pipeline).__name__}")
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale: expected ≥ 1 (1 disables guidance), got {guidance_scale!r}")
        self.pipeline = pipeline
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def device(self) -> torch.device:
        return self.pipeline.unet.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents at the pipeline's default resolution."""
        config = self.pipeline.unet.config
        return (config.in_channels, config.sample_size, config.sample_size)

    @property
    def scheduler_config(self):
        return self.pipeline.scheduler.config

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Conditional and unconditional text embeddings, through the pipeline's own ``encode_prompt``."""
        cond, uncond = self.pipeline.encode_prompt(
            prompts, self.device, 1, True, negative_prompt=[self.negative_prompt] * len(prompts)
        )
        return PromptEmbeds(cond, uncond)

    def model_output(
        self, unet: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor | int, embeds: PromptEmbeds
    ) -> torch.Tensor:
        """The guided UNet output ``u + w·(c − u)`` in the model's prediction type (ε or v); ``timestep`` is a
        scalar or ``(B,)`` per sample."""
        dtype = next(unet.parameters()).dtype
        x = latents.to(dtype)
        if self.guidance_scale == 1.0:
            return unet(x, timestep, encoder_hidden_states=embeds.cond.to(dtype)).sample
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 1:  # per-sample timesteps, for both halves
            timestep = torch.cat([timestep, timestep])
        both = unet(
            torch.cat([x, x]), timestep, encoder_hidden_states=torch.cat([embeds.uncond, embeds.cond]).to(dtype)
        ).sample
        uncond, cond = both.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B,3,H,W)`` pixels in [0, 1] (differentiable), in at least fp32, from latents."""
        vae = self.pipeline.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (image.to(torch.promote_types(image.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1)
