"""Scenes of the shapes world: what a prompt states (colours, shapes, sizes, positions, relation, background)
together with a concrete layout that satisfies it.

Coordinates are fractions of the canvas, ``x`` to the right and ``y`` down, and ``(x, y)`` is the object's
centre of mass (for a triangle, a third of its height above its base). The layout leaves room for the largest
render jitter, so a jittered render still satisfies every stated attribute.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELDOUT_PAIRS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Scene",
    "SceneObject",
    "layout",
    "make_rng",
    "sample_scenes",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Object colours (RGB 0-255), about 60 degrees of hue apart so that each stays apart from the others.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (235, 210, 40),
    "green": (40, 170, 70),
    "cyan": (40, 200, 210),
    "blue": (40, 70, 220),
    "purple": (160, 60, 200),
}
#: Background colours; none is close to an object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
}
#: Side of the object's bounding box as a fraction of the canvas (about 8, 10 and 13 px at 32 px).
SIZES: dict[str, float] = {"small": 0.24, "medium": 0.32, "large": 0.41}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
#: ``relation`` says how objects[0] stands to objects[1].
RELATIONS: tuple[str, ...] = ("left of", "above")
SPLITS: tuple[str, ...] = ("train", "heldout")
#: (colour, shape) pairs never shown in train; each colour and each shape still appears there with others.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "square"), ("blue", "circle")}
)

#: Largest render jitter (at ``jitter=1``): centre shift and relative size change; the layout leaves room for both.
MAX_SHIFT = 0.03
MAX_SCALE = 0.06
_GAP = 0.08  # free space between the bounding boxes of two objects
#: Where a stated position puts an object's centre: (x range, y range).
_REGIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left": ((0.0, 0.33), (0.45, 0.55)),
    "right": ((0.67, 1.0), (0.45, 0.55)),
    "top": ((0.45, 0.55), (0.0, 0.33)),
    "bottom": ((0.45, 0.55), (0.67, 1.0)),
    "centre": ((0.45, 0.55), (0.45, 0.55)),
}
_RELATION_MIN, _RELATION_MAX_OFF = 0.25, 0.2  # separation along the relation, largest offset across it


def _check(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {sorted(allowed)}, got {value!r}")


@dataclass(frozen=True)
class SceneObject:
    """One shape: what the prompt says about it and where it is drawn.

    Attributes:
        shape, colour: names from ``SHAPES`` and ``COLOURS``.
        x, y: centre of mass, fractions of the canvas width and height (y grows downwards).
        scale: side of the bounding box as a fraction of the canvas.
        position: the region the prompt states ("left", ...), or None when the prompt does not place it.
        size: "small" or "large" when the prompt states a size, else None.
    """

    shape: str
    colour: str
    x: float = 0.5
    y: float = 0.5
    scale: float = SIZES["medium"]
    position: str | None = None
    size: str | None = None

    def __post_init__(self) -> None:
        _check("shape", self.shape, SHAPES)
        _check("colour", self.colour, COLOURS)
        _check("position", self.position, (*POSITIONS, None))
        _check("size", self.size, ("small", "large", None))
        for name in ("x", "y", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: expected a number (a fraction of the canvas), got {value!r}")
        if not 0.05 <= self.scale <= 0.6:
            raise ValueError(f"scale: expected a fraction of the canvas in [0.05, 0.6], got {self.scale!r}")

    def extent(self, margin: bool = True) -> tuple[float, float, float, float]:
        """Distances from the centre to the left, top, right and bottom of the box (with jitter room)."""
        s = self.scale * (1 + MAX_SCALE) if margin else self.scale
        up, down = (2 * s / 3, s / 3) if self.shape == "triangle" else (s / 2, s / 2)
        pad = MAX_SHIFT if margin else 0.0
        return s / 2 + pad, up + pad, s / 2 + pad, down + pad


@dataclass(frozen=True)
class Scene:
    """1-3 objects on a background; a plain dict round-trips through ``to_dict`` / ``from_dict``.

    Attributes:
        objects: the objects; objects of the same colour and shape form a counted group ("two red circles").
        background: a name from ``BACKGROUNDS``.
        background_stated: whether the prompt names the background (only then is it checked).
        relation: "left of" or "above" between objects[0] and objects[1] (two distinct objects), or None.
    """

    objects: tuple[SceneObject, ...]
    background: str = "black"
    background_stated: bool = False
    relation: str | None = None
    _pairs: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not 1 <= len(objects) <= 3 or not all(isinstance(o, SceneObject) for o in objects):
            raise ValueError(f"objects: expected 1 to 3 SceneObjects, got {self.objects!r}")
        _check("background", self.background, BACKGROUNDS)
        _check("relation", self.relation, (*RELATIONS, None))
        pairs = tuple((o.colour, o.shape) for o in objects)
        object.__setattr__(self, "_pairs", pairs)
        if self.relation is not None and (len(objects) != 2 or pairs[0] == pairs[1]):
            raise ValueError(
                f"relation: needs exactly two objects that differ in colour or shape, got {pairs}"
            )
        for o, pair in zip(objects, pairs):
            if (o.position or o.size) and pairs.count(pair) > 1:
                raise ValueError(
                    f"objects: a position or size can only be stated for a unique object, got {pair}"
                )

    def groups(self) -> list[tuple[str, str, int]]:
        """``(colour, shape, count)`` per distinct object, in order of first appearance."""
        return [(c, s, self._pairs.count((c, s))) for c, s in dict.fromkeys(self._pairs)]

    @property
    def is_heldout(self) -> bool:
        """Whether the scene holds a (colour, shape) pair that the train split never shows."""
        return any(p in HELDOUT_PAIRS for p in self._pairs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "x": o.x,
                    "y": o.y,
                    "scale": o.scale,
                    "position": o.position,
                    "size": o.size,
                }
                for o in self.objects
            ],
            "background": self.background,
            "background_stated": self.background_stated,
            "relation": self.relation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
            raise ValueError(f"data: expected a dict with an 'objects' list (Scene.to_dict), got {data!r}")
        names = [f.name for f in fields(SceneObject)]
        for i, o in enumerate(data["objects"]):
            if not isinstance(o, dict) or not set(o) <= set(names) or not {"shape", "colour"} <= set(o):
                raise ValueError(f"objects[{i}]: expected a dict with 'shape', 'colour' and optionally "
                                 f"{', '.join(names[2:])}, got {o!r}")
        objects = tuple(SceneObject(**o) for o in data["objects"])
        rest = {k: data[k] for k in ("background", "background_stated", "relation") if k in data}
        return cls(objects, **rest)


def make_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """A numpy Generator from a seed (None means seed 0, so that defaults stay reproducible)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(0 if seed is None else seed)


