"""Generator adapter for Stable Diffusion 3 / 3.5 pipelines: a rectified-flow MMDiT on the flow-matching SDE policy."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from mmalign.models.adapter import GeneratorAdapter, PromptEmbeds
from mmalign.models.flow_sde import FlowSDEPolicy, dynamic_shift_mu
from mmalign.models.forward_process import FlowProcess
from mmalign.models.stable_diffusion import decode_with_vae

__all__ = ["MMDIT_LORA_TARGETS", "FlowTransformerAdapter", "SD3Adapter", "SD3Embeds", "flow_timestep"]

#: the attention projections of an MMDiT block, image stream and text (``add_*``) stream; in SD3.5 they also
#: match the image-only second attention (``attn2``), in Flux the single-stream blocks' q/k/v
MMDIT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class SD3Embeds(PromptEmbeds):
    """Sequence embeddings (``cond``/``uncond`` ``(B, L, D)``) and the pooled text embeddings ``(B, P)`` that
    condition the transformer's timestep embedding (SD3 and Flux alike)."""

    pooled: torch.Tensor
    uncond_pooled: torch.Tensor | None


def flow_timestep(timestep: torch.Tensor | float, batch: int, device) -> torch.Tensor:
    """``(batch,)`` fp32 timesteps from a scalar or ``(batch,)`` one: transformers embed one timestep per sample."""
    t = torch.as_tensor(timestep, device=device)
    return t.to(torch.promote_types(t.dtype, torch.float32)).reshape(-1).expand(batch)


class FlowTransformerAdapter(GeneratorAdapter):
    """What the rectified-flow transformer families (SD3, Flux) share: the ``transformer`` denoiser with LoRA on
    its attention projections (exported in peft keys, which their loaders read), the T5 sequence length, the flow
    forward process and decoding with the VAE's shift and scale. ``max_sequence_length`` None is the family's
    pipeline default."""

    denoiser_name = "transformer"
    lora_targets = MMDIT_LORA_TARGETS
    lora_diffusers_keys = False
    default_max_sequence_length: ClassVar[int]

    def __init__(self, pipeline, guidance_scale: float = 5.0, negative_prompt: str = "",
                 max_sequence_length: int | None = None) -> None:
        super().__init__(pipeline, guidance_scale, negative_prompt)
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_with_vae(self.pipeline.vae, latents)

    @cached_property
    def forward_process(self) -> FlowProcess:
        return FlowProcess(self.scheduler_config.num_train_timesteps)


class SD3Adapter(FlowTransformerAdapter):
    """Prompts → CLIP + CLIP + T5 embeddings, (latents, t) → guided velocity, latents → pixels, for an SD3 pipeline.

    ``max_sequence_length`` is the T5 length (the pipeline's default, 256); a pipeline without T5 (dropped to save
    memory, as SD3 allows) gets zeros in its place, as its own ``encode_prompt`` gives.
    """

    frozen_names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    default_max_sequence_length = 256

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> SD3Embeds:
        """Conditional and unconditional embeddings, through the pipeline's own ``encode_prompt``."""
        cond, uncond, pooled, uncond_pooled = self.pipeline.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=True,
            negative_prompt=[self.negative_prompt] * len(prompts), max_sequence_length=self.max_sequence_length,
        )
        return SD3Embeds(cond, uncond, pooled, uncond_pooled)

    def model_output(self, denoiser: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor | int,
                     embeds: SD3Embeds) -> torch.Tensor:
        """The guided velocity ``u + w·(c − u)`` at ``timestep`` = σ·1000 (the policy's timesteps)."""
        dtype = next(denoiser.parameters()).dtype

        def run(x, t, encoder_hidden_states, pooled_projections):
            return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=encoder_hidden_states,
                            pooled_projections=pooled_projections, return_dict=False)[0]

        t = flow_timestep(timestep, len(latents), latents.device)
        cond = {"encoder_hidden_states": embeds.cond.to(dtype), "pooled_projections": embeds.pooled.to(dtype)}
        uncond = None if embeds.uncond is None else {"encoder_hidden_states": embeds.uncond.to(dtype),
                                                     "pooled_projections": embeds.uncond_pooled.to(dtype)}
        return self.guided(run, latents.to(dtype), t, cond, uncond)

    @property
    def image_seq_len(self) -> int:
        """Image tokens of the transformer at the default resolution (what dynamic shifting reads)."""
        _, h, w = self.latent_shape
        p = self.denoiser.config.patch_size
        return (h // p) * (w // p)

    def make_policy(self, num_steps: int, eta: float) -> FlowSDEPolicy:
        """The flow SDE with noise level ``eta`` on the pipeline's sigmas (``mu`` from the image sequence length
        where the scheduler shifts dynamically, as the pipeline computes it)."""
        config = self.scheduler_config
        mu = dynamic_shift_mu(config, self.image_seq_len) if config.get("use_dynamic_shifting") else None
        return FlowSDEPolicy(config, num_steps, eta, mu=mu)
