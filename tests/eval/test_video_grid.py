"""Video grids as GIFs and MP4s: one frame per video frame, each the image grid of that frame; a report on videos
writes both beside grid.png."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from mmalign.eval.generator import GeneratorEval
from mmalign.eval.grid import image_grid, mp4_available, save_video_grid
from mmalign.eval.report import write_report
from mmalign.media import MediaBatch


def _videos(b: int = 3, t: int = 5) -> torch.Tensor:
    return torch.rand((b, t, 3, 8, 8), generator=torch.Generator().manual_seed(0))


def test_each_gif_frame_is_the_grid_of_that_frame(tmp_path):
    videos, labels = _videos(), ["a", "b", "c"]
    path = save_video_grid(videos, tmp_path / "grid.gif", labels, columns=3, ms=120)
    gif = Image.open(path)
    frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    assert len(frames) == 5 and gif.info["duration"] == 120 and gif.info["loop"] == 0
    for t, frame in enumerate(frames):
        expected = np.asarray(image_grid(videos[:, t], labels, columns=3))
        assert frame.shape == expected.shape
        assert np.abs(frame.astype(int) - expected.astype(int)).mean() < 8  # GIF's 256-colour palette


def test_save_video_grid_refuses_images(tmp_path):
    with pytest.raises(ValueError, match="videos"):
        save_video_grid(torch.rand(2, 3, 8, 8), tmp_path / "x.gif")


def test_each_mp4_frame_is_the_grid_of_that_frame(tmp_path):
    imageio = pytest.importorskip("imageio")
    pytest.importorskip("imageio_ffmpeg")
    videos, labels = _videos(), ["a", "b", "c"]
    path = save_video_grid(videos, tmp_path / "grid.mp4", labels, columns=3, ms=125)
    reader = imageio.get_reader(path)
    assert reader.get_meta_data()["fps"] == 8
    frames = [np.asarray(f) for f in reader]
    assert len(frames) == 5
    for t, frame in enumerate(frames):
        expected = np.asarray(image_grid(videos[:, t], labels, columns=3))
        h, w = expected.shape[:2]
        assert frame.shape == (-(-h // 16) * 16, -(-w // 16) * 16, 3)  # padded, not rescaled
        assert np.abs(frame[:h, :w].astype(int) - expected.astype(int)).mean() < 12  # H.264 is lossy
        assert frame[h:].min(initial=255) > 200 and frame[:, w:].min(initial=255) > 200  # white padding


def test_mp4_without_imageio_names_the_extra(tmp_path, monkeypatch):
    import mmalign.eval.grid as grid

    monkeypatch.setattr(grid, "mp4_available", lambda: False)
    with pytest.raises(ImportError, match=r"mmalign\[video\]"):
        save_video_grid(_videos(), tmp_path / "grid.mp4")
    with pytest.raises(ValueError, match="path"):
        save_video_grid(_videos(), tmp_path / "grid.avi")


def test_a_video_report_writes_the_gif(tmp_path):
    videos = _videos(2, 4)
    meta = [{"group": 0}, {"group": 1}]

    def run(pixels, scores):
        return GeneratorEval(MediaBatch(pixels, ["p", "q"], meta), {"reward": torch.tensor(scores)})

    summary = write_report(tmp_path, run(videos, [0.1, 0.2]), run(videos.flip(1), [0.3, 0.4]), [])
    assert summary["grid"] == "grid.png" and summary["grid_video"] == "grid.gif"
    assert Image.open(tmp_path / "grid.gif").n_frames == 4
    assert summary["grid_mp4"] == ("grid.mp4" if mp4_available() else None)
    assert (tmp_path / "grid.mp4").is_file() == mp4_available()
    assert Image.open(tmp_path / "grid.png").size[0] > Image.open(tmp_path / "grid.gif").size[0]  # strips of frames
    # one clip a row, before beside after: frame 0 of the GIF is clip 0's and 1's first frames before | after
    after = videos.flip(1)
    first = torch.stack([videos[0, 0], after[0, 0], videos[1, 0], after[1, 0]])
    labels = ["before: p\nreward 0.10", "after: p\nreward 0.30", "before: q\nreward 0.20", "after: q\nreward 0.40"]
    expected = np.asarray(image_grid(first, labels, columns=2))
    gif = Image.open(tmp_path / "grid.gif")
    gif.seek(0)
    frame = np.asarray(gif.convert("RGB"))
    assert frame.shape == expected.shape and np.abs(frame.astype(int) - expected.astype(int)).mean() < 8
