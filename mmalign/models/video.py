"""What the text-to-video adapters share: the frame count and size of their samples, checked against the VAE's
factors, and the frame-wise view of video latents.

Inside a video adapter latents are ``(B, C, F, h, w)``, as the diffusers video pipelines hold them; decoded pixels
come out as ``(B, T, C, H, W)`` in [0, 1], the layout of a video ``MediaBatch`` and of the video rewards. The
policies (DDIM-η, the flow SDE) are elementwise and sum their log-probs over every non-batch dimension, so they
run on 5-D latents unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["VIDEO_OPTIONS", "checked_video_size", "frames_as_batch"]

#: the adapter options that size a video family's samples (``DiffusionConfig.video``)
VIDEO_OPTIONS = ("num_frames", "height", "width")


def checked_video_size(num_frames, height, width, spatial: int, temporal: int = 1) -> tuple[int, int, int]:
    """``(num_frames, height, width)`` after checking each is a positive int, the sizes multiples of ``spatial``
    (the VAE's factor times the patch size) and ``num_frames − 1`` a multiple of ``temporal`` (a causal video VAE's
    factor: the first frame is encoded alone)."""
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    for name, value in (("height", height), ("width", width)):
        if value % spatial:
            raise ValueError(f"{name}: expected a multiple of {spatial} (the VAE's spatial factor × the patch size), "
                             f"got {value}")
    if (num_frames - 1) % temporal:
        raise ValueError(f"num_frames: expected 1 + a multiple of {temporal} (the VAE's temporal factor), "
                         f"got {num_frames}")
    return num_frames, height, width


def frames_as_batch(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, h, w)`` → ``(B·F, C, h, w)``: each frame's latent, video by video (what an image VAE decodes)."""
    return latents.transpose(1, 2).flatten(0, 1)
