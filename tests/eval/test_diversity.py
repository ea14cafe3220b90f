"""Diversity metrics per prompt, checked against independent computations, and their place in the report."""

import json
import math

import numpy as np
import pytest
import torch

from mmalign.eval.diversity import (
    brightness,
    color_entropy,
    diversity_scores,
    image_encoder,
    overexposed_fraction,
    pairwise_distance,
    saturation,
    vendi_score,
)
from mmalign.eval.generator import GeneratorEval
from mmalign.eval.report import write_report
from mmalign.media import MediaBatch


def _numpy_vendi(x: np.ndarray) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    lam = np.linalg.eigvals(x @ x.T / len(x)).real  # general eigen-solver, not the symmetric one
    lam = lam[lam > 1e-12]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def test_vendi_bounds_and_an_independent_computation():
    assert vendi_score(torch.ones(5, 3) * torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(torch.eye(4, 7) * 3.0) == pytest.approx(4.0, abs=1e-9)  # orthogonal, any norm
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert vendi_score(q[:, :5].T) == pytest.approx(5.0, abs=1e-9)
    x = torch.randn(6, 4)
    assert vendi_score(x) == pytest.approx(_numpy_vendi(x.double().numpy()), rel=1e-9)
    # two identical pairs: λ = (1/2, 1/2) for orthogonal pairs → exactly 2
    assert vendi_score(torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])) == pytest.approx(2.0, abs=1e-9)


def test_pairwise_distance_is_the_mean_over_pairs():
    x = torch.randn(5, 8, dtype=torch.float64)
    unit = x / x.norm(dim=1, keepdim=True)
    pairs = [1 - float(unit[i] @ unit[j]) for i in range(5) for j in range(i + 1, 5)]
    assert pairwise_distance(x) == pytest.approx(sum(pairs) / len(pairs), rel=1e-9)
    assert pairwise_distance(torch.ones(3, 2)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(pairwise_distance(torch.ones(1, 2)))


def test_color_entropy():
    one_colour = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert color_entropy(one_colour) == 0.0
    split = torch.zeros(1, 3, 4, 4)
    split[..., :2] = 1.0  # half white, half black
    assert color_entropy(split) == pytest.approx(1.0)
    four = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 0.3, 0.6, 1.0)])  # four grey levels, equal parts
    assert color_entropy(four) == pytest.approx(2.0)
    assert color_entropy(torch.full((1, 1, 2, 2), 0.5)) == 0.0  # grey images count as RGB


