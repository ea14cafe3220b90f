"""The gold verifier: clean renders pass, one swapped attribute fails that attribute, noise scores low.

Rates are measured on at least 500 jittered renders of scenes the tests sample (seeds below).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmalign.world import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    layout,
    render,
    render_batch,
    sample_scenes,
    verify,
    verify_batch,
)

N = 600
SCENES = sample_scenes(N - 150, "train", seed=2024) + sample_scenes(150, "heldout", seed=2024)


def _kind(check: str) -> str:
    return check.split(".")[-1]


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = 2
    taps = torch.exp(-((torch.arange(-radius, radius + 1.0)) ** 2) / (2 * sigma**2))
    kernel = (taps[:, None] * taps[None, :] / taps.sum() ** 2).expand(3, 1, -1, -1)
    return F.conv2d(F.pad(images, (radius,) * 4, mode="replicate"), kernel, groups=3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The verifier's small tensor ops gain nothing from threads, and lose much on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean():
    return render_batch(SCENES, 32, jitter=1.0, seed=7)


def test_clean_renders_pass_every_check(clean):
    results = verify_batch(clean, SCENES)
    assert np.mean([r.score == 1.0 for r in results]) >= 0.99
    for result, scene in zip(results[:50], SCENES):
        assert len(result.objects) == len(scene.objects)
        assert sorted((o.colour, o.shape) for o in result.objects) == sorted(
            (o.colour, o.shape) for o in scene.objects
        )


def test_clean_renders_pass_at_64_pixels():
    scenes = SCENES[:200]
    results = verify_batch(render_batch(scenes, 64, jitter=1.0, seed=8), scenes)
    assert np.mean([r.score == 1.0 for r in results]) >= 0.99


@pytest.mark.parametrize(
    ("name", "transform"),
    [
        ("blur", lambda x: _blur(x, 0.7)),
        (
            "noise",
            lambda x: (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(
                0, 1
            ),
        ),
    ],
)
def test_blurred_and_noisy_renders_still_pass(clean, name, transform):
    results = verify_batch(transform(clean), SCENES)
    assert np.mean([r.score == 1.0 for r in results]) >= 0.98, name


def test_random_noise_scores_low():
    noise = torch.rand(len(SCENES), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = verify_batch(noise, SCENES)
    assert np.mean([r.score for r in results]) < 0.15
    assert not any(r.checks["count"] for r in results)


def _swap_value(scene: Scene, kind: str, rng: np.random.Generator) -> Scene | None:
    """The scene with one object's colour or shape changed to one no other object has."""
    pairs = {(o.colour, o.shape) for o in scene.objects}
    for i in rng.permutation(len(scene.objects)):
        obj = scene.objects[i]
        values = [v for v in (COLOURS if kind == "colour" else SHAPES) if v != getattr(obj, kind)]
        values = [v for v in values if ((v, obj.shape) if kind == "colour" else (obj.colour, v)) not in pairs]
        if values:
            objects = list(scene.objects)
            objects[i] = replace(obj, **{kind: values[int(rng.integers(len(values)))]})
            return layout(replace(scene, objects=tuple(objects)), rng)
    return None


def _positioned(rng: np.random.Generator, n: int) -> list[Scene]:
    """Single-object scenes with a stated position."""
    singles = [s for s in sample_scenes(3 * n, "train", seed=99) if len(s.objects) == 1][:n]
    return [
        layout(replace(s, objects=(replace(s.objects[0], position=str(rng.choice(POSITIONS))),)), rng)
        for s in singles
    ]


def _related(rng: np.random.Generator, n: int) -> list[Scene]:
    """Two-object scenes with a stated relation."""
    everything = [(c, s) for c in COLOURS for s in SHAPES]
    scenes = []
    for _ in range(n):
        first, second = (everything[i] for i in rng.choice(len(everything), 2, replace=False))
        objects = tuple(SceneObject(shape, colour) for colour, shape in (first, second))
        scenes.append(layout(Scene(objects, relation=str(rng.choice(["left of", "above"]))), rng))
    return scenes


def _count_swap(scene: Scene, rng: np.random.Generator) -> tuple[Scene, Scene]:
    """(scene without positions or sizes, the same with one object more, or one fewer when it has three)."""
    plain = tuple(replace(o, position=None, size=None) for o in scene.objects)
    if len(plain) == 3:
        return replace(scene, objects=plain), layout(replace(scene, objects=plain[:2], relation=None), rng)
    smaller = SIZES["medium" if len(plain) == 1 else "small"]  # room for one more
    plain = tuple(replace(o, scale=min(o.scale, smaller)) for o in plain)
    base = replace(scene, objects=plain, relation=None if len(plain) == 2 else scene.relation)
    return base, layout(replace(base, objects=(*plain, plain[int(rng.integers(len(plain)))])), rng)


