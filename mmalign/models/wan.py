"""Generator adapter for Wan 2.1 text-to-video pipelines: a rectified-flow video transformer on the flow SDE policy.

Wan is SD3's family for training purposes (``FlowTransformerAdapter``: the transformer denoiser, LoRA in peft keys,
the flow forward process), with its own conditioning and VAE: one UMT5 encoder (no pooled embedding), the
transformer called on ``(B, C, F, h, w)`` latents, and ``AutoencoderKLWan``, a causal 3-D VAE (4× in time, 8× in
space) whose latents are normalised per channel by ``latents_mean``/``latents_std``. The pipeline calls the
transformer once per guidance half; the adapter batches both halves in one call, equal up to fp32 rounding.
Wan 2.2's two-transformer pipelines (``transformer_2``) and per-token timesteps are not supported.
"""

from __future__ import annotations

import torch

from mmalign.models.adapter import PromptEmbeds
from mmalign.models.flow_sde import FlowSDEPolicy, scheduler_policy
from mmalign.models.sd3 import FlowTransformerAdapter, flow_timestep
from mmalign.models.video import TravellingNoise, checked_noise_speed, checked_video_size

__all__ = ["WAN_LORA_TARGETS", "WanAdapter"]

#: the projections of a Wan block's self-attention (``attn1``) and text cross-attention (``attn2``)
WAN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class WanAdapter(TravellingNoise, FlowTransformerAdapter):
    """Prompts → UMT5 embeddings, (latents, t) → guided velocity, latents → ``(B, T, 3, H, W)`` frames, for a
    ``WanPipeline``. ``num_frames``, ``height`` and ``width`` default to the pipeline's (81 frames at 480×832);
    ``max_sequence_length`` to its 512 text tokens; ``noise_speed`` (latent pixels per latent frame) starts
    samples from travelling noise."""

    frozen_names = ("vae", "text_encoder")
    lora_targets = WAN_LORA_TARGETS
    default_max_sequence_length = 512

    def __init__(self, pipeline, guidance_scale: float = 5.0, negative_prompt: str = "",
                 max_sequence_length: int | None = None, num_frames: int = 81, height: int = 480,
                 width: int = 832, noise_speed: float | None = None) -> None:
        super().__init__(pipeline, guidance_scale, negative_prompt, max_sequence_length)
        self.noise_speed = checked_noise_speed(noise_speed)
        if getattr(pipeline, "transformer_2", None) is not None or pipeline.config.get("expand_timesteps"):
            raise ValueError("pipeline: Wan 2.2's two-transformer and per-token-timestep pipelines are not supported; "
                             "expected a Wan 2.1 pipeline (one transformer)")
        patch = self.denoiser.config.patch_size
        self.num_frames, self.height, self.width = checked_video_size(
            num_frames, height, width, pipeline.vae_scale_factor_spatial * patch[1], pipeline.vae_scale_factor_temporal
        )

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, F, h, w)`` with ``F = (num_frames − 1)/4 + 1`` latent frames."""
        pipe = self.pipeline
        frames = (self.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        factor = pipe.vae_scale_factor_spatial
        return (self.denoiser.config.in_channels, frames, self.height // factor, self.width // factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """UMT5 embeddings (zero past each prompt's tokens) through the pipeline's own ``encode_prompt``; the
        negative prompt's where guidance needs them."""
        cond, uncond = self.pipeline.encode_prompt(
            prompts, negative_prompt=[self.negative_prompt] * len(prompts),
            do_classifier_free_guidance=self.guidance_scale > 1, max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        return PromptEmbeds(cond, uncond)

    def model_output(self, denoiser: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor | int,
                     embeds: PromptEmbeds) -> torch.Tensor:
        """The guided velocity ``u + w·(c − u)`` at ``timestep`` (the policy's, one per sample)."""
        dtype = next(denoiser.parameters()).dtype

        def run(x, t, encoder_hidden_states):
            return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=encoder_hidden_states,
                            return_dict=False)[0]

        t = flow_timestep(timestep, len(latents), latents.device)
        uncond = None if embeds.uncond is None else {"encoder_hidden_states": embeds.uncond.to(dtype)}
        return self.guided(run, latents.to(dtype), t, {"encoder_hidden_states": embeds.cond.to(dtype)}, uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` frames in [0, 1] (differentiable), in at least fp32: the latents un-normalised per
        channel and decoded by the Wan VAE, as the pipeline does, one video per VAE call (a rollout's whole batch
        of 480p videos at once would not fit)."""
        vae = self.pipeline.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        inverse_std = (1.0 / torch.tensor(vae.config.latents_std).view(shape)).to(latents.device, vae.dtype)
        normalised = latents.to(vae.dtype) / inverse_std + mean
        video = torch.cat([vae.decode(one, return_dict=False)[0] for one in normalised.split(1)])
        video = video.to(torch.promote_types(video.dtype, torch.float32)).transpose(1, 2)
        return (video / 2 + 0.5).clamp(0, 1)

    def make_policy(self, num_steps: int, eta: float) -> FlowSDEPolicy:
        """The flow SDE with noise level ``eta`` on the sigmas of the pipeline's scheduler (Euler with Wan's shift,
        or the UniPC ``flow_shift`` schedule the published pipelines ship)."""
        return scheduler_policy(self.pipeline.scheduler, num_steps, eta)
