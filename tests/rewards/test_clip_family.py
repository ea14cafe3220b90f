"""CLIP-family rewards against computations done with the backbones' own libraries."""

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmalign import MediaBatch
from mmalign.rewards import build
from mmalign.rewards.aesthetic import AestheticHead
from mmalign.rewards.backbones import hub_file, load_backbone

PROMPTS = ["a red circle", "a blue square on the left", "a red circle"]


def pil_images(n=3):
    return [Image.fromarray(np.random.RandomState(i).randint(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_arch(tiny_open_clip_dir, tmp_path_factory):
    """The tiny OpenCLIP architecture registered under a name, as HPSv2's ViT-H-14 is."""
    config = json.loads((tiny_open_clip_dir / "open_clip_config.json").read_text())
    path = tmp_path_factory.mktemp("arch") / "mmalign-tiny-arch.json"
    path.write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(path)
    return "mmalign-tiny-arch"


def open_clip_reference(folder):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def hf_reference(folder, images, prompts):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    pixels = AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt").pixel_values
    tokens = AutoTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(**tokens)
        image, text = (getattr(x, "pooler_output", x) for x in (image, text))
        cosine = (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)
        return cosine, model.logit_scale.exp().item()


def test_hf_clip_score_matches_transformers(tiny_hf_clip_dir):
    images = pil_images()
    cosine, _ = hf_reference(tiny_hf_clip_dir, images, PROMPTS)
    out = build({"name": "clip", "backend": "hf", "model": str(tiny_hf_clip_dir), "clamp": False})(
        MediaBatch.from_pil(images, PROMPTS)
    )
    torch.testing.assert_close(out.components["cosine"], cosine, atol=1e-5, rtol=1e-5)


def test_pickscore_logits_and_group_softmax(tiny_hf_clip_dir):
    images = pil_images(4)
    prompts = [*PROMPTS, "a blue square on the left"]
    cosine, scale = hf_reference(tiny_hf_clip_dir, images, prompts)
    batch = MediaBatch.from_pil(images, prompts)
    plain = build({"name": "pickscore", "model": str(tiny_hf_clip_dir), "processor": None})(batch)
    torch.testing.assert_close(plain.scores, scale * cosine, atol=1e-4, rtol=1e-5)
    reward = build({"name": "pickscore", "model": str(tiny_hf_clip_dir), "processor": None, "softmax": True})
    assert reward.scope == "group"
    probs = reward(batch).scores
    logits = scale * cosine
    torch.testing.assert_close(probs[[0, 2]], torch.softmax(logits[[0, 2]], 0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs[[1, 3]], torch.softmax(logits[[1, 3]], 0), atol=1e-5, rtol=1e-4)
    grouped = MediaBatch.from_pil(images, prompts, [{"group": 0}] * 4)
    torch.testing.assert_close(reward(grouped).scores, torch.softmax(logits, 0), atol=1e-5, rtol=1e-4)


def test_hpsv2_loads_a_checkpoint_file(tiny_open_clip_dir, tiny_arch, tmp_path):
    model, preprocess, tokenizer = open_clip_reference(tiny_open_clip_dir)
    checkpoint = tmp_path / "HPS_tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, checkpoint)
    images = pil_images()
    with torch.no_grad():
        image = F.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    reward = build({"name": "hpsv2", "checkpoint": str(checkpoint), "architecture": tiny_arch})
    torch.testing.assert_close(reward(MediaBatch.from_pil(images, PROMPTS)).scores, (image * text).sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_is_the_affine_head_on_unit_features(tiny_open_clip_dir, tmp_path, suffix):
    head = AestheticHead(32)
    path = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save(head.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(head.state_dict(), path)
    model, preprocess, _ = open_clip_reference(tiny_open_clip_dir)
    images = pil_images()
    with torch.no_grad():
        x = F.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
        for i in (0, 2, 4, 6, 7):  # the head has no activations: apply its linear layers by hand
            layer = head.layers[i]
            x = x @ layer.weight.T + layer.bias
    reward = build({"name": "aesthetic", "head": str(path), "model": str(tiny_open_clip_dir)})
    torch.testing.assert_close(reward(MediaBatch.from_pil(images, PROMPTS)).scores, x[:, 0], atol=1e-5, rtol=1e-5)
    torch.save({"other": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an aesthetic head state dict"):
        AestheticHead.from_file(tmp_path / "bad.pth")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_goal_baseline_projection_matches_the_matrix_form(tiny_open_clip_dir, alpha):
    reward = build({"name": "goal_baseline", "model": str(tiny_open_clip_dir), "baseline": "a shape",
                    "goal": ["a red circle", "a round red disc"], "alpha": alpha})
    batch = MediaBatch(torch.rand(2, 3, 32, 32), PROMPTS[:2])
    out = reward(batch)
    backbone = reward.backbone
    s = backbone.encode_image(batch.pixels).double().numpy()
    g = F.normalize(backbone.encode_text(["a red circle", "a round red disc"]).mean(0), dim=-1).double().numpy()
    b = backbone.encode_text(["a shape"])[0].double().numpy()
    d = g - b
    P = alpha * np.outer(d, d) / (d @ d) + (1 - alpha) * np.eye(len(d))
    expected = 1 - 0.5 * (((s - g) @ P) ** 2).sum(-1)
    np.testing.assert_allclose(out.scores.numpy(), expected, rtol=1e-5, atol=1e-6)
    if alpha == 0.0:  # plain CLIP similarity
        np.testing.assert_allclose(out.scores.numpy(), s @ g, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"alpha: expected a value in \[0, 1\]"):
        build({"name": "goal_baseline", "model": str(tiny_open_clip_dir), "baseline": "x", "alpha": 2})


def test_goal_defaults_to_each_prompt(tiny_open_clip_dir):
    reward = build({"name": "goal_baseline", "model": str(tiny_open_clip_dir), "baseline": "a shape", "alpha": 0.0})
    batch = MediaBatch(torch.rand(2, 3, 32, 32), PROMPTS[:2])
    cosine = build({"name": "clip", "model": str(tiny_open_clip_dir), "clamp": False})(batch).components["cosine"]
    torch.testing.assert_close(reward(batch).scores, cosine, atol=1e-5, rtol=1e-5)


SPECS = {
    "clip-hf": lambda d: {"name": "clip", "backend": "hf", "model": str(d["hf"]), "clamp": False},
    "pickscore": lambda d: {"name": "pickscore", "model": str(d["hf"]), "processor": None},
    "aesthetic": lambda d: {"name": "aesthetic", "model": str(d["oc"]), "head": str(d["head"])},
    "goal_baseline": lambda d: {"name": "goal_baseline", "model": str(d["oc"]), "baseline": "a shape", "alpha": 0.7},
}


@pytest.mark.parametrize("which", sorted(SPECS))
def test_gradients_match_finite_differences(which, tiny_open_clip_dir, tiny_hf_clip_dir, tmp_path):
    torch.save(AestheticHead(32).state_dict(), tmp_path / "head.pth")
    dirs = {"hf": tiny_hf_clip_dir, "oc": tiny_open_clip_dir, "head": tmp_path / "head.pth"}
    reward = build({**SPECS[which](dirs), "dtype": "float64"})
    assert reward.differentiable
    pixels = (0.2 + 0.6 * torch.rand(2, 3, 32, 32, dtype=torch.float64)).requires_grad_()
    prompts = PROMPTS[:2]
    reward(MediaBatch(pixels, prompts)).scores.sum().backward()
    direction = torch.randn_like(pixels)
    h = 1e-4
    with torch.no_grad():
        plus = reward(MediaBatch(pixels + h * direction, prompts)).scores.double().sum()
        minus = reward(MediaBatch(pixels - h * direction, prompts)).scores.double().sum()
    numeric = (plus - minus) / (2 * h)  # scores are float32: the tolerance covers their rounding
    torch.testing.assert_close((pixels.grad * direction).sum(), numeric, rtol=2e-3, atol=2e-3 * abs(float(numeric)) + 1e-3)


def test_hf_gradient_checkpointing_keeps_values_and_gradients(tiny_hf_clip_dir):
    pixels = torch.rand(2, 3, 32, 32)
    grads, scores = [], []
    for flag in (False, True):
        reward = build({"name": "clip", "backend": "hf", "model": str(tiny_hf_clip_dir), "clamp": False,
                        "gradient_checkpointing": flag})
        x = pixels.clone().requires_grad_()
        out = reward(MediaBatch(x, PROMPTS[:2])).scores
        out.sum().backward()
        grads.append(x.grad)
        scores.append(out.detach())
    torch.testing.assert_close(scores[1], scores[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_backend_argument_errors(tiny_open_clip_dir, tmp_path):
    with pytest.raises(ValueError, match="processor: only the 'hf' backend"):
        load_backbone("open_clip", str(tiny_open_clip_dir), processor="x")
    with pytest.raises(ValueError, match="pretrained: the 'hf' backend loads weights from `model`"):
        load_backbone("hf", "x", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="backend: expected 'open_clip' or 'hf', got 'jax'"):
        load_backbone("jax", "x")
    with pytest.raises(ValueError, match="is not a local file and could not be fetched"):
        hub_file(str(tmp_path / "missing.pt"), "nobody/nothing")
