"""Generator adapters for the UNet text-to-video pipelines on SD's DDIM-η policy and DDPM forward process:
``TextToVideoSDPipeline`` (ModelScope's ``UNet3DConditionModel``) and ``AnimateDiffPipeline`` (an SD 1.5 UNet with
AnimateDiff's motion modules, ``UNetMotionModel``).

Both are the SD adapter with video latents ``(B, C, F, h, w)``: the same ``encode_prompt``, CFG and scheduler; the
VAE is SD's image VAE, applied frame by frame in chunks of ``decode_chunk_size`` frames as the pipelines'
``decode_latents`` do. AnimateDiff's UNet takes the text embeddings once per frame (its pipeline repeats them);
UNet3D repeats them itself.
"""

from __future__ import annotations

import torch

from mmalign.models.adapter import PromptEmbeds
from mmalign.models.stable_diffusion import StableDiffusionAdapter, decode_with_vae
from mmalign.models.video import TravellingNoise, checked_noise_speed, checked_video_size, frames_as_batch

__all__ = ["AnimateDiffAdapter", "VideoUNetAdapter"]


class VideoUNetAdapter(TravellingNoise, StableDiffusionAdapter):
    """Prompts → CLIP text embeddings, (latents, t) → guided UNet output, latents → ``(B, T, 3, H, W)`` frames, for
    a ``TextToVideoSDPipeline``. ``num_frames`` (16, the pipelines' default) and ``height``/``width`` (None: the
    UNet's ``sample_size`` × the VAE factor, as the pipelines default) size the samples; ``noise_speed`` (latent
    pixels per frame) starts them from travelling noise.

    ``UNet3DConditionModel`` has no peft integration in diffusers, so this family trains by full fine-tuning
    (``lora: null``) and exports the whole pipeline.
    """

    decode_chunk_size = 16

    def __init__(self, pipeline, guidance_scale: float = 5.0, negative_prompt: str = "", num_frames: int = 16,
                 height: int | None = None, width: int | None = None, noise_speed: float | None = None) -> None:
        super().__init__(pipeline, guidance_scale, negative_prompt)
        self.noise_speed = checked_noise_speed(noise_speed)
        factor = pipeline.vae_scale_factor
        default = self.denoiser.config.sample_size * factor
        self.num_frames, self.height, self.width = checked_video_size(
            num_frames, default if height is None else height, default if width is None else width, factor
        )

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, F, h, w)``: one latent frame per frame (the VAE is an image VAE)."""
        factor = self.pipeline.vae_scale_factor
        return (self.denoiser.config.in_channels, self.num_frames, self.height // factor, self.width // factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` frames in [0, 1] (differentiable), ``decode_chunk_size`` frames per VAE call."""
        frames = frames_as_batch(latents)
        pixels = torch.cat([decode_with_vae(self.pipeline.vae, chunk) for chunk in frames.split(self.decode_chunk_size)])
        return pixels.unflatten(0, (len(latents), -1))


class AnimateDiffAdapter(VideoUNetAdapter):
    """The video UNet adapter for an ``AnimateDiffPipeline``: its ``UNetMotionModel`` gets the text embeddings
    repeated for every frame, as the pipeline repeats them. LoRA (default targets) wraps the attention projections
    of the SD blocks and of the motion modules' temporal transformers, and exports through
    ``AnimateDiffPipeline.save_lora_weights`` (the loader of motion LoRAs)."""

    frozen_names = ("vae", "text_encoder", "motion_adapter")

    def model_output(self, denoiser: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor | int,
                     embeds: PromptEmbeds) -> torch.Tensor:
        frames = latents.shape[2]
        per_frame = PromptEmbeds(embeds.cond.repeat_interleave(frames, 0), embeds.uncond.repeat_interleave(frames, 0))
        return super().model_output(denoiser, latents, timestep, per_frame)
