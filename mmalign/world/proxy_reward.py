"""The world's learned proxy rewards: CLIP scores on the shipped OpenCLIP models.

``proxy`` is the contrastive model trained on clean renders (the world's CLIPScore); ``preference_proxy`` is
the same model fine-tuned on gold-labelled comparisons of the generator's samples (the world's PickScore or
HPSv2), the reward the embedded default trains against. Both can be hacked; the gold verifier (``gold``) is
the truth they are measured against.
"""

from __future__ import annotations

import torch

from mmalign.rewards.clip import CLIPScore

__all__ = ["PreferenceProxyScore", "ProxyScore"]


class ProxyScore(CLIPScore):
    """CLIP score ``scale·cos`` on the shipped world proxy (or the OpenCLIP folder ``model``), unclamped so
    that optimisation keeps a gradient where the cosine is negative."""

    name = "proxy"

    def __init__(
        self,
        model: str | None = None,
        scale: float = 100.0,
        clamp: bool = False,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        model = self.default_model() if model is None else model
        super().__init__(model, None, "open_clip", None, scale, clamp, device, dtype, gradient_checkpointing)

    @staticmethod
    def default_model() -> str:
        from mmalign.world.assets import proxy_path

        return proxy_path()


class PreferenceProxyScore(ProxyScore):
    """``scale·cos`` on the shipped preference proxy (``mmalign.world.preference``): the contrastive proxy
    fine-tuned on gold-labelled comparisons of the base generator's samples, as PickScore is on people's."""

    name = "preference_proxy"

    @staticmethod
    def default_model() -> str:
        from mmalign.world.assets import preference_path

        return preference_path()
