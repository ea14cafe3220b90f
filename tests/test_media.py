import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign import MediaBatch


def images(b=2, c=3, h=8, w=8):
    return torch.rand(b, c, h, w)


def prompts(n=2):
    return [f"prompt {i}" for i in range(n)]


class TestValidation:
    def test_valid_images_and_videos(self):
        batch = MediaBatch(images(), prompts())
        assert not batch.is_video and len(batch) == 2 and batch.metadata == [{}, {}]
        video = MediaBatch(torch.rand(2, 5, 3, 8, 8), prompts())
        assert video.is_video and video.batch_size == 2

    @pytest.mark.parametrize(
        ("pixels", "error", "match"),
        [
            (np.zeros((2, 3, 8, 8), np.float32), TypeError, "pixels: expected a torch.Tensor"),
            (torch.rand(3, 8, 8), ValueError, "rank 3"),
            (torch.rand(1, 2, 3, 3, 8, 8), ValueError, "rank 6"),
            (torch.rand(0, 3, 8, 8), ValueError, "batch size 0"),
            (torch.rand(2, 4, 8, 8), ValueError, "got 4"),
            (torch.rand(2, 5, 2, 8, 8), ValueError, "1 or 3 channels"),
            (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError, "from_uint8"),
            (torch.full((2, 3, 8, 8), float("nan")), ValueError, "NaN/Inf"),
            (torch.full((2, 3, 8, 8), float("inf")), ValueError, "NaN/Inf"),
            (torch.full((2, 3, 8, 8), 1.5), ValueError, r"\[0, 1\], got range"),
            (torch.full((2, 3, 8, 8), -0.1), ValueError, r"\[0, 1\], got range"),
        ],
    )
    def test_bad_pixels(self, pixels, error, match):
        with pytest.raises(error, match=match):
            MediaBatch(pixels, prompts())

    def test_prompts(self):
        with pytest.raises(TypeError, match="prompts: expected a list of strings, got str"):
            MediaBatch(images(), "one prompt")
        with pytest.raises(ValueError, match=r"prompts: expected one prompt per sample \(2\), got 3"):
            MediaBatch(images(), prompts(3))
        with pytest.raises(TypeError, match="non-strings at indices \\[1\\]"):
            MediaBatch(images(), ["ok", 3])

    def test_metadata(self):
        with pytest.raises(ValueError, match="metadata: expected one dict per sample"):
            MediaBatch(images(), prompts(), [{}])
        with pytest.raises(TypeError, match="metadata: expected a dict"):
            MediaBatch(images(), prompts(), [{}, "x"])
        batch = MediaBatch(images(), prompts(), [{"a": 1}, {"a": 2}])
        assert batch[1].metadata == [{"a": 2}]


