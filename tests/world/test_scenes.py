"""Scenes, layouts, captions and prompt files of the shapes world."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from mmalign.world import (
    COLOURS,
    HELDOUT_PAIRS,
    SHAPES,
    SIZES,
    Prompt,
    Scene,
    SceneObject,
    caption,
    layout,
    prompt_set,
    read_prompts,
    sample_scenes,
    vocabulary,
    write_prompts,
)
from mmalign.world.captions import BACKGROUND_WORDS, POSITION_PHRASES, RELATION_PHRASES, SHAPE_WORDS

SCENES = sample_scenes(800, "train", seed=123)
HELDOUT = sample_scenes(300, "heldout", seed=123)


def _pairs(scene: Scene) -> set[tuple[str, str]]:
    return {(o.colour, o.shape) for o in scene.objects}


def test_sampling_is_deterministic_by_seed():
    assert sample_scenes(50, "train", seed=7) == sample_scenes(50, "train", seed=7)
    assert sample_scenes(50, "train", seed=7) != sample_scenes(50, "train", seed=8)
    assert sample_scenes(50, "heldout", seed=7) != sample_scenes(50, "train", seed=7)


def test_splits_hold_out_colour_shape_pairs_but_not_single_attributes():
    train_pairs = set().union(*map(_pairs, SCENES))
    assert not train_pairs & HELDOUT_PAIRS
    assert all(_pairs(s) & HELDOUT_PAIRS for s in HELDOUT)
    assert {c for c, _ in train_pairs} == set(COLOURS)
    assert {s for _, s in train_pairs} == set(SHAPES)
    assert train_pairs == {(c, s) for c in COLOURS for s in SHAPES} - HELDOUT_PAIRS


def test_scene_grammar_is_covered():
    assert {len(s.objects) for s in SCENES} == {1, 2, 3}
    assert {o.position for s in SCENES for o in s.objects} >= {"left", "right", "top", "bottom", "centre"}
    assert {s.relation for s in SCENES} == {None, "left of", "above"}
    assert {n for s in SCENES for _, _, n in s.groups()} == {1, 2, 3}
    assert {o.size for s in SCENES for o in s.objects} == {None, "small", "large"}
    assert {s.background_stated for s in SCENES} == {True, False}


def _box(o: SceneObject) -> tuple[float, float, float, float]:
    # a triangle's centre of mass is a third of its height above the base; other shapes are centred
    up = 2 * o.scale / 3 if o.shape == "triangle" else o.scale / 2
    return o.x - o.scale / 2, o.y - up, o.x + o.scale / 2, o.y - up + o.scale


def test_layouts_keep_objects_inside_apart_and_where_stated():
    for scene in SCENES + HELDOUT:
        boxes = [_box(o) for o in scene.objects]
        assert all(min(x0, y0) >= 0 and max(x1, y1) <= 1 for x0, y0, x1, y1 in boxes)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], scene
        for o in scene.objects:
            expected = {"left": o.x < 0.35, "right": o.x > 0.65, "top": o.y < 0.35, "bottom": o.y > 0.65}
            assert expected.get(o.position, True), o
            if o.position == "centre":
                assert abs(o.x - 0.5) < 0.06 and abs(o.y - 0.5) < 0.06
            assert o.scale == SIZES[o.size] if o.size else o.scale in (SIZES["medium"], SIZES["small"])
        if scene.relation == "left of":
            assert scene.objects[1].x - scene.objects[0].x >= 0.25
        if scene.relation == "above":
            assert scene.objects[1].y - scene.objects[0].y >= 0.25


def test_layout_redraws_positions_and_fails_clearly():
    scene = SCENES[0]
    moved = layout(scene, 99)
    assert [(o.colour, o.shape) for o in moved.objects] == [(o.colour, o.shape) for o in scene.objects]
    assert moved != scene
    crowded = Scene(tuple(SceneObject(s, "red", scale=0.6) for s in SHAPES))
    with pytest.raises(ValueError, match="scene: found no layout"):
        layout(crowded, 0)


def test_dict_round_trip_through_json():
    for scene in SCENES[:100]:
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: SceneObject("hexagon", "red"), "shape: expected one of"),
        (lambda: SceneObject("circle", "red", scale=2.0), "scale"),
        (lambda: Scene((SceneObject("circle", "red"),), background="pink"), "background"),
        (lambda: Scene((SceneObject("circle", "red"),) * 2, relation="above"), "relation"),
        (
            lambda: Scene((SceneObject("circle", "red", position="left"), SceneObject("circle", "red"))),
            "unique",
        ),
        (lambda: Scene(()), "objects"),
        (lambda: Scene.from_dict({"objects": "red circle"}), "data"),
        (lambda: sample_scenes(3, "test"), "split"),
    ],
)
def test_invalid_input_names_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


_NOUNS = {w: shape for shape, pairs in SHAPE_WORDS.items() for pair in pairs for w in pair}
_COUNT = {"a": 1, "two": 2, "three": 3}


def _parse(text: str) -> tuple[list[tuple[str, str, int]], dict]:
    """A reference reading of a caption: the counted objects, the stated positions, relation, background."""
    found = re.findall(r"\b(a|two|three) (?:small |large )?(\w+) (\w+)", text)
    groups = [(colour, _NOUNS[noun], _COUNT[count]) for count, colour, noun in found if colour in COLOURS]
    positions = {p for p, phrases in POSITION_PHRASES.items() for phrase in phrases if phrase in text}
    relations = {r for r, phrases in RELATION_PHRASES.items() for phrase in phrases if f" {phrase} " in text}
    backgrounds = {b for b, words in BACKGROUND_WORDS.items() for w in words if re.search(rf"\b{w}\b", text)}
    return groups, {"positions": positions, "relations": relations, "backgrounds": backgrounds}


def test_captions_parse_back_to_their_scene():
    for i, scene in enumerate(SCENES[:400]):
        text = caption(scene, i)
        groups, rest = _parse(text)
        assert sorted(groups) == sorted(scene.groups()), text
        assert rest["positions"] == {o.position for o in scene.objects} - {None}, text
        assert rest["relations"] == ({scene.relation} if scene.relation else set()), text
        assert rest["backgrounds"] == ({scene.background} if scene.background_stated else set()), text
        for o in scene.objects:
            assert o.size is None or o.size in text.split()


def test_captions_use_synonyms_and_only_vocabulary_words():
    vocab = set(vocabulary())
    texts = [caption(s, i) for i, s in enumerate(SCENES)]
    assert all(set(t.split()) <= vocab for t in texts)
    used = {w for t in texts for w in t.split()}
    assert {"disc", "box", "circle", "square", "middle", "centre"} <= used
    assert caption(SCENES[0], 5) == caption(SCENES[0], 5)
    circle = next(s for s in SCENES if s.objects[0].shape == "circle")
    assert len({caption(circle, seed) for seed in range(20)}) > 1
    assert all(t == t.lower() and "  " not in t and not re.search(r"[^a-z ]", t) for t in texts)


def test_prompt_files_round_trip(tmp_path):
    prompts = prompt_set("heldout", 30, seed=4)
    assert prompts == prompt_set("heldout", 30, seed=4)
    path = write_prompts(tmp_path / "sub" / "prompts.jsonl", prompts)
    assert read_prompts(path) == prompts
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"prompt": prompts[0].text, "scene": prompts[0].scene.to_dict()}
    write_prompts(tmp_path / "pairs.jsonl", [(p.text, p.scene) for p in prompts[:3]])
    assert read_prompts(tmp_path / "pairs.jsonl") == prompts[:3]
    assert isinstance(read_prompts(path)[0], Prompt)


def test_prompt_file_errors(tmp_path):
    with pytest.raises(ValueError, match="path"):
        read_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a red circle"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(TypeError, match="prompts"):
        write_prompts(tmp_path / "x.jsonl", [("a red circle", {"objects": []})])


def test_replace_keeps_validation():
    with pytest.raises(ValueError, match="colour"):
        replace(SCENES[0].objects[0], colour="pink")
