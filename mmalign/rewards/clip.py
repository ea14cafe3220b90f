"""CLIPScore on an OpenCLIP or transformers CLIP model: ``max(scale · cos(image, text), 0)`` (Hessel et al.)."""

from __future__ import annotations

import torch

from mmalign.media import MediaBatch
from mmalign.rewards.backbones import Backend, CLIPBackbone, load_backbone
from mmalign.rewards.base import Reward, RewardOutput

__all__ = ["CLIPScore", "CLIPFamilyReward", "embedding_cosines", "frame_cosines", "frame_embeddings"]


def frame_embeddings(backbone: CLIPBackbone, batch: MediaBatch) -> torch.Tensor:
    """``(B, T, D)`` unit image embeddings of each sample's frames (T = 1 for images)."""
    return backbone.encode_image(batch.flat_frames()).view(len(batch), batch.frames_per_sample, -1)


def embedding_cosines(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(B,)`` cosines of unit image embeddings ``(B, D)`` or ``(B, T, D)`` (mean over frames) with the rows of
    ``text`` ``(B, D)``."""
    if image.ndim == 2:
        image = image[:, None]
    return (image * text.to(image)[:, None]).sum(-1).mean(1)


def frame_cosines(backbone: CLIPBackbone, batch: MediaBatch, text: torch.Tensor) -> torch.Tensor:
    """``(B,)`` cosine of each sample's image (videos: mean over frames) with its row of ``text`` ``(B, D)``."""
    return embedding_cosines(frame_embeddings(backbone, batch), text)


class CLIPFamilyReward(Reward):
    """Base of rewards that read a CLIP backbone: holds it, frozen, and exposes its encoders."""

    scope = "sample"
    differentiable = True

    def __init__(self, backbone: CLIPBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.freeze()

    def cosines(self, batch: MediaBatch) -> torch.Tensor:
        return frame_cosines(self.backbone, batch, self.backbone.encode_text(batch.prompts))


class CLIPScore(CLIPFamilyReward):
    """CLIPScore ``max(scale·cos, 0)`` of image and prompt embeddings from an OpenCLIP or HF CLIP model.

    Args:
        model: OpenCLIP name (with ``pretrained``), ``hf-hub:org/repo`` or folder; for ``backend="hf"`` a
            transformers hub id or folder.
        pretrained: OpenCLIP tag (``list_pretrained()``) or checkpoint file; OpenCLIP backend only.
        backend: ``"open_clip"`` or ``"hf"``.
        processor: where the HF tokenizer and image processor live, if not beside the model.
        scale: multiplier of the cosine (100 as in torchmetrics; Hessel et al. use 2.5).
        clamp: apply ``max(·, 0)``; turn off inside optimisation loops to keep gradients for negative cosines.
        gradient_checkpointing: recompute the backbone's layers in the backward pass to save memory.
    Videos are scored per frame and averaged.
    """

    name = "clip"

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str | None = "openai",
        backend: Backend = "open_clip",
        processor: str | None = None,
        scale: float = 100.0,
        clamp: bool = True,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(load_backbone(backend, model, pretrained, processor, device, dtype, gradient_checkpointing))
        self.scale, self.clamp = float(scale), bool(clamp)

    def forward(self, batch: MediaBatch) -> RewardOutput:
        cosine = self.cosines(batch)
        scores = self.scale * cosine.float()
        if self.clamp:
            scores = scores.clamp_min(0.0)
        return RewardOutput(scores, {"cosine": cosine.float()})
