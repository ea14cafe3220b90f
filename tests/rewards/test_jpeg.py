import io

import pytest
import torch
from PIL import Image

from mmalign import MediaBatch
from mmalign.rewards import build


def pil_jpeg_kb(image: Image.Image, quality: int) -> float:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


@pytest.mark.parametrize("quality", [95, 50])
def test_sizes_match_pil(quality):
    flat = Image.new("RGB", (32, 32), (200, 30, 30))
    noisy = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    batch = MediaBatch.from_pil([flat, noisy], ["flat", "noisy"])
    expected = torch.tensor([pil_jpeg_kb(flat, quality), pil_jpeg_kb(noisy, quality)])
    comp = build({"name": "jpeg_compressibility", "quality": quality})(batch)
    incomp = build({"name": "jpeg_incompressibility", "quality": quality})(batch)
    torch.testing.assert_close(incomp.scores, expected)
    torch.testing.assert_close(comp.scores, -expected)
    torch.testing.assert_close(comp.components["jpeg_kb"], expected)
    assert comp.scores[0] > comp.scores[1]  # a flat image compresses better


def test_video_sums_frames():
    frames = torch.rand(2, 3, 3, 16, 16)
    video = build("jpeg_incompressibility")(MediaBatch(frames, ["a", "b"]))
    per_frame = build("jpeg_incompressibility")(MediaBatch(frames.flatten(0, 1), ["x"] * 6))
    torch.testing.assert_close(video.scores, per_frame.scores.view(2, 3).sum(1))


def test_bad_quality():
    with pytest.raises(ValueError, match=r"quality: expected an int in \[1, 100\], got 0"):
        build({"name": "jpeg_compressibility", "quality": 0})