@pytest.mark.parametrize("kind", ["colour", "shape", "position", "count", "relation"])
def test_one_swapped_attribute_fails_that_attribute(kind):
    rng = np.random.default_rng(["colour", "shape", "position", "count", "relation"].index(kind))
    if kind in ("colour", "shape"):
        pairs = [(s, m) for s in SCENES if (m := _swap_value(s, kind, rng)) is not None]
    elif kind == "position":
        pairs = []
        for s in _positioned(rng, 550):
            others = [p for p in POSITIONS if p != s.objects[0].position]
            moved = replace(s.objects[0], position=str(rng.choice(others)))
            pairs.append((s, layout(replace(s, objects=(moved,)), rng)))
    elif kind == "count":
        pairs = [_count_swap(s, rng) for s in SCENES]
    else:
        pairs = [(s, layout(replace(s, objects=s.objects[::-1]), rng)) for s in _related(rng, 500)]
    assert len(pairs) >= 500
    images = render_batch([m for _, m in pairs], 32, jitter=1.0, seed=3)
    results = verify_batch(images, [s for s, _ in pairs])
    caught = [any(not ok for name, ok in r.checks.items() if _kind(name) == kind) for r in results]
    assert np.mean(caught) >= 0.99, kind
    others = [ok for r in results for name, ok in r.checks.items() if _kind(name) not in (kind, "count")]
    if kind != "count":  # a missing object fails its own checks too
        assert np.mean(others) >= 0.98, kind


def test_checks_and_score_of_a_known_scene():
    scene = Scene(
        (SceneObject("square", "red", 0.25, 0.5, 0.32, position="left"),), "white", background_stated=True
    )
    result = verify(render(scene, 32), scene)
    assert result.checks == dict.fromkeys(
        ["object0.colour", "object0.shape", "object0.position", "count", "background"], True
    )
    assert result.score == 1.0 and result.matches == (0,)
    (found,) = result.objects
    assert (found.colour, found.shape) == ("red", "square")
    assert (found.x, found.y, found.scale) == pytest.approx((0.25, 0.5, 0.32), abs=0.02)

    blank = render(replace(scene, objects=(replace(scene.objects[0], colour="blue", x=0.75),)), 32)
    wrong = verify(blank, scene)  # a blue square on the right: colour and position fail
    assert wrong.score == pytest.approx(3 / 5)
    assert not wrong.checks["object0.colour"] and not wrong.checks["object0.position"]

    empty = torch.ones(3, 32, 32) * torch.tensor([240 / 255] * 3)[:, None, None]
    nothing = verify(empty, scene)  # only the background is right
    assert nothing.score == pytest.approx(1 / 5) and nothing.matches == (None,) and nothing.objects == []


def test_an_extra_object_fails_count_only():
    scene = Scene(
        (SceneObject("circle", "yellow", 0.3, 0.3, 0.32), SceneObject("triangle", "cyan", 0.7, 0.7, 0.32))
    )
    extra = replace(scene, objects=(*scene.objects, SceneObject("square", "purple", 0.25, 0.78, 0.24)))
    result = verify(render(extra, 32), scene)
    assert [name for name, ok in result.checks.items() if not ok] == ["count"]
    assert result.score == pytest.approx(4 / 5)
    assert len(result.objects) == 3


def test_inputs_as_pil_numpy_or_dict_agree():
    scene = SCENES[3]
    image = render(scene, 32, 1.0, 0)
    expected = verify(image, scene)
    as_uint8 = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert verify(Image.fromarray(as_uint8), scene).checks == expected.checks
    assert verify(image.permute(1, 2, 0).numpy(), scene.to_dict()).checks == expected.checks


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, s: verify_batch(x, s[:1]), "scenes"),
        (lambda x, s: verify_batch(x[0], s[:1]), "images"),
        (lambda x, s: verify(x[0, :2], s[0]), "image"),
        (lambda x, s: verify_batch(x, ["a red circle", s[1]]), r"scenes\[0\]"),
    ],
)
def test_errors_name_the_argument(call, match):
    images = render_batch(SCENES[:2], 32)
    with pytest.raises((ValueError, TypeError), match=match):
        call(images, SCENES[:2])