class TestConstructors:
    def test_from_uint8(self):
        raw = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
        batch = MediaBatch.from_uint8(raw, prompts())
        torch.testing.assert_close(batch.pixels, raw.float() / 255)
        with pytest.raises(TypeError, match="expected a uint8"):
            MediaBatch.from_uint8(raw.float(), prompts())

    def test_from_numpy(self):
        arr = np.random.randint(0, 256, (2, 4, 5, 3), dtype=np.uint8)
        batch = MediaBatch.from_numpy(arr, prompts())
        assert batch.pixels.shape == (2, 3, 4, 5)
        torch.testing.assert_close(batch.pixels[1, 2], torch.from_numpy(arr[1, :, :, 2]).float() / 255)
        first = MediaBatch.from_numpy(arr.transpose(0, 3, 1, 2).astype(np.float32) / 255, prompts(), channels_last=False)
        torch.testing.assert_close(first.pixels, batch.pixels)
        grey = MediaBatch.from_numpy(np.zeros((2, 4, 4), np.uint8), prompts())
        assert grey.pixels.shape == (2, 1, 4, 4)
        listed = MediaBatch.from_numpy([arr[0], arr[1]], prompts())
        torch.testing.assert_close(listed.pixels, batch.pixels)

    def test_from_numpy_errors(self):
        with pytest.raises(ValueError, match="mixed sizes"):
            MediaBatch.from_numpy([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)], prompts())
        with pytest.raises(ValueError, match="arrays: expected"):
            MediaBatch.from_numpy(np.zeros((4, 3), np.uint8), ["a"])
        with pytest.raises(TypeError, match="uint8 or floating-point"):
            MediaBatch.from_numpy(np.zeros((2, 4, 4, 3), np.int64), prompts())

    def test_from_pil(self):
        ims = [Image.new("RGB", (6, 4), (255, 0, 0)), Image.new("L", (6, 4), 128)]
        batch = MediaBatch.from_pil(ims, prompts())
        assert batch.pixels.shape == (2, 3, 4, 6)
        torch.testing.assert_close(batch.pixels[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
        torch.testing.assert_close(batch.pixels[1, :, 0, 0], torch.full((3,), 128 / 255))
        with pytest.raises(ValueError, match="at least one PIL image"):
            MediaBatch.from_pil([], [])
        with pytest.raises(TypeError, match="indices \\[1\\]"):
            MediaBatch.from_pil([ims[0], np.zeros((4, 6, 3))], prompts())
        with pytest.raises(ValueError, match="mixed sizes"):
            MediaBatch.from_pil([ims[0], Image.new("RGB", (5, 5))], prompts())

    def test_roundtrip_to_pil(self):
        raw = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
        back = MediaBatch.from_pil(MediaBatch.from_uint8(raw, prompts()).to_pil(), prompts())
        torch.testing.assert_close(back.pixels, raw.float() / 255)


class TestFolder:
    def make(self, folder, n=3, size=(8, 8)):
        for i in range(n):
            Image.new("RGB", size, (i * 40, 0, 0)).save(folder / f"img{i}.png")

    def test_txt_and_jsonl(self, tmp_path):
        self.make(tmp_path)
        (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
        batch = MediaBatch.from_folder(tmp_path)
        assert batch.prompts == ["a", "b", "c"]
        assert [m["file"] for m in batch.metadata] == ["img0.png", "img1.png", "img2.png"]
        rows = [{"file": f"img{i}.png", "prompt": f"p{i}", "seed": i} for i in (2, 0, 1)]
        (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        batch = MediaBatch.from_folder(tmp_path, tmp_path / "p.jsonl", size=4)
        assert batch.prompts == ["p0", "p1", "p2"] and batch.metadata[2]["seed"] == 2
        assert batch.pixels.shape == (3, 3, 4, 4)
        assert MediaBatch.from_folder(tmp_path, ["x", "y", "z"]).prompts == ["x", "y", "z"]

    def test_errors(self, tmp_path):
        with pytest.raises(ValueError, match="folder: expected a directory"):
            MediaBatch.from_folder(tmp_path / "missing")
        with pytest.raises(ValueError, match="found none"):
            MediaBatch.from_folder(tmp_path)
        self.make(tmp_path)
        with pytest.raises(ValueError, match="neither prompts.jsonl nor prompts.txt"):
            MediaBatch.from_folder(tmp_path)
        with pytest.raises(ValueError, match="does not exist"):
            MediaBatch.from_folder(tmp_path, tmp_path / "nope.txt")
        (tmp_path / "prompts.txt").write_text("a\nb\n")
        with pytest.raises(ValueError, match=r"one prompt per image \(3\), got 2"):
            MediaBatch.from_folder(tmp_path)
        (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}))
        with pytest.raises(ValueError, match="needs 'file' and 'prompt'"):
            MediaBatch.from_folder(tmp_path, tmp_path / "bad.jsonl")
        (tmp_path / "part.jsonl").write_text(json.dumps({"file": "img0.png", "prompt": "x"}))
        with pytest.raises(ValueError, match="no prompt for"):
            MediaBatch.from_folder(tmp_path, tmp_path / "part.jsonl")
        Image.new("RGB", (9, 9)).save(tmp_path / "img3.png")
        with pytest.raises(ValueError, match="mixed sizes"):
            MediaBatch.from_folder(tmp_path, list("abcd"))


def test_indexing_concat_to():
    batch = MediaBatch(images(4), prompts(4), [{"i": i} for i in range(4)])
    assert batch[1:3].prompts == ["prompt 1", "prompt 2"]
    assert batch[torch.tensor([3, 0])].metadata == [{"i": 3}, {"i": 0}]
    both = MediaBatch.concat([batch[:1], batch[2:]])
    torch.testing.assert_close(both.pixels, batch.pixels[[0, 2, 3]])
    with pytest.raises(ValueError, match="same per-sample shape"):
        MediaBatch.concat([batch, MediaBatch(images(1, h=4, w=4), ["x"])])
    with pytest.raises(ValueError, match="at least one"):
        MediaBatch.concat([])
    assert batch.to(dtype=torch.float64).pixels.dtype == torch.float64


def test_completions():
    batch = MediaBatch(images(3), prompts(3), completions=["<answer>red</answer>", "", "x"])
    assert batch[[2, 0]].completions == ["x", "<answer>red</answer>"]
    assert MediaBatch.concat([batch, batch]).completions[3] == "<answer>red</answer>"
    assert batch.to(dtype=torch.float64).completions == batch.completions
    with pytest.raises(ValueError, match=r"completions: expected one string per sample \(3\), got 2"):
        MediaBatch(images(3), prompts(3), completions=["a", "b"])
    with pytest.raises(ValueError, match="got a string"):
        MediaBatch(images(3), prompts(3), completions="abc")
    with pytest.raises(TypeError, match="completions: expected strings"):
        MediaBatch(images(3), prompts(3), completions=["a", None, "c"])
    with pytest.raises(ValueError, match="all or none"):
        MediaBatch.concat([batch, MediaBatch(images(1), ["p"])])
