import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmalign import MediaBatch
from mmalign.rewards import build
from mmalign.rewards.backbones import resolve_dtype
from mmalign.rewards.clip import CLIPScore
from mmalign.rewards.preprocess import resize_center_crop

PROMPTS = ["a red circle", "two blue squares on the left", "a green triangle above a yellow circle"]


def random_images(n=3, size=32):
    return [Image.fromarray(np.random.RandomState(i).randint(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(n)]


def test_matches_open_clip_encoders(tiny_open_clip_dir):
    """Same images through open_clip's own PIL transform and encode_* calls give the same cosine."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_open_clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_open_clip_dir}")
    model.eval()
    images = random_images()
    with torch.no_grad():
        image_emb = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
        text_emb = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    expected = (image_emb * text_emb).sum(-1)

    reward = build({"name": "clip", "model": str(tiny_open_clip_dir), "clamp": False})
    out = reward(MediaBatch.from_pil(images, PROMPTS))
    torch.testing.assert_close(out.components["cosine"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.scores, 100 * expected, atol=1e-3, rtol=1e-5)
    clamped = build({"name": "clip", "model": str(tiny_open_clip_dir), "scale": 2.5})(MediaBatch.from_pil(images, PROMPTS))
    torch.testing.assert_close(clamped.scores, (2.5 * expected).clamp_min(0), atol=1e-5, rtol=1e-5)


def test_builtin_name_with_checkpoint_file(tiny_open_clip_dir, tmp_path):
    """The `pretrained=<file>` route of a named architecture loads the same weights."""
    config = json.loads((tiny_open_clip_dir / "open_clip_config.json").read_text())
    (tmp_path / "mmalign-test-tiny.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(tmp_path / "mmalign-test-tiny.json")
    by_file = CLIPScore("mmalign-test-tiny", pretrained=str(tiny_open_clip_dir / "open_clip_model.safetensors"))
    by_dir = CLIPScore(str(tiny_open_clip_dir))
    batch = MediaBatch.from_pil(random_images(), PROMPTS)
    torch.testing.assert_close(by_file(batch).components["cosine"], by_dir(batch).components["cosine"])
    with pytest.raises(ValueError, match="pretrained: expected a checkpoint file or one of"):
        CLIPScore("mmalign-test-tiny", pretrained="no-such-tag")


def test_gradient_matches_finite_differences(tiny_open_clip_dir):
    reward = CLIPScore(str(tiny_open_clip_dir), dtype="float64", clamp=False)
    pixels = (0.2 + 0.6 * torch.rand(2, 3, 32, 32, dtype=torch.float64)).requires_grad_()
    reward(MediaBatch(pixels, PROMPTS[:2])).scores.sum().backward()
    direction = torch.randn_like(pixels)
    h = 1e-5
    text = reward.backbone.encode_text(PROMPTS[:2])
    assert text.dtype == torch.float64  # scores are float32 by contract; the float64 path is for checks

    def score(x):
        return 100 * (reward.backbone.encode_image(x) * text).sum()

    with torch.no_grad():
        numeric = (score(pixels + h * direction) - score(pixels - h * direction)) / (2 * h)
    analytic = (pixels.grad * direction).sum()
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)
    assert not any(p.grad is not None for p in reward.parameters())


def test_resize_for_other_sizes_and_checkpointing(tiny_open_clip_dir):
    reward = CLIPScore(str(tiny_open_clip_dir), gradient_checkpointing=True, clamp=False)
    pixels = torch.rand(2, 3, 48, 64, requires_grad=True)
    out = reward(MediaBatch(pixels, PROMPTS[:2]))
    out.scores.sum().backward()
    assert pixels.grad.abs().sum() > 0
    plain = CLIPScore(str(tiny_open_clip_dir), clamp=False)(MediaBatch(pixels.detach(), PROMPTS[:2]))
    torch.testing.assert_close(out.scores.detach(), plain.scores)


def test_video_is_mean_of_frames(tiny_open_clip_dir):
    reward = CLIPScore(str(tiny_open_clip_dir), clamp=False)
    frames = torch.rand(2, 4, 3, 32, 32)
    video = reward(MediaBatch(frames, PROMPTS[:2])).scores
    flat = reward(MediaBatch(frames.flatten(0, 1), [p for p in PROMPTS[:2] for _ in range(4)])).scores
    torch.testing.assert_close(video, flat.view(2, 4).mean(1), atol=1e-4, rtol=1e-5)


def test_text_cache_is_bounded(tiny_open_clip_dir):
    from mmalign.rewards.backbones import OpenCLIPBackbone

    backbone = OpenCLIPBackbone(str(tiny_open_clip_dir), text_cache_size=2)
    first = backbone.encode_text(PROMPTS)
    assert len(backbone._text_cache) == 2
    torch.testing.assert_close(backbone.encode_text(PROMPTS), first)


def test_a_cached_text_embedding_does_not_depend_on_its_batch(tiny_open_clip_dir):
    """A resumed run meets its prompts in other batches than a straight one: the cache must give the same bits."""
    from mmalign.rewards.backbones import OpenCLIPBackbone

    prompts = [f"{n} red circles" for n in range(8)]  # from four rows on, a batch's rounding differs from one row's
    together = OpenCLIPBackbone(str(tiny_open_clip_dir)).encode_text(prompts)
    alone = OpenCLIPBackbone(str(tiny_open_clip_dir))
    for i, prompt in enumerate(prompts):
        assert torch.equal(alone.encode_text([prompt])[0], together[i]), prompt


def test_resize_center_crop_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    pixels = torch.rand(2, 3, 48, 64)
    ours = resize_center_crop(pixels, 32)
    reference = TF.center_crop(TF.resize(pixels, 32, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), 32)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert resize_center_crop(pixels[..., :32, :32], 32) is not None
    torch.testing.assert_close(resize_center_crop(pixels[..., :32, :32], 32), pixels[..., :32, :32])
    with pytest.raises(ValueError, match="interpolation: expected one of"):
        resize_center_crop(pixels, 32, "lanczos")


def test_dtype_names():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype: expected one of"):
        resolve_dtype("float8")
