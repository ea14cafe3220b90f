"""VLM-RM goal-baseline projection (Rocamonde et al., 2024): CLIP similarity along the goal direction only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mmalign.media import MediaBatch
from mmalign.rewards.backbones import Backend, load_backbone
from mmalign.rewards.base import RewardOutput
from mmalign.rewards.clip import CLIPFamilyReward, frame_embeddings

__all__ = ["GoalBaselineReward"]


class GoalBaselineReward(CLIPFamilyReward):
    """``R = 1 − ½‖(s − g)·P‖²`` with ``P = α·ddᵀ/‖d‖² + (1−α)·I`` and ``d = g − b``.

    ``s`` is the unit image embedding, ``g`` and ``b`` the mean unit embeddings of the goal and baseline
    prompts. α = 1 keeps only the goal-minus-baseline direction (what changes between "a humanoid robot" and
    "a humanoid robot kneeling"); α = 0 is plain CLIP similarity, ``R = cos(s, g)``.

    Args:
        baseline: the neutral description(s) of the scene.
        goal: the target description(s); None uses each sample's prompt as its goal.
        alpha: projection strength in [0, 1].
    """

    name = "goal_baseline"

    def __init__(
        self,
        baseline: str | Sequence[str],
        goal: str | Sequence[str] | None = None,
        alpha: float = 1.0,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        backend: Backend = "open_clip",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha: expected a value in [0, 1], got {alpha!r}")
        super().__init__(load_backbone(backend, model, pretrained, None, device, dtype, gradient_checkpointing))
        self.baseline = [baseline] if isinstance(baseline, str) else list(baseline)
        self.goal = None if goal is None else [goal] if isinstance(goal, str) else list(goal)
        if not self.baseline or (self.goal is not None and not self.goal):
            raise ValueError("baseline, goal: expected at least one prompt each")
        self.alpha = float(alpha)

    def _mean_embedding(self, prompts: list[str]) -> torch.Tensor:
        return F.normalize(self.backbone.encode_text(prompts).mean(0), dim=-1)

    def forward(self, batch: MediaBatch) -> RewardOutput:
        image = frame_embeddings(self.backbone, batch)
        baseline = self._mean_embedding(self.baseline)
        if self.goal is None:
            goal = self.backbone.encode_text(batch.prompts)
        else:
            goal = self._mean_embedding(self.goal).expand(len(batch), -1)
        direction = goal - baseline  # (B, D)
        unit = F.normalize(direction, dim=-1)[:, None]
        diff = image - goal[:, None]  # (B, F, D)
        along = (diff * unit).sum(-1, keepdim=True) * unit
        projected = self.alpha * along + (1 - self.alpha) * diff  # diff·P with P symmetric
        reward = 1 - 0.5 * projected.pow(2).sum(-1)
        return RewardOutput(reward.mean(1).float(), {"cosine_to_goal": (image * goal[:, None]).sum(-1).mean(1).float()})
