"""Generator adapter for Flux pipelines: a rectified-flow transformer over 2×2-packed latents on the flow SDE policy.

Trajectories hold **unpacked** latents ``(B, C, h, w)``, so rollouts, initial noise, decoding and every generic
code path are the same as for SD3; only ``model_output`` packs them into the transformer's patch sequence (with
its image and text position ids) and unpacks the velocity, with the pipeline's own ``_pack_latents`` and
``_unpack_latents``. Guidance-distilled models (Flux-dev: ``guidance_embeds``) take the guidance scale as an
embedding in one call, with no CFG batch; others get true CFG against the negative prompt when the scale is > 1.
"""

from __future__ import annotations

import numpy as np
import torch

from mmalign.models.flow_sde import FlowSDEPolicy, dynamic_shift_mu
from mmalign.models.sd3 import FlowTransformerAdapter, SD3Embeds, flow_timestep

__all__ = ["FluxAdapter"]


class FluxAdapter(FlowTransformerAdapter):
    """Prompts → T5 sequence + pooled CLIP embeddings, (latents, t) → velocity, latents → pixels, for Flux.

    ``max_sequence_length`` is the T5 length (the pipeline's default, 512). The latents are those of the
    pipeline's default resolution (``pipeline.default_sample_size``·VAE factor pixels; set it for others).
    """

    frozen_names = ("vae", "text_encoder", "text_encoder_2")
    default_max_sequence_length = 512

    def __init__(self, pipeline, guidance_scale: float = 3.5, negative_prompt: str = "",
                 max_sequence_length: int | None = None) -> None:
        super().__init__(pipeline, guidance_scale, negative_prompt, max_sequence_length)

    @property
    def guidance_embedded(self) -> bool:
        """Whether the transformer takes the guidance scale as an embedding (guidance-distilled, no CFG batch)."""
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def true_cfg(self) -> bool:
        return not self.guidance_embedded and self.guidance_scale > 1

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` unpacked, at the pipeline's default resolution (h, w even: 2×2 patches)."""
        factor = self.pipeline.vae_scale_factor
        size = 2 * (self.pipeline.default_sample_size * factor // (factor * 2))
        return (self.denoiser.config.in_channels // 4, size, size)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> SD3Embeds:
        """T5 sequence and pooled CLIP embeddings through the pipeline's own ``encode_prompt``; the negative
        prompt's too where true CFG needs them."""

        def encode(texts):
            sequence, pooled, _ = self.pipeline.encode_prompt(
                texts, device=self.device, max_sequence_length=self.max_sequence_length
            )
            return sequence, pooled

        cond, pooled = encode(prompts)
        uncond, uncond_pooled = encode([self.negative_prompt] * len(prompts)) if self.true_cfg else (None, None)
        return SD3Embeds(cond, uncond, pooled, uncond_pooled)

    def model_output(self, denoiser: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor | int,
                     embeds: SD3Embeds) -> torch.Tensor:
        """The velocity at unpacked ``latents`` and ``timestep`` = σ·1000 (the transformer gets σ, as the pipeline
        passes it), guided by the embedding or by true CFG, unpacked to ``(B, C, h, w)``."""
        pipe = type(self.pipeline)
        dtype = next(denoiser.parameters()).dtype
        b, c, h, w = latents.shape
        packed = pipe._pack_latents(latents.to(dtype), b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, dtype)
        txt_ids = torch.zeros(embeds.cond.shape[1], 3, device=latents.device, dtype=dtype)
        guidance = None
        if self.guidance_embedded:
            guidance = torch.full((b,), self.guidance_scale, device=latents.device, dtype=torch.float32)

        def run(x, t, encoder_hidden_states, pooled_projections):  # guidance is embedded only without a CFG batch
            return denoiser(hidden_states=x, timestep=t, guidance=guidance, pooled_projections=pooled_projections,
                            encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, img_ids=img_ids,
                            return_dict=False)[0]

        t = flow_timestep(timestep, b, latents.device).to(dtype) / 1000
        cond = {"encoder_hidden_states": embeds.cond.to(dtype), "pooled_projections": embeds.pooled.to(dtype)}
        if self.true_cfg:
            uncond = {"encoder_hidden_states": embeds.uncond.to(dtype),
                      "pooled_projections": embeds.uncond_pooled.to(dtype)}
            velocity = self.guided(run, packed, t, cond, uncond)
        else:
            velocity = run(packed, t, **cond)
        factor = self.pipeline.vae_scale_factor
        return pipe._unpack_latents(velocity, h * factor, w * factor, factor)

    @property
    def image_seq_len(self) -> int:
        """Packed image tokens at the default resolution (what dynamic shifting reads)."""
        _, h, w = self.latent_shape
        return (h // 2) * (w // 2)

    def make_policy(self, num_steps: int, eta: float) -> FlowSDEPolicy:
        """The flow SDE with noise level ``eta`` on the sigmas FluxPipeline uses (``linspace(1, 1/n, n)``, shifted
        by ``mu`` from the image sequence length)."""
        config = self.scheduler_config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = dynamic_shift_mu(config, self.image_seq_len)
        return FlowSDEPolicy(config, num_steps, eta, mu=mu, sigmas=sigmas)