def test_brightness_saturation_overexposure_on_hand_built_images():
    pixels = torch.zeros(1, 3, 1, 4)
    pixels[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # pure red: luma 0.299, saturation 1
    pixels[0, :, 0, 1] = torch.tensor([1.0, 1.0, 1.0])  # white: luma 1, saturation 0, over-exposed
    pixels[0, :, 0, 2] = torch.tensor([0.5, 0.25, 0.5])  # luma 0.149 5 + 0.146 75 + 0.057, saturation 0.5
    # pixel 3 black: luma 0, saturation 0 (not NaN)
    luma = [0.299, 1.0, 0.299 * 0.5 + 0.587 * 0.25 + 0.114 * 0.5, 0.0]
    assert brightness(pixels) == pytest.approx(sum(luma) / 4)
    assert saturation(pixels) == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert overexposed_fraction(pixels) == pytest.approx(0.25)
    yellowish = torch.tensor([1.0, 1.0, 0.6]).view(1, 3, 1, 1)  # bright (luma > 0.95) but not blown out
    assert overexposed_fraction(yellowish) == 0.0


def test_scores_per_group_in_sorted_group_order():
    pixels = torch.rand(6, 3, 4, 4)
    pixels[[1, 4]] = 1.0  # group 3's samples: white
    groups = [7, 3, 7, 7, 3, 5]
    embeddings = torch.eye(6, 6)
    embeddings[4] = embeddings[1]  # group 3: identical embeddings

    def encoder(x):  # looks the embedding up by the image's content
        return torch.stack([embeddings[int((pixels.flatten(1) == row).all(1).nonzero()[0])] for row in x.flatten(1)])

    scores = diversity_scores(pixels, groups, encoder, batch_size=4)
    assert set(scores) == {"diversity/vendi", "diversity/pairwise_distance", "diversity/color_entropy",
                           "diversity/brightness", "diversity/saturation", "diversity/overexposed"}
    assert scores["diversity/vendi"].tolist() == pytest.approx([1.0, 1.0, 3.0])  # groups 3, 5, 7
    assert math.isnan(scores["diversity/pairwise_distance"][1])  # one sample
    assert scores["diversity/overexposed"][0] == 1.0 and scores["diversity/color_entropy"][0] == 0.0
    assert scores["diversity/brightness"][2] == pytest.approx(brightness(pixels[[0, 2, 3]]))
    no_encoder = diversity_scores(MediaBatch(pixels, ["p"] * 6, [{"group": g} for g in groups]))
    assert "diversity/vendi" not in no_encoder
    assert torch.equal(no_encoder["diversity/saturation"], scores["diversity/saturation"])
    with pytest.raises(ValueError, match="group"):
        diversity_scores(MediaBatch(pixels, ["p"] * 6))


def test_image_encoder_of_a_reward(tiny_open_clip_dir):
    from mmalign.rewards import build

    clip = build({"name": "clip", "model": str(tiny_open_clip_dir), "pretrained": None})
    assert image_encoder(clip) == clip.backbone.encode_image
    total = build([{"name": "jpeg_compressibility", "weight": 1.0},
                   {"name": "clip", "model": str(tiny_open_clip_dir), "pretrained": None, "weight": 1.0}])
    assert image_encoder(total)(torch.rand(2, 3, 32, 32)).shape == (2, 32)  # a composite: its CLIP member's
    with pytest.raises(ValueError, match="'jpeg_compressibility'.*no image encoder"):
        image_encoder(build("jpeg_compressibility"))


def _eval(pixels: torch.Tensor, prompts: list[str], samples: int, gold: torch.Tensor) -> GeneratorEval:
    metadata = [{"group": i // samples} for i in range(len(pixels))]
    return GeneratorEval(MediaBatch(pixels, prompts, metadata), {"gold": gold})


def test_report_summary_carries_diversity(tmp_path, tiny_open_clip_dir):
    from mmalign.rewards import build

    encoder = image_encoder(build({"name": "clip", "model": str(tiny_open_clip_dir), "pretrained": None}))
    prompts = [p for p in ("a red circle", "two blue squares", "a green star") for _ in range(4)]
    pixels = torch.rand(12, 3, 32, 32)
    collapsed = pixels.view(3, 4, 3, 32, 32)[:, :1].expand(3, 4, 3, 32, 32).reshape(12, 3, 32, 32)  # one image each
    before = _eval(pixels, prompts, 4, torch.rand(12)).add_diversity(encoder)
    after = _eval(collapsed, prompts, 4, torch.rand(12)).add_diversity(encoder)
    summary = write_report(tmp_path, before, after, [], limit=0)
    assert json.loads((tmp_path / "summary.json").read_text())["diversity_ratio"] == summary["diversity_ratio"]
    for key in ("diversity/vendi", "diversity/pairwise_distance", "diversity/color_entropy", "diversity/brightness",
                "diversity/saturation", "diversity/overexposed"):
        assert summary["before"][key]["n"] == 3 and summary["after"][key]["n"] == 3  # one value per prompt
        assert summary["paired_change"][key]["n"] == 3
        assert summary["paired_change"][key]["mean"] == pytest.approx(summary["change"][key])
        assert len(summary["diversity_per_prompt"]["before"][key]) == 3
    assert summary["after"]["diversity/vendi"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert summary["diversity_ratio"] == pytest.approx(1.0 / summary["before"]["diversity/vendi"]["mean"])
    assert summary["diversity_ratio"] < 1.0  # collapsed to one image per prompt
    assert summary["diversity_per_prompt"]["prompts"] == ["a red circle", "two blue squares", "a green star"]
    assert summary["paired_change"]["gold"]["n"] == 12
    plain = write_report(tmp_path, _eval(pixels, prompts, 4, torch.rand(12)), after, [], limit=0)
    assert "diversity_ratio" not in plain and "diversity/vendi" not in plain["paired_change"]


def test_diffusion_report_embeds_with_the_trained_reward_or_the_option(tmp_path, tiny_sd_factory, tiny_open_clip_dir,
                                                                       capsys):
    """A report straight after setup (before = after): the trained CLIP reward's encoder by default, pixel metrics
    only with a note for a reward without one, ``report.diversity_encoder`` to name one."""
    from mmalign.trainers.prdp import PRDPConfig, PRDPTrainer

    clip = {"name": "clip", "model": str(tiny_open_clip_dir), "pretrained": None}
    report = {"prompts": {"world": "heldout", "n": 2, "seed": 1}, "samples_per_prompt": 2, "grid_prompts": 0}
    base = {"pipeline": "world", "prompts": {"world": "train", "n": 4}, "epochs": 1, "prompts_per_epoch": 2,
            "samples_per_prompt": 2, "prompts_per_update": 2, "num_steps": 2, "lora": {"rank": 2, "alpha": 2}}
    cases = [(clip, None, "reward"), ("jpeg_compressibility", None, None), ("jpeg_compressibility", clip, clip)]
    for k, (reward, encoder, named) in enumerate(cases):
        cfg = PRDPConfig(**base, reward=[reward], output_dir=str(tmp_path / f"run{k}"),
                         report={**report, "diversity_encoder": encoder})
        trainer = PRDPTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
        trainer.setup()
        try:
            summary = trainer.report()
        finally:
            trainer.cleanup()
        assert summary["diversity_encoder"] == named
        assert summary["paired_change"]["diversity/brightness"]["n"] == 2
        if named is None:
            assert "diversity/vendi" not in summary["before"] and summary["diversity_ratio"] is None
            assert "no image encoder" in capsys.readouterr().out
        else:
            assert summary["diversity_ratio"] == pytest.approx(1.0)  # untrained LoRA: after is before
