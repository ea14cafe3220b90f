"""LoRA on a diffusers UNet through peft, the reference policy it implies, and export for plain diffusers."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import Field

from mmalign.config import StrictModel

__all__ = ["LoRAConfig", "attach_lora", "export_lora", "frozen_reference", "reference_policy", "trainable_state"]


class LoRAConfig(StrictModel):
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(8.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank)")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], description="UNet modules that get adapters"
    )
    init: str = Field("gaussian", description="peft init_lora_weights (B starts at zero either way)")


def attach_lora(unet: torch.nn.Module, config: LoRAConfig) -> None:
    """Freeze the UNet and add trainable LoRA adapters (fp32) through diffusers' peft integration."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights=config.init, target_modules=config.target_modules)
    )
    for parameter in unet.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


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
