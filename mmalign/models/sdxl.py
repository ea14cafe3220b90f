"""Generator adapter for Stable Diffusion XL pipelines: SD's DDIM-η policy and DDPM forward process, with SDXL's
two text encoders and its added conditioning (the pooled text embedding and the size/crop time ids)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmalign.models.adapter import PromptEmbeds
from mmalign.models.stable_diffusion import StableDiffusionAdapter

__all__ = ["SDXLAdapter", "SDXLEmbeds"]


@dataclass
class SDXLEmbeds(PromptEmbeds):
    """SDXL's conditioning, one row per sample in every field: the two encoders' concatenated hidden states
    (``cond``, ``uncond``), the second encoder's pooled projections ``(B, P)`` and the added time ids ``(B, 6)``
    (original size, crop top-left, target size), shared by both guidance halves as the pipeline shares them."""

    pooled: torch.Tensor
    uncond_pooled: torch.Tensor | None
    time_ids: torch.Tensor


class SDXLAdapter(StableDiffusionAdapter):
    """Prompts → SDXL conditioning, (latents, t) → guided UNet output with ``added_cond_kwargs``, for an SDXL
    pipeline at its default resolution (uncropped: original and target size both that resolution)."""

    frozen_names = ("vae", "text_encoder", "text_encoder_2")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> SDXLEmbeds:
        """Conditioning through the pipeline's own ``encode_prompt``. An empty negative prompt is passed as none,
        so a pipeline with ``force_zeros_for_empty_prompt`` (SDXL base) guides against zeros, as its ``__call__``
        does without a negative prompt."""
        pipe = self.pipeline
        negative = [self.negative_prompt] * len(prompts) if self.negative_prompt else None
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
        projection = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                      else int(pooled.shape[-1]))
        _, height, width = self.latent_shape
        size = (height * pipe.vae_scale_factor, width * pipe.vae_scale_factor)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype, text_encoder_projection_dim=projection)
        return SDXLEmbeds(cond, uncond, pooled, uncond_pooled, time_ids.to(self.device).repeat(len(prompts), 1))

    def model_output(self, denoiser: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor | int,
                     embeds: SDXLEmbeds) -> torch.Tensor:
        """The guided UNet output ``u + w·(c − u)`` in the model's prediction type, both halves in one call."""
        dtype = next(denoiser.parameters()).dtype

        def run(x, t, encoder_hidden_states, text_embeds, time_ids):
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            return denoiser(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added).sample

        time_ids = embeds.time_ids.to(dtype)
        cond = {"encoder_hidden_states": embeds.cond.to(dtype), "text_embeds": embeds.pooled.to(dtype),
                "time_ids": time_ids}
        uncond = {"encoder_hidden_states": embeds.uncond.to(dtype), "text_embeds": embeds.uncond_pooled.to(dtype),
                  "time_ids": time_ids}
        return self.guided(run, latents.to(dtype), timestep, cond, uncond)
