"""``motion_proxy``: the world's learned reward for where a clip moves (``mmalign.world.motion_proxy``).

A clip scores the classifier's probability of the direction its caption states (``"… moving left"``), in [0, 1];
the component ``still`` is the probability that it does not move. It is differentiable in the pixels, so
reward back-propagation can use it, and it reads the direction from the prompt alone (no gold metadata).
Beside ``frame_aggregate`` of the proxy, which judges each frame alone, it is the part of a video reward that
sees motion; ``gold_video``'s motion check is the truth it is measured against.
"""

from __future__ import annotations

import torch

from mmalign.media import MediaBatch
from mmalign.rewards.base import Reward, RewardOutput
from mmalign.rewards.video import video_pixels
from mmalign.world.motion_proxy import CLASSES, MotionClassifier
from mmalign.world.video import stated_direction

__all__ = ["MotionProxyScore"]


class MotionProxyScore(Reward):
    """Probability of the caption's direction under the shipped motion classifier, or ``model`` (its folder or
    a ``MotionClassifier``)."""

    name = "motion_proxy"
    scope = "sample"
    differentiable = True

    def __init__(self, model: str | MotionClassifier | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        if model is None:
            from mmalign.world.assets import motion_proxy_path

            model = motion_proxy_path()
        if not isinstance(model, MotionClassifier):
            model = MotionClassifier.from_pretrained(model)
        self.model = model.to(device).eval().requires_grad_(False)

    def forward(self, batch: MediaBatch) -> RewardOutput:
        pixels = video_pixels(batch, self.name, min_frames=2)
        if batch.prompts is None:
            raise ValueError("batch.prompts: motion_proxy reads the direction from each clip's caption, got none")
        stated = [CLASSES.index(stated_direction(p, f"batch.prompts[{i}]")) for i, p in enumerate(batch.prompts)]
        weight = next(self.model.parameters())
        logits = self.model(pixels.to(weight))
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)  # at least float32
        rows = torch.arange(len(stated), device=probs.device)
        return RewardOutput(probs[rows, torch.tensor(stated, device=probs.device)], {"still": probs[:, 0]})
