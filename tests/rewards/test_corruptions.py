"""Corruptions: identity at strength 0, range kept, each kind visible, seeded, clear errors."""

from __future__ import annotations

import pytest
import torch

from mmalign.rewards.corruptions import CORRUPTIONS, corrupt
from mmalign.world import render_batch, sample_scenes

IMAGES = render_batch(sample_scenes(16, "train", seed=8), 32, jitter=0.0)


def test_all_kinds_listed():
    assert set(CORRUPTIONS) == {
        "grid",
        "checkerboard",
        "overexposure",
        "oversaturation",
        "noise_blotches",
        "banding",
        "duplicate",
    }


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_identity_at_zero_strength(kind):
    assert torch.equal(corrupt(IMAGES, kind, 0.0), IMAGES)
    assert torch.equal(corrupt(IMAGES[0], kind, 0.0), IMAGES[0])


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_range_shape_and_change(kind, strength):
    out = corrupt(IMAGES, kind, strength, seed=1)
    assert out.shape == IMAGES.shape and out.dtype == IMAGES.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    changed = (out - IMAGES).abs().flatten(1).amax(1)
    assert bool((changed > 0.05).all()), f"{kind} left some images unchanged"
    assert corrupt(IMAGES[0], kind, strength, seed=1).shape == IMAGES[0].shape


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_seeded_and_stronger_changes_more(kind):
    assert torch.equal(corrupt(IMAGES, kind, 0.6, seed=3), corrupt(IMAGES, kind, 0.6, seed=3))
    weak = (corrupt(IMAGES, kind, 0.2, seed=3) - IMAGES).abs().mean()
    strong = (corrupt(IMAGES, kind, 1.0, seed=3) - IMAGES).abs().mean()
    assert float(strong) > float(weak)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"kind: expected one of grid, checkerboard.*got 'jpeg'"):
        corrupt(IMAGES, "jpeg", 0.5)
    with pytest.raises(ValueError, match="strength"):
        corrupt(IMAGES, "grid", 1.5)
    with pytest.raises(ValueError, match="image"):
        corrupt(IMAGES[:, :1], "grid", 0.5)
