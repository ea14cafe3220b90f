"""LoRA on a diffusers denoiser (UNet or transformer) through peft, and the reference policy it implies; export
for plain diffusers is the generator adapter's (``GeneratorAdapter.export_lora``)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pydantic import Field

from mmalign.config import StrictModel

__all__ = ["LM_TARGETS", "LoRAConfig", "attach_lora", "frozen_reference", "reference_policy", "trainable_state"]


#: default adapter targets of a language model (``LoRAConfig.target_modules: null``; a denoiser's are its
#: adapter's ``lora_targets``)
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRAConfig(StrictModel):
    """LoRA settings of every trainer (diffusion UNets and VLMs alike)."""

    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(8.0, gt=0, description="LoRA scaling numerator (scale = alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | str | None = Field(
        None, description="module names or 'all-linear' (null: the attention projections of a denoiser, the attention "
        "and MLP projections of a language model; the LM head cannot take an adapter in TRL)",
    )
    init: str | bool = Field("gaussian", description="peft init_lora_weights (B starts at zero either way)")

    def peft(self, default_targets: list[str], **kwargs):
        """The ``peft.LoraConfig`` of these settings, with ``default_targets`` when none are named."""
        from peft import LoraConfig

        targets = default_targets if self.target_modules is None else self.target_modules
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, init_lora_weights=self.init,
                          target_modules=targets, **kwargs)


def attach_lora(denoiser: torch.nn.Module, config: LoRAConfig, default_targets: list[str]) -> None:
    """Freeze the denoiser and add trainable LoRA adapters through diffusers' peft integration (on
    ``default_targets`` unless the config names its own), kept in fp32 whatever the denoiser's dtype (``cast_training_params``) so small updates are not rounded away."""
    from diffusers.training_utils import cast_training_params

    if not hasattr(denoiser, "add_adapter"):
        import diffusers

        raise ValueError(f"lora: {type(denoiser).__name__} has no peft integration in diffusers "
                         f"{diffusers.__version__}, so it cannot take LoRA adapters; train it with lora: null (full "
                         "fine-tuning)")
    denoiser.requires_grad_(False)
    denoiser.add_adapter(config.peft(default_targets))
    cast_training_params(denoiser, torch.float32)


@contextmanager
def reference_policy(denoiser: torch.nn.Module, frozen_copy: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """π_ref: the same denoiser with its LoRA adapters disabled, or ``frozen_copy`` for full fine-tuning."""
    if frozen_copy is not None:
        yield frozen_copy
        return
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


def frozen_reference(denoiser: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the denoiser before full fine-tuning starts: the reference policy."""
    return copy.deepcopy(denoiser).requires_grad_(False).eval()


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name: what a checkpoint must hold."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}
