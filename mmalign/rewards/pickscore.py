"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on Pick-a-Pic human preferences."""

from __future__ import annotations

import torch

from mmalign.media import MediaBatch
from mmalign.rewards.backbones import HFCLIPBackbone
from mmalign.rewards.base import RewardOutput
from mmalign.rewards.clip import CLIPFamilyReward

__all__ = ["PickScore", "group_ids", "group_softmax"]


def group_ids(batch: MediaBatch) -> torch.Tensor:
    """``(B,)`` group index per sample: ``metadata["group"]`` where given, else samples of one prompt."""
    keys = [m.get("group", p) for m, p in zip(batch.metadata, batch.prompts)]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    return torch.tensor([index[k] for k in keys], device=batch.device)


def group_softmax(logits: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Softmax of ``logits`` within each group: the probability that a sample is its group's preferred one."""
    out = torch.empty_like(logits)
    for g in groups.unique():
        members = groups == g
        out[members] = torch.softmax(logits[members], dim=0)
    return out


class PickScore(CLIPFamilyReward):
    """PickScore ``logit_scale·cos``; with ``softmax=True``, each image's preference probability among the
    images of its prompt (or ``metadata["group"]``), as the paper compares candidates.

    Weights in transformers' CLIPModel format (hub id or folder); the tokenizer and image processor come from
    ``processor`` because the published model shares LAION's CLIP-H processor.
    """

    name = "pickscore"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        softmax: bool = False,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(HFCLIPBackbone(model, processor, device, dtype, gradient_checkpointing))
        self.softmax = bool(softmax)
        self.scope = "group" if softmax else "sample"

    def score_from_cosine(self, cosine: torch.Tensor, batch: MediaBatch | None = None) -> torch.Tensor:
        """The score from the image–prompt cosine ``(B,)``: ``logit_scale·cos``, or with ``softmax`` its softmax
        within each group of ``batch`` (what ``direction_corrected`` applies to its corrected cosine; ``forward``
        goes through it too)."""
        logits = self.backbone.logit_scale * cosine
        if not self.softmax:
            return logits
        if batch is None:
            raise ValueError("batch: PickScore with softmax=True needs the batch to find each sample's group")
        return group_softmax(logits, group_ids(batch))

    def forward(self, batch: MediaBatch) -> RewardOutput:
        cosine = self.cosines(batch).float()
        components = {"cosine": cosine, "logit": self.backbone.logit_scale * cosine}
        return RewardOutput(self.score_from_cosine(cosine, batch), components)
