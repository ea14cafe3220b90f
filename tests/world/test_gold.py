"""The gold reward on MediaBatches: the verifier's scores, per-kind components, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.media import MediaBatch
from mmalign.rewards.corruptions import corrupt
from mmalign.world import GoldReward, caption, render_batch, sample_scenes, verify
from mmalign.world.gold import ATTRIBUTE_KINDS

SCENES = sample_scenes(24, "train", seed=31) + sample_scenes(8, "heldout", seed=31)


def _batch(images: torch.Tensor, as_dict: bool = True) -> MediaBatch:
    meta = [{"scene": s.to_dict() if as_dict else s} for s in SCENES]
    return MediaBatch(images, [caption(s, i) for i, s in enumerate(SCENES)], meta)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    clean = render_batch(SCENES, 32, jitter=1.0, seed=0)
    # half clean, half damaged, so that scores and components vary
    damaged = torch.stack(
        [
            corrupt(x, "oversaturation" if i % 2 else "noise_blotches", 1.0, i)
            for i, x in enumerate(clean[16:])
        ]
    )
    return torch.cat([clean[:16], damaged])


def test_contract():
    reward = GoldReward()
    assert (reward.name, reward.scope, reward.differentiable) == ("gold", "sample", False)


def test_scores_match_per_image_verify(images):
    out = GoldReward()(_batch(images))
    expected = [verify(x, s) for x, s in zip(images, SCENES)]
    assert out.scores.shape == (len(SCENES),) and out.scores.dtype == torch.float32
    assert out.scores.tolist() == pytest.approx([r.score for r in expected])
    assert float(out.scores[:16].mean()) == 1.0 and float(out.scores[16:].mean()) < 1.0
    assert set(out.components) == set(ATTRIBUTE_KINDS)
    for kind, values in out.components.items():
        # reference: fraction of that kind's checks passed, 1 where the prompt states none
        reference = []
        for r in expected:
            oks = [ok for name, ok in r.checks.items() if name.split(".")[-1] == kind]
            reference.append(sum(oks) / len(oks) if oks else 1.0)
        assert values.tolist() == pytest.approx(reference), kind
        assert bool(torch.isfinite(values).all())
    counted = [ok for r in expected for name, ok in r.checks.items() if name.split(".")[-1] == "colour"]
    assert out.info["colour_rate"] == pytest.approx(sum(counted) / len(counted))
    assert all(0 <= v <= 1 and not math.isnan(v) for v in out.info.values())


def test_scenes_as_objects_and_grey_images(images):
    assert (
        GoldReward()(_batch(images, as_dict=False)).scores.tolist()
        == GoldReward()(_batch(images)).scores.tolist()
    )
    grey = MediaBatch(images[:2].mean(1, keepdim=True), ["a", "b"], [{"scene": s} for s in SCENES[:2]])
    assert GoldReward()(grey).scores.shape == (2,)


def test_missing_scene_names_the_metadata_key(images):
    batch = MediaBatch(
        images[:2], ["a red circle", "two blue squares"], [{"scene": SCENES[0]}, {"file": "x.png"}]
    )
    with pytest.raises(ValueError, match=r"metadata\['scene'\].*sample 1"):
        GoldReward()(batch)
