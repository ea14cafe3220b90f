"""Put ``mmalign.kernels.attention`` into a diffusers pipeline or model, or a transformers model.

Acts only on the instance passed in: no library code is edited and nothing is patched at import.
- diffusers: each attention layer whose processor is the stock SDPA one (``AttnProcessor2_0``/``AttnProcessor``,
  SD3's ``JointAttnProcessor2_0``, Flux's ``FluxAttnProcessor``) gets the matching mmalign processor; other
  processors (IP-Adapter, added-KV, fused, custom) are left alone and counted as skipped. For a pipeline, the
  denoisers (components named ``unet*`` or ``transformer*``) are converted; text encoders and the VAE are not.
- transformers: an attention function is registered with ``AttentionInterface`` (and SDPA's mask builder with
  ``AttentionMaskInterface``) under ``"mmalign"`` for ``backend="auto"`` or ``"mmalign_<backend>"`` otherwise,
  and the model is switched to it with ``set_attn_implementation``. Calls that carry a mask, dropout, a position
  bias, a paged cache or ``output_attentions`` go to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from mmalign.kernels.dispatch import BACKENDS, Backend, attention
from mmalign.kernels.processors import AttentionProcessor, FluxAttentionProcessor, JointAttentionProcessor


@dataclass
class InstallReport:
    """What ``install`` changed.

    ``processors`` counts diffusers attention layers per new processor class; ``skipped`` counts layers left
    alone per processor class; ``attn_implementation`` is the transformers implementation set, if any.
    """

    backend: str
    processors: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    attn_implementation: str | None = None

    @property
    def installed(self) -> int:
        """Attention layers (diffusers) plus models (transformers) now running mmalign attention."""
        return sum(self.processors.values()) + (self.attn_implementation is not None)


def _processor_classes() -> dict[type, type]:
    """Stock diffusers processor class -> the mmalign processor that replaces it (ours map to themselves)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    ours = (AttentionProcessor, JointAttentionProcessor, FluxAttentionProcessor)
    return {
        AttnProcessor: AttentionProcessor,
        AttnProcessor2_0: AttentionProcessor,
        JointAttnProcessor2_0: JointAttentionProcessor,
        FluxAttnProcessor: FluxAttentionProcessor,
        **{cls: cls for cls in ours},
    }


def _install_diffusers(model: torch.nn.Module, backend: str, report: InstallReport) -> None:
    replacements = _processor_classes()
    shared = {cls: cls(backend) for cls in set(replacements.values())}
    chosen = {}
    for name, processor in model.attn_processors.items():
        new_cls = replacements.get(type(processor))
        if new_cls is None:
            chosen[name] = processor
            report.skipped[type(processor).__name__] = report.skipped.get(type(processor).__name__, 0) + 1
        else:
            chosen[name] = shared[new_cls]
    counts = Counter(type(p).__name__ for p in chosen.values() if type(p) in shared)
    model.set_attn_processor(chosen)
    for name, count in counts.items():
        report.processors[name] = report.processors.get(name, 0) + count


def _transformers_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    backend: Backend,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function contract: q (B, H, N_q, D), k/v (B, H_kv, N_k, D) -> ((B, N_q, H, D), None)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    needs_sdpa = (
        attention_mask is not None
        or dropout > 0.0
        or any(kwargs.get(name) is not None for name in ("position_bias", "cache", "softcap"))
        or kwargs.get("output_attentions", False)
    )
    if needs_sdpa:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = (getattr(module, "is_causal", True) if is_causal is None else is_causal) and query.shape[2] > 1
    if causal and key.shape[2] > query.shape[2]:
        # transformers drops the mask here only for a prefill into an empty static cache, whose trailing slots
        # are unused: keep the real keys (what its SDPA function does too).
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    out = attention(query, key, value, causal=causal, scale=scaling, backend=backend)
    return out.transpose(1, 2).contiguous(), None


def _register_transformers(backend: str) -> str:
    """Register the attention and mask functions under the implementation name for ``backend``; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = "mmalign" if backend == "auto" else f"mmalign_{backend}"

    def mmalign_attention(module, query, key, value, attention_mask, **kwargs):
        return _transformers_attention(module, query, key, value, attention_mask, backend=backend, **kwargs)

    AttentionInterface.register(name, mmalign_attention)
    # Without a registered mask builder transformers passes no mask at all to unknown implementations, which
    # would silently drop padding; SDPA's builder returns None whenever is_causal alone suffices.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _denoisers(pipeline) -> list[torch.nn.Module]:
    return [
        module for name, module in pipeline.components.items()
        if name.startswith(("unet", "transformer")) and hasattr(module, "set_attn_processor")
    ]


def install(model_or_pipeline, backend: Backend = "auto") -> InstallReport:
    """Route attention in a diffusers pipeline/model or a transformers model through ``mmalign.kernels.attention``.

    Returns an ``InstallReport``; ``report.installed == 0`` means nothing matched. Calling it again switches the
    backend. The Triton kernel has no mask input, so masked calls use SDPA for that call.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    report = InstallReport(backend=backend)
    target = model_or_pipeline
    if hasattr(target, "components") and not isinstance(target, torch.nn.Module):
        denoisers = _denoisers(target)
        if not denoisers:
            raise ValueError(f"model_or_pipeline: pipeline {type(target).__name__} has no unet/transformer component")
        for denoiser in denoisers:
            _install_diffusers(denoiser, backend, report)
    elif hasattr(target, "set_attn_processor") and hasattr(target, "attn_processors"):
        _install_diffusers(target, backend, report)
    elif hasattr(target, "set_attn_implementation") and hasattr(target, "config"):
        name = _register_transformers(backend)
        target.set_attn_implementation(name)
        report.attn_implementation = name
    else:
        raise TypeError(
            "model_or_pipeline must be a diffusers pipeline, a diffusers model with attention processors or a "
            f"transformers PreTrainedModel; got {type(target).__name__}"
        )
    return report
