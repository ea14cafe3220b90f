"""The world's learned proxy reward: CLIP score on the shipped OpenCLIP model trained on world pairs.

It is the reward trainers optimise in the embedded default, and it can be hacked; the gold verifier
(``gold``) is the truth it is measured against.
"""

from __future__ import annotations

import torch

from mmalign.rewards.clip import CLIPScore

__all__ = ["ProxyScore"]


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
        if model is None:
            from mmalign.world.assets import proxy_path

            model = proxy_path()
        super().__init__(model, None, "open_clip", None, scale, clamp, device, dtype, gradient_checkpointing)
