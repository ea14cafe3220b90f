"""JPEG (in)compressibility: the weight-free reward of DDPO (Black et al., 2023).

The score is the size of the image saved as JPEG at a fixed quality, in kilobytes (1 kB = 1000 bytes):
negated for compressibility (simpler images score higher), as is for incompressibility.
"""

from __future__ import annotations

import io

import torch

from mmalign.media import MediaBatch
from mmalign.rewards.base import Reward, RewardOutput

__all__ = ["JpegCompressibility", "JpegIncompressibility", "jpeg_size_kb"]


def jpeg_size_kb(batch: MediaBatch, quality: int = 95) -> torch.Tensor:
    """``(B,)`` JPEG file sizes in kB of the batch's images (videos: summed over frames)."""
    frames = batch.flat_frames()
    sizes = []
    for image in MediaBatch(frames, [""] * len(frames)).to_pil():
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32).view(len(batch), batch.frames_per_sample).sum(1)


class _JpegSize(Reward):
    sign = 1.0
    scope = "sample"
    differentiable = False

    def __init__(self, quality: int = 95) -> None:
        super().__init__()
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality: expected an int in [1, 100], got {quality!r}")
        self.quality = quality

    def forward(self, batch: MediaBatch) -> RewardOutput:
        size = jpeg_size_kb(batch, self.quality).to(batch.device)
        return RewardOutput(self.sign * size, {"jpeg_kb": size})


class JpegCompressibility(_JpegSize):
    """Negative JPEG size in kB: rewards images that compress well (DDPO's compressibility task)."""

    name = "jpeg_compressibility"
    sign = -1.0


class JpegIncompressibility(_JpegSize):
    """JPEG size in kB: rewards images that compress badly (DDPO's incompressibility task)."""

    name = "jpeg_incompressibility"
