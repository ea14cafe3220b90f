"""D²-Align's direction-corrected reward against its formula on hand-built embeddings and on tiny HPSv2 and
PickScore models, and stage 1's sign."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmalign import MediaBatch
from mmalign.rewards import Reward, RewardOutput, build
from mmalign.rewards.clip import CLIPFamilyReward
from mmalign.rewards.direction import (
    CORRECTION_KEY,
    DirectionCorrected,
    correction_objective,
    cosine_to_score,
    learn_correction,
    load_correction,
    save_correction,
)

D = 8
PROMPTS = ["a red circle", "a blue square", "a green star"]


class FixedBackbone(nn.Module):
    """Fixed encoders: a prompt's embedding is a fixed random unit vector; an image's is its pixels, read as a
    ``(D,)`` vector through ``2x − 1`` and normalised (images are ``(B, 1, 1, D)``)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", F.normalize(torch.randn(len(PROMPTS), D, generator=g, dtype=torch.float64), dim=-1))

    def encode_text(self, prompts):
        return torch.stack([self.table[PROMPTS.index(p)] for p in prompts]).float()

    def encode_image(self, pixels):
        return F.normalize(pixels.flatten(1) * 2 - 1, dim=-1)


class FixedCLIP(CLIPFamilyReward):
    """``scale·cos`` on the fixed backbone, as CLIPScore computes it."""

    name = "fixed_clip"

    def __init__(self, scale: float = 100.0, seed: int = 0) -> None:
        super().__init__(FixedBackbone(seed))
        self.scale = scale

    def forward(self, batch):
        cosine = self.cosines(batch)
        return RewardOutput(self.scale * cosine.float(), {"cosine": cosine.float()})


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def expected_scores(reward, pixels, prompts, b, omega):
    """The formula written out in NumPy float64; ``pixels`` ``(B, T, 1, 1, D)`` or ``(B, 1, 1, D)``."""
    e = reward.backbone.encode_text(prompts).double().numpy()
    plus, minus = unit(e + b), unit(e - b)
    guided = unit(minus + omega * (plus - minus))
    x = pixels.double().numpy()
    x = x.reshape(x.shape[0], -1 if x.ndim == 4 else x.shape[1], D) if x.ndim == 5 else x.reshape(x.shape[0], 1, D)
    image = unit(2 * x - 1)
    return reward.scale * (image * guided[:, None]).sum(-1).mean(1), (image * e[:, None]).sum(-1).mean(1)


def batch(n=3, frames=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 1, D) if frames is None else (n, frames, 1, 1, D)
    return MediaBatch(torch.rand(shape, generator=g), [PROMPTS[i % len(PROMPTS)] for i in range(n)])


@pytest.mark.parametrize("omega", [1.5, 1.0, 3.0])
def test_scores_follow_the_formula(omega):
    reward = FixedCLIP(scale=2.5)
    b = torch.randn(D, generator=torch.Generator().manual_seed(1)) * 0.3
    media = batch(5)
    out = DirectionCorrected(reward, b, omega)(media)
    scores, plain = expected_scores(reward, media.pixels, media.prompts, b.double().numpy(), omega)
    np.testing.assert_allclose(out.scores.numpy(), scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.components["corrected_cosine"].numpy(), scores / 2.5, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.components["cosine"].numpy(), plain, rtol=1e-5, atol=1e-6)
    assert out.scores.dtype == torch.float32 and not np.allclose(scores / 2.5, plain, atol=1e-3)


def test_videos_are_scored_per_frame_and_averaged():
    reward = FixedCLIP()
    b = torch.randn(D, generator=torch.Generator().manual_seed(2)) * 0.2
    media = batch(3, frames=4)
    out = DirectionCorrected(reward, b)(media)
    scores, _ = expected_scores(reward, media.pixels, media.prompts, b.double().numpy(), 1.5)
    np.testing.assert_allclose(out.scores.numpy(), scores, rtol=1e-5, atol=1e-4)


def test_zero_correction_is_the_wrapped_reward_exactly(tiny_open_clip_dir, tmp_path):
    fixed = FixedCLIP()
    media = batch(4)
    out = DirectionCorrected(fixed, torch.zeros(D))(media)
    assert torch.equal(out.scores, fixed(media).scores)
    assert torch.equal(out.components["corrected_cosine"], out.components["cosine"])

    clip = {"name": "clip", "model": str(tiny_open_clip_dir), "pretrained": None, "clamp": False, "scale": 50.0}
    path = save_correction(tmp_path / "zero.safetensors", torch.zeros(32), {"reward": "clip"})
    corrected = build({"name": "direction_corrected", "reward": clip, "correction": str(path), "omega": 1.5})
    images = MediaBatch(torch.rand(3, 3, 20, 24), PROMPTS)
    assert torch.equal(corrected(images).scores, build(clip)(images).scores)