def _fits(o: SceneObject, xs: np.ndarray, ys: np.ndarray, placed: list[SceneObject], relation: str | None):
    """Which candidate centres ``(xs, ys)`` of ``o`` keep clear of the placed objects (and the relation)."""
    left, top, right, bottom = o.extent()
    ok = np.ones(xs.shape, dtype=bool)
    for p in placed:
        pl, pt, pr, pb = p.extent()
        ok &= (
            (xs + right + _GAP <= p.x - pl)
            | (p.x + pr + _GAP <= xs - left)
            | (ys + bottom + _GAP <= p.y - pt)
            | (p.y + pb + _GAP <= ys - top)
        )
    if placed and relation is not None:
        a = placed[0]
        along, across = (xs - a.x, ys - a.y) if relation == "left of" else (ys - a.y, xs - a.x)
        ok &= (along >= _RELATION_MIN) & (np.abs(across) <= _RELATION_MAX_OFF)
    return ok


def layout(scene: Scene, rng: int | np.random.Generator | None = None, tries: int = 100) -> Scene:
    """The scene with new object centres drawn at random among those that satisfy what it states.

    Useful to render one prompt in many ways; positions, relation, canvas bounds and gaps between objects
    hold for any render jitter up to 1. Objects are placed one by one, starting over when one does not fit.
    """
    rng = make_rng(rng)
    ranges = []
    for o in scene.objects:
        (x0, x1), (y0, y1) = _REGIONS[o.position] if o.position else ((0.0, 1.0), (0.0, 1.0))
        left, top, right, bottom = o.extent()
        ranges.append((max(x0, left), min(x1, 1 - right), max(y0, top), min(y1, 1 - bottom)))
    if all(x0 <= x1 and y0 <= y1 for x0, x1, y0, y1 in ranges):
        for _ in range(tries):
            placed: list[SceneObject] = []
            for o, (x0, x1, y0, y1) in zip(scene.objects, ranges):
                xs, ys = rng.uniform(x0, x1, size=32), rng.uniform(y0, y1, size=32)
                hits = np.flatnonzero(_fits(o, xs, ys, placed, scene.relation))
                if not len(hits):
                    break
                placed.append(replace(o, x=float(xs[hits[0]]), y=float(ys[hits[0]])))
            else:
                return replace(scene, objects=tuple(placed))
    raise ValueError(f"scene: found no layout in {tries} tries that satisfies {scene.to_dict()}")


def _sample_pairs(rng: np.random.Generator, k: int) -> list[tuple[str, str]]:
    """k distinct (colour, shape) pairs."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return [pairs[i] for i in rng.choice(len(pairs), size=k, replace=False)]


def _sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    background = str(rng.choice(list(BACKGROUNDS)))
    stated = bool(rng.random() < 0.5)
    if n == 1:
        ((colour, shape),) = _sample_pairs(rng, 1)
        size = str(rng.choice(["small", "large"])) if rng.random() < 0.4 else None
        position = str(rng.choice(POSITIONS)) if rng.random() < 0.6 else None
        obj = SceneObject(shape, colour, scale=SIZES[size or "medium"], position=position, size=size)
        return Scene((obj,), background, stated)
    counts = {2: [[1, 1], [2]], 3: [[1, 1, 1], [2, 1], [3]]}[n]
    split = counts[int(rng.choice(len(counts), p=[0.75, 0.25] if n == 2 else [0.4, 0.4, 0.2]))]
    scale = SIZES["medium" if n == 2 else "small"]
    objects = tuple(
        SceneObject(shape, colour, scale=scale)
        for (colour, shape), count in zip(_sample_pairs(rng, len(split)), split)
        for _ in range(count)
    )
    relation = str(rng.choice(RELATIONS)) if split == [1, 1] and rng.random() < 0.6 else None
    return Scene(objects, background, stated, relation)


def sample_scenes(n: int, split: str = "train", seed: int = 0) -> list[Scene]:
    """``n`` random scenes of a split, the same for the same seed.

    ``train`` scenes never hold a pair of ``HELDOUT_PAIRS``; every ``heldout`` scene holds at least one.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    _check("split", split, SPLITS)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = _sample_scene(rng)
        if scene.is_heldout == (split == "heldout"):
            scenes.append(layout(scene, rng))
    return scenes
