"""LoRA on a diffusers UNet through peft, the reference policy it implies, and export for plain diffusers."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import Field

from mmalign.config import StrictModel

__all__ = ["LM_TARGETS", "UNET_TARGETS", "LoRAConfig", "attach_lora", "export_lora", "frozen_reference", "reference_policy", "trainable_state"]


#: default adapter targets per model family (``LoRAConfig.target_modules: null``)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRAConfig(StrictModel):
    """LoRA settings of every trainer (diffusion UNets and VLMs alike)."""

    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(8.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | str | None = Field(
        None, description="module names or 'all-linear' (null: the attention projections of a UNet, the attention "
        "and MLP projections of a language model; the LM head cannot take an adapter in TRL)",
    )
    init: str | bool = Field("gaussian", description="peft init_lora_weights (B starts at zero either way)")

    def peft(self, default_targets: list[str], **kwargs):
        """The ``peft.LoraConfig`` of these settings, with ``default_targets`` when none are named."""
        from peft import LoraConfig

        targets = default_targets if self.target_modules is None else self.target_modules
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, init_lora_weights=self.init,
                          target_modules=targets, **kwargs)


def attach_lora(unet: torch.nn.Module, config: LoRAConfig) -> None:
    """Freeze the UNet and add trainable LoRA adapters through diffusers' peft integration, kept in fp32 whatever
    the UNet's dtype (``cast_training_params``) so small updates are not rounded away."""
    from diffusers.training_utils import cast_training_params

    unet.requires_grad_(False)
    unet.add_adapter(config.peft(UNET_TARGETS))
    cast_training_params(unet, torch.float32)


@contextmanager
def reference_policy(unet: torch.nn.Module, frozen_copy: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """π_ref: the same UNet with its LoRA adapters disabled, or ``frozen_copy`` for full fine-tuning."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def frozen_reference(unet: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the UNet before full fine-tuning starts: the reference policy."""
    return copy.deepcopy(unet).requires_grad_(False).eval()


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name: what a checkpoint must hold."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def export_lora(unet: torch.nn.Module, folder: str | Path) -> Path:
    """Write the adapters in diffusers' LoRA format: ``pipe.load_lora_weights(folder)`` loads them, with the
    adapter config (rank, alpha) stored as metadata so the loaded scale is the trained one."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata
    )
    return Path(folder)
