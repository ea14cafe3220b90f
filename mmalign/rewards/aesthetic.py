"""LAION aesthetic predictor: a linear MLP on L2-normalised CLIP ViT-L/14 image features (1–10 scale)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmalign.media import MediaBatch
from mmalign.rewards.backbones import Backend, hub_file, load_backbone
from mmalign.rewards.base import RewardOutput
from mmalign.rewards.clip import CLIPFamilyReward

__all__ = ["AestheticHead", "LaionAesthetic"]


class AestheticHead(nn.Module):
    """The published head: five linear layers with dropout between the first four and no activations, so
    the whole head is one affine map of the features, trained with MSE on 1–10 ratings."""

    def __init__(self, in_features: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)

    @classmethod
    def from_file(cls, path: str | Path) -> AestheticHead:
        """Load a head from ``.safetensors`` or a ``.pth`` state dict (read with ``weights_only=True``)."""
        path = str(path)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if "layers.0.weight" not in state:
            raise ValueError(f"head: {path!r} is not an aesthetic head state dict (no 'layers.0.weight')")
        head = cls(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head


class LaionAesthetic(CLIPFamilyReward):
    """LAION aesthetic score (about 1–10) of the image alone; the prompt is ignored.

    Args:
        head: a local head file, or a file name in ``head_repo``.
        model, pretrained, backend: the CLIP backbone (OpenAI CLIP ViT-L/14 for the published head).
    """

    name = "aesthetic"

    def __init__(
        self,
        head: str = "sac+logos+ava1-l14-linearMSE.pth",
        head_repo: str = "camenduru/improved-aesthetic-predictor",
        model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        backend: Backend = "open_clip",
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        backbone = load_backbone(backend, model, pretrained, None, device, dtype, gradient_checkpointing)
        super().__init__(backbone)
        self.head = AestheticHead.from_file(hub_file(head, head_repo)).to(backbone.device, backbone.work_dtype)
        self.freeze()

    def forward(self, batch: MediaBatch) -> RewardOutput:
        features = self.backbone.encode_image(batch.flat_frames())
        scores = self.head(features).view(len(batch), batch.frames_per_sample).mean(1)
        return RewardOutput(scores.float())