def test_differentiable_in_the_pixels():
    reward = DirectionCorrected(FixedCLIP(), torch.randn(D) * 0.3, 1.5)
    assert reward.differentiable and not any(p.requires_grad for p in reward.parameters())
    media = batch(3)
    pixels = media.pixels.clone().requires_grad_(True)
    reward(MediaBatch(pixels, media.prompts)).scores.sum().backward()
    # the same formula with torch ops, differentiated independently
    ref = pixels.detach().clone().requires_grad_(True)
    e = reward.backbone.encode_text(media.prompts)
    b = reward.correction
    plus, minus = F.normalize(e + b, dim=-1), F.normalize(e - b, dim=-1)
    guided = F.normalize(minus + 1.5 * (plus - minus), dim=-1)
    (100 * (F.normalize(ref.flatten(1) * 2 - 1, dim=-1) * guided).sum(-1)).sum().backward()
    assert pixels.grad.abs().sum() > 0
    torch.testing.assert_close(pixels.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_refuses_rewards_that_are_not_clip_type(tmp_path):
    with pytest.raises(ValueError, match="'jpeg_compressibility'"):
        DirectionCorrected("jpeg_compressibility", torch.zeros(D))

    class NoScale(CLIPFamilyReward):
        name = "no_scale"

        def __init__(self):
            super().__init__(FixedBackbone())

        def forward(self, batch):
            return RewardOutput(self.cosines(batch).float())

    with pytest.raises(ValueError, match="'no_scale'"):
        DirectionCorrected(NoScale(), torch.zeros(D))

    class Plain(Reward):
        name = "plain"
        scale = 1.0

    with pytest.raises(ValueError, match="'plain'"):
        DirectionCorrected(Plain(), torch.zeros(D))
    class BoolScale(NoScale):
        name = "bool_scale"
        scale = True

    with pytest.raises(ValueError, match="'bool_scale'"):
        DirectionCorrected(BoolScale(), torch.zeros(D))
    with pytest.raises(ValueError, match="omega"):
        DirectionCorrected(FixedCLIP(), torch.zeros(D), omega=float("nan"))
    with pytest.raises(ValueError, match="1-D"):
        DirectionCorrected(FixedCLIP(), torch.zeros(2, D))
    with pytest.raises(ValueError, match="has 5 dimensions"):
        DirectionCorrected(FixedCLIP(), torch.zeros(5))(batch(2))


# ------------------------------------------------------------------------------------------------ HPSv2, PickScore
@pytest.fixture(scope="module")
def hps_spec(tiny_open_clip_dir, tmp_path_factory):
    """An HPSv2 spec on the tiny OpenCLIP model: its architecture registered under a name (as ViT-H-14 is) and
    its weights saved as an HPS checkpoint."""
    import open_clip

    config = json.loads((tiny_open_clip_dir / "open_clip_config.json").read_text())
    folder = tmp_path_factory.mktemp("hps")
    (folder / "mmalign-tiny-hps-arch.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(folder / "mmalign-tiny-hps-arch.json")
    model = open_clip.create_model(f"local-dir:{tiny_open_clip_dir}")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, folder / "HPS_tiny.pt")
    return {"name": "hpsv2", "checkpoint": str(folder / "HPS_tiny.pt"), "architecture": "mmalign-tiny-hps-arch"}


CLIP_TYPE = {
    "hpsv2": lambda hps, hf: hps,
    "pickscore": lambda hps, hf: {"name": "pickscore", "model": str(hf), "processor": None},
    "pickscore-softmax": lambda hps, hf: {"name": "pickscore", "model": str(hf), "processor": None, "softmax": True},
}


def clip_type_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = ["a red circle", "a blue square", "a red circle", "a blue square", "a red circle"]
    return MediaBatch(torch.rand(5, 3, 32, 32, generator=g), prompts)


@pytest.mark.parametrize("which", sorted(CLIP_TYPE))
def test_zero_correction_is_hpsv2_and_pickscore_exactly(which, hps_spec, tiny_hf_clip_dir, tmp_path):
    reward = build(CLIP_TYPE[which](hps_spec, tiny_hf_clip_dir))
    media = clip_type_batch()
    dim = reward.backbone.encode_text(["x"]).shape[-1]
    corrected = DirectionCorrected(reward, torch.zeros(dim), 1.5)
    assert corrected.scope == reward.scope == ("group" if which.endswith("softmax") else "sample")
    out = corrected(media)
    assert torch.equal(out.scores, reward(media).scores)
    assert torch.equal(out.components["corrected_cosine"], out.components["cosine"])
    assert torch.equal(out.components["cosine"], reward(media).components["cosine"])
    # and built from a spec with a zero correction file, as a recipe would
    path = save_correction(tmp_path / "zero.safetensors", torch.zeros(dim), {"reward": reward.name})
    spec = {"name": "direction_corrected", "reward": CLIP_TYPE[which](hps_spec, tiny_hf_clip_dir),
            "correction": str(path)}
    assert torch.equal(build(spec)(media).scores, reward(media).scores)


@pytest.mark.parametrize("which", sorted(CLIP_TYPE))
def test_hpsv2_and_pickscore_corrections_follow_the_formula(which, hps_spec, tiny_hf_clip_dir):
    """With b ≠ 0 the score is the wrapped reward's map (cos; logit_scale·cos; its group softmax) applied to the
    cosine against ẽ, the formula written out in NumPy on the backbone's own embeddings."""
    reward = build(CLIP_TYPE[which](hps_spec, tiny_hf_clip_dir))
    media = clip_type_batch(1)
    backbone = reward.backbone
    e = backbone.encode_text(media.prompts).double().numpy()
    b = 0.3 * F.normalize(torch.randn(e.shape[-1], generator=torch.Generator().manual_seed(3)), dim=0)
    out = DirectionCorrected(reward, b, 1.5)(media)
    plus, minus = unit(e + b.double().numpy()), unit(e - b.double().numpy())
    guided = unit(minus + 1.5 * (plus - minus))
    image = backbone.encode_image(media.pixels).double().numpy()
    cosine = (image * guided).sum(-1)
    np.testing.assert_allclose(out.components["corrected_cosine"].numpy(), cosine, rtol=1e-5, atol=1e-6)
    if which == "hpsv2":
        expected = cosine
    else:
        logits = backbone.logit_scale * cosine
        expected = logits
        if which.endswith("softmax"):  # groups: the samples of one prompt
            expected = np.empty_like(logits)
            for group in ([0, 2, 4], [1, 3]):
                z = np.exp(logits[group] - logits[group].max())
                expected[group] = z / z.sum()
    np.testing.assert_allclose(out.scores.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(cosine, (image * e).sum(-1), atol=1e-4)  # the correction changed the cosine


def test_hpsv2_and_pickscore_are_differentiable_through_the_correction(hps_spec, tiny_hf_clip_dir):
    for which in ("hpsv2", "pickscore"):
        reward = build(CLIP_TYPE[which](hps_spec, tiny_hf_clip_dir))
        media = clip_type_batch(2)
        dim = reward.backbone.encode_text(["x"]).shape[-1]
        corrected = DirectionCorrected(reward, 0.2 * F.normalize(torch.randn(dim), dim=0))
        assert corrected.differentiable
        pixels = media.pixels.clone().requires_grad_(True)
        corrected(MediaBatch(pixels, media.prompts)).scores.sum().backward()
        assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_score_maps_and_refusals_of_the_rewards_in_the_box(hps_spec, tiny_open_clip_dir, tiny_hf_clip_dir, tmp_path):
    """What cosine_to_score says about the built-in rewards: a map for the CLIP-type ones, None for the aesthetic
    head (no text embedding), goal–baseline (not a function of the prompt cosine) and JPEG (no backbone)."""
    from mmalign.rewards.aesthetic import AestheticHead

    torch.save(AestheticHead(32).state_dict(), tmp_path / "head.pth")
    cosine = torch.tensor([0.1, -0.2, 0.3])
    clip = build({"name": "clip", "model": str(tiny_open_clip_dir), "pretrained": None, "scale": 2.5})
    torch.testing.assert_close(cosine_to_score(clip)(cosine, None), 2.5 * cosine)  # unclamped
    assert torch.equal(cosine_to_score(build(hps_spec))(cosine, None), cosine)
    pick = build(CLIP_TYPE["pickscore"](hps_spec, tiny_hf_clip_dir))
    torch.testing.assert_close(cosine_to_score(pick)(cosine, None), pick.backbone.logit_scale * cosine)
    with pytest.raises(ValueError, match="needs the batch"):
        build(CLIP_TYPE["pickscore-softmax"](hps_spec, tiny_hf_clip_dir)).score_from_cosine(cosine)
    refused = {
        "aesthetic": {"name": "aesthetic", "model": str(tiny_open_clip_dir), "pretrained": None,
                      "head": str(tmp_path / "head.pth")},
        "goal_baseline": {"name": "goal_baseline", "model": str(tiny_open_clip_dir), "pretrained": None,
                          "baseline": "a shape"},
        "jpeg_compressibility": "jpeg_compressibility",
    }
    for name, spec in refused.items():
        reward = build(spec)
        assert cosine_to_score(reward) is None
        with pytest.raises(ValueError, match=f"got '{name}'"):
            DirectionCorrected(reward, torch.zeros(32))


def test_correction_files_round_trip(tmp_path):
    b = torch.randn(D)
    path = save_correction(tmp_path / "sub" / "b.safetensors", b, {"reward": "fixed_clip", "omega": 1.5})
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.safetensors"]  # no temporary file left
    loaded, meta = load_correction(path)
    assert torch.equal(loaded, b) and meta == {"reward": "fixed_clip", "omega": "1.5"}
    from safetensors.torch import load_file

    assert list(load_file(path)) == [CORRECTION_KEY]
    corrected = DirectionCorrected(FixedCLIP(), path)
    assert torch.equal(corrected.correction, b)
    with pytest.raises(ValueError, match="learned for reward 'fixed_clip', not 'other'"):
        other = FixedCLIP()
        other.name = "other"
        DirectionCorrected(other, path)
    with pytest.raises(FileNotFoundError, match="no file"):
        load_correction(tmp_path / "missing.safetensors")


def shared_mode_embeddings(n=96, seed=0):
    """Image embeddings that all share a component ``u`` (the generator's mode), on top of their prompt's."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(D, generator=g), dim=0)
    prompts = F.normalize(torch.randn(6, D, generator=g), dim=-1)
    which = torch.arange(n) % 6
    text = prompts[which]
    image = F.normalize(0.6 * u + 0.5 * text + 0.3 * torch.randn(n, D, generator=g), dim=-1)
    return image, text, u


def test_stage_one_points_away_from_the_shared_mode():
    image, text, u = shared_mode_embeddings()
    init = F.normalize(torch.randn(D, generator=torch.Generator().manual_seed(5)), dim=0)
    fit = learn_correction(image, text, steps=600, lr=0.02, radius=0.3, init=init)
    b = fit.correction
    assert abs(float(b.norm()) - 0.3) < 1e-5
    assert float(F.cosine_similarity(b, u, dim=0)) < -0.7
    assert float(F.cosine_similarity(b, fit.initial, dim=0)) < 0.99  # stage 1 moved b
    assert fit.objective_after < fit.objective_before
    torch.testing.assert_close(torch.tensor(fit.objective_after), correction_objective(image, text, b))
    # no direction on the sphere does better than the learned one (a crude check of the minimum)
    others = 0.3 * F.normalize(torch.randn(2000, D, generator=torch.Generator().manual_seed(9)), dim=-1)
    assert all(float(correction_objective(image, text, o)) >= fit.objective_after - 1e-4 for o in others[:200])
    # deterministic: same inputs, same b
    assert torch.equal(learn_correction(image, text, steps=600, lr=0.02, radius=0.3, init=init).correction, b)


def test_the_corrected_reward_stops_paying_for_the_mode():
    """Learned on samples sharing u, the correction lowers the score of an image that follows the mode,
    relative to one that follows only its prompt: the guided reward pays less for the shared mode."""
    image, text, u = shared_mode_embeddings()
    b = learn_correction(image, text, steps=600, lr=0.02, radius=0.3).correction

    def score(x, e, correction):
        plus, minus = F.normalize(e + correction, dim=-1), F.normalize(e - correction, dim=-1)
        return float((x * F.normalize(minus + 1.5 * (plus - minus), dim=-1)).sum())

    e = text[0]
    moded, plain = F.normalize(0.6 * u + 0.8 * e, dim=0), e
    gap_plain = score(moded, e, torch.zeros(D)) - score(plain, e, torch.zeros(D))
    gap_corrected = score(moded, e, b) - score(plain, e, b)
    assert gap_corrected < gap_plain - 0.1
    with pytest.raises(ValueError, match="radius"):
        learn_correction(image, text, radius=0.0)
    with pytest.raises(ValueError, match="image, text"):
        learn_correction(image, text[:3])
