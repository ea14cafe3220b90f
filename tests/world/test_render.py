"""Renders: shapes, ranges, anti-aliasing and coverage against the geometry of each shape."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmalign.world import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Scene,
    SceneObject,
    render,
    render_batch,
    sample_scenes,
)

_UNIT_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # of a shape whose box has side 1


def _coverage(image: torch.Tensor, colour: str, background: str) -> torch.Tensor:
    """Share of the object colour in each pixel, read on the channel where colour and background differ most."""
    c = torch.tensor(COLOURS[colour], dtype=torch.float64) / 255
    bg = torch.tensor(BACKGROUNDS[background], dtype=torch.float64) / 255
    k = int((c - bg).abs().argmax())
    return (image[k].double() - bg[k]) / (c[k] - bg[k])


@pytest.mark.parametrize("size", [32, 64])
def test_shape_dtype_and_range(size):
    scenes = sample_scenes(20, "train", seed=1)
    images = render_batch(scenes, size, jitter=1.0, seed=2)
    assert images.shape == (20, 3, size, size) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert render(scenes[0], size).shape == (3, size, size)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [32, 64])
def test_area_and_centre_match_the_geometry(shape, size):
    rng = np.random.default_rng(0)
    for _ in range(20):
        scale, x, y = rng.uniform(0.2, 0.45), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
        scene = Scene((SceneObject(shape, "blue", float(x), float(y), float(scale)),), "white")
        share = _coverage(render(scene, size), "blue", "white")
        side = scale * size
        assert float(share.sum()) == pytest.approx(_UNIT_AREA[shape] * side**2, rel=0.06)
        centres = torch.arange(size, dtype=torch.float64) + 0.5
        cx = float((share * centres[None, :]).sum() / share.sum()) / size
        cy = float((share * centres[:, None]).sum() / share.sum()) / size
        assert (cx, cy) == pytest.approx((x, y), abs=0.2 / size)


def test_edges_are_anti_aliased():
    scene = Scene((SceneObject("circle", "red", 0.5, 0.5, 0.4),), "black")
    share = _coverage(render(scene, 32), "red", "black")
    partial = ((share > 0.05) & (share < 0.95)).sum()
    assert int(partial) >= 12  # a ring of mixed pixels around a 13-pixel disc
    assert float(share.min()) == pytest.approx(0, abs=1e-6) and float(share.max()) == pytest.approx(
        1, abs=1e-6
    )


def test_without_jitter_colours_are_the_palette():
    scene = Scene((SceneObject("square", "green", 0.5, 0.5, 0.4),), "grey")
    image = render(scene, 32)
    assert image[:, 0, 0].tolist() == pytest.approx([c / 255 for c in BACKGROUNDS["grey"]], abs=1e-6)
    assert image[:, 16, 16].tolist() == pytest.approx([c / 255 for c in COLOURS["green"]], abs=1e-6)


def test_jitter_is_seeded_and_bounded():
    scene = sample_scenes(1, "train", seed=3)[0]
    assert torch.equal(render(scene, 32, 1.0, 5), render(scene, 32, 1.0, 5))
    assert not torch.equal(render(scene, 32, 1.0, 5), render(scene, 32, 1.0, 6))
    assert torch.equal(render(scene, 32, 0.0, 5), render(scene, 32, 0.0, 6))
    assert float((render(scene, 32, 1.0, 5) - render(scene, 32)).abs().mean()) < 0.1
    assert torch.equal(render_batch([scene] * 2, 32, 1.0, seed=4), render_batch([scene] * 2, 32, 1.0, seed=4))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: render(s, size=4), "size"),
        (lambda s: render(s, jitter=1.5), "jitter"),
        (lambda s: render(s.to_dict()), "scene"),
        (lambda s: render_batch([]), "scenes"),
    ],
)
def test_errors_name_the_argument(call, match):
    scene = sample_scenes(1, "train", seed=0)[0]
    with pytest.raises((ValueError, TypeError), match=match):
        call(scene)
