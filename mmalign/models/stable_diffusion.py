"""Generator adapter for Stable Diffusion 1.x/2.x pipelines (ε or v prediction) on the DDIM-η policy."""

from __future__ import annotations

from functools import cached_property

import torch

from mmalign.models.adapter import GeneratorAdapter, PromptEmbeds
from mmalign.models.ddim import DDIMPolicy
from mmalign.models.forward_process import DDPMProcess

__all__ = ["StableDiffusionAdapter", "decode_with_vae"]


def decode_with_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """``(B,3,H,W)`` pixels in [0, 1] (differentiable), in at least fp32, from latents scaled by the VAE's
    ``scaling_factor`` (and shifted by its ``shift_factor`` where it has one, as SD3's and Flux's do)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return (image.to(torch.promote_types(image.dtype, torch.float32)) / 2 + 0.5).clamp(0, 1)


class StableDiffusionAdapter(GeneratorAdapter):
    """Prompts → CLIP text embeddings, (latents, t) → guided UNet output, latents → pixels, for an SD pipeline."""

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Conditional and unconditional text embeddings, through the pipeline's own ``encode_prompt``."""
        cond, uncond = self.pipeline.encode_prompt(
            prompts, self.device, 1, True, negative_prompt=[self.negative_prompt] * len(prompts)
        )
        return PromptEmbeds(cond, uncond)

    def model_output(self, denoiser: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor | int,
                     embeds: PromptEmbeds) -> torch.Tensor:
        """The guided UNet output ``u + w·(c − u)`` in the model's prediction type (ε or v)."""
        dtype = next(denoiser.parameters()).dtype

        def run(x, t, encoder_hidden_states):
            return denoiser(x, t, encoder_hidden_states=encoder_hidden_states).sample

        return self.guided(run, latents.to(dtype), timestep, {"encoder_hidden_states": embeds.cond.to(dtype)},
                           {"encoder_hidden_states": embeds.uncond.to(dtype)})

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_with_vae(self.pipeline.vae, latents)

    def make_policy(self, num_steps: int, eta: float) -> DDIMPolicy:
        return DDIMPolicy(self.scheduler_config, num_steps, eta)

    @cached_property
    def forward_process(self) -> DDPMProcess:
        return DDPMProcess(self.scheduler_config)
