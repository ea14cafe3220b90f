"""Captions of scenes from a small grammar with synonyms, and prompt sets stored as JSONL.

Captions are lowercase words separated by single spaces, without punctuation, so that a word-level tokenizer
built from ``vocabulary()`` covers every prompt the grammar can produce.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mmalign.world.scenes import COLOURS, SIZES, Scene, SceneObject, layout, make_rng, sample_scenes

__all__ = ["Prompt", "caption", "prompt_set", "read_prompts", "scene_from_prompt", "vocabulary", "write_prompts"]

#: Synonyms of each shape, singular and plural.
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"), ("box", "boxes")),
    "triangle": (("triangle", "triangles"),),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle"),
}
#: (phrase with the objects in order, phrase with the objects swapped) per relation.
RELATION_PHRASES: dict[str, tuple[str, str]] = {
    "left of": ("to the left of", "to the right of"),
    "above": ("above", "below"),
}
BACKGROUND_PHRASES: tuple[str, ...] = ("on a {} background", "against a {} background", "on {}")
#: Background names as written; "grey" is also spelt "gray".
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black",),
    "white": ("white",),
    "grey": ("grey", "gray"),
}
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}


class Prompt(NamedTuple):
    """A caption and the scene it describes."""

    text: str
    scene: Scene


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _object_phrase(rng: np.random.Generator, obj: SceneObject, count: int) -> str:
    noun = _pick(rng, SHAPE_WORDS[obj.shape])[count > 1]
    words = [COUNT_WORDS[count], obj.size or "", obj.colour, noun]
    if obj.position:
        words.append(_pick(rng, POSITION_PHRASES[obj.position]))
    return " ".join(w for w in words if w)


def caption(scene: Scene, rng: int | np.random.Generator | None = None) -> str:
    """A caption of ``scene``; the seed picks among synonyms and word orders, never among meanings."""
    rng = make_rng(rng)
    firsts = {}
    for o in scene.objects:
        firsts.setdefault((o.colour, o.shape), o)
    phrases = [_object_phrase(rng, firsts[(c, s)], n) for c, s, n in scene.groups()]
    if scene.relation is not None:
        forward, backward = RELATION_PHRASES[scene.relation]
        text = (
            f"{phrases[0]} {forward} {phrases[1]}"
            if rng.random() < 0.5
            else f"{phrases[1]} {backward} {phrases[0]}"
        )
    else:
        text = " and ".join(phrases)
    if scene.background_stated:
        name = _pick(rng, BACKGROUND_WORDS[scene.background])
        text = f"{text} {_pick(rng, BACKGROUND_PHRASES).format(name)}"
    return text


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted."""
    phrases = [
        *COUNT_WORDS.values(),
        "small",
        "large",
        "and",
        *COLOURS,
        *(w for pairs in SHAPE_WORDS.values() for pair in pairs for w in pair),
        *(p for ps in POSITION_PHRASES.values() for p in ps),
        *(p for ps in RELATION_PHRASES.values() for p in ps),
        *(p.format(w) for p in BACKGROUND_PHRASES for ws in BACKGROUND_WORDS.values() for w in ws),
    ]
    return sorted({w for p in phrases for w in p.split()})


def prompt_set(split: str = "train", n: int = 1000, seed: int = 0) -> list[Prompt]:
    """``n`` prompts of a split with their scenes, the same for the same seed."""
    rng = np.random.default_rng([seed, 7])
    return [Prompt(caption(s, rng), s) for s in sample_scenes(n, split, seed)]


def write_prompts(path: str | Path, prompts: Iterable[Prompt | tuple[str, Scene]]) -> Path:
    """Write one JSON object per line: ``{"prompt": text, "scene": scene.to_dict()}``."""
    path = Path(path)
    lines = []
    for i, item in enumerate(prompts):
        text, scene = item
        if not isinstance(text, str) or not isinstance(scene, Scene):
            raise TypeError(
                f"prompts: expected (str, Scene) pairs, got {type(text).__name__}, "
                f"{type(scene).__name__} at index {i}"
            )
        lines.append(json.dumps({"prompt": text, "scene": scene.to_dict()}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read a file written by ``write_prompts`` (other keys on a line are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: expected a JSONL prompt file, got {str(path)!r} which does not exist")
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "prompt" not in row or "scene" not in row:
            raise ValueError(f"path: line {number} of {path.name} needs 'prompt' and 'scene' keys")
        out.append(Prompt(row["prompt"], Scene.from_dict(row["scene"])))
    return out


def scene_from_prompt(prompt: str, seed: int = 0):
    """The ``Scene`` a grammar caption states, laid out at random by ``seed``; ``ValueError`` otherwise.

    Reads the grammar's own phrase tables, so every caption that ``caption()`` writes parses back.
    """

    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a caption (a string), got {type(prompt).__name__}")
    words = prompt.lower().split()
    if not words:
        raise ValueError(f"prompt: expected a caption of the world grammar (e.g. 'a red circle'), got {prompt!r}")
    counts = {w: n for n, w in COUNT_WORDS.items()}
    nouns = {w: s for s, pairs in SHAPE_WORDS.items() for pair in pairs for w in pair}
    positions = {tuple(p.split()): name for name, ps in POSITION_PHRASES.items() for p in ps}
    relations = {tuple(p.split()): (name, k == 1) for name, ps in RELATION_PHRASES.items() for k, p in enumerate(ps)}
    backgrounds = {tuple(p.format(w).split()): name for name, ws in BACKGROUND_WORDS.items() for w in ws
                   for p in BACKGROUND_PHRASES}

    def match(table: dict, at: int):
        for phrase, value in table.items():
            if tuple(words[at : at + len(phrase)]) == phrase:
                return value, at + len(phrase)
        return None, at

    def fail(at: int):
        return ValueError(f"prompt: expected a caption of the world grammar, could not read {prompt!r} at word "
                          f"{at + 1} ({' '.join(words[at:at + 3]) or 'end'!r})")

    groups, relation, swapped, background, i = [], None, False, None, 0
    while True:
        count = counts.get(words[i]) if i < len(words) else None
        if count is None:
            raise fail(i)
        i += 1
        size = words[i] if i < len(words) and words[i] in ("small", "large") else None
        i += size is not None
        if i + 1 >= len(words) or words[i] not in COLOURS or words[i + 1] not in nouns:
            raise fail(i)
        colour, shape = words[i], nouns[words[i + 1]]
        position, i = match(positions, i + 2)
        groups.append((count, colour, shape, size, position))
        if i < len(words) and words[i] == "and":
            i += 1
            continue
        rel, j = match(relations, i)
        if rel is not None and relation is None and len(groups) == 1:
            (relation, swapped), i = rel, j
            continue
        background, i = match(backgrounds, i)
        if i != len(words):
            raise fail(i)
        break
    if swapped:
        groups.reverse()
    total = sum(g[0] for g in groups)
    scale = {1: None, 2: SIZES["medium"], 3: SIZES["small"]}.get(total)
    if scale is None and total != 1:
        raise ValueError(f"prompt: expected 1 to 3 objects, got {total} in {prompt!r}")
    objects = tuple(
        SceneObject(shape, colour, scale=scale or SIZES[size or "medium"], position=position, size=size)
        for count, colour, shape, size, position in groups
        for _ in range(count)
    )
    scene = Scene(objects, background or "black", background is not None, relation)
    return layout(scene, seed)
