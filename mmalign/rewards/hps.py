"""HPSv2 (Wu et al., 2023): OpenCLIP ViT-H-14 fine-tuned on human preference data; the score is the cosine."""

from __future__ import annotations

import torch

from mmalign.media import MediaBatch
from mmalign.rewards.backbones import OpenCLIPBackbone, hub_file
from mmalign.rewards.base import RewardOutput
from mmalign.rewards.clip import CLIPFamilyReward

__all__ = ["HPSv2"]


class HPSv2(CLIPFamilyReward):
    """HPSv2 score: cosine of image and prompt on the HPS-tuned OpenCLIP ViT-H-14 (typically 0.2–0.35).

    Args:
        checkpoint: a local HPS checkpoint file, or a file name in ``repo_id`` (v2.1 by default, v2.0 is
            ``HPS_v2_compressed.pt``); read with ``weights_only=True``.
        architecture: the OpenCLIP architecture the checkpoint fits.
    Score in fp32 (the default): in fp16 nearby images tie.
    """

    name = "hpsv2"

    def __init__(
        self,
        checkpoint: str = "HPS_v2.1_compressed.pt",
        repo_id: str = "xswu/HPSv2",
        architecture: str = "ViT-H-14",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        path = hub_file(checkpoint, repo_id)
        super().__init__(OpenCLIPBackbone(architecture, path, device, dtype, gradient_checkpointing))

    def score_from_cosine(self, cosine: torch.Tensor, batch: MediaBatch | None = None) -> torch.Tensor:
        """The score from the image–prompt cosine ``(B,)``: the cosine itself (what ``direction_corrected``
        applies to its corrected cosine; ``forward`` goes through it too)."""
        return cosine

    def forward(self, batch: MediaBatch) -> RewardOutput:
        cosine = self.cosines(batch).float()
        return RewardOutput(self.score_from_cosine(cosine, batch), {"cosine": cosine})
