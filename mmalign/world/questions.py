"""Questions about world scenes with gold answers: what the world's VLM is trained on and rewarded with.

Seven kinds, each answerable from the scene alone:

- ``colour``: "What colour is the triangle?" (the shape is unique in the scene) → "red";
- ``shape``: "What shape is the red object?" (the colour is unique) → "triangle";
- ``count``: "How many blue objects are there?" (also shapes, colour-shape pairs, all objects) → "2";
- ``position``: "Where is the red triangle?" → left, right, top, bottom or centre, asked only when exactly one
  of the gold verifier's regions holds for every render jitter;
- ``relation``: "Is the red triangle to the left of the blue circle?" → yes / no, asked only for objects
  far enough apart that jitter cannot flip the answer;
- ``grounding``: "Give the box of the red triangle." → "[x1, y1, x2, y2]" in pixels of the un-jittered render;
- ``yesno``: "Does this image show <caption>?" → yes for the scene's own caption; no, half of the time, for
  the caption of the same layout with other objects, and otherwise for the caption of the scene with one
  attribute changed (colour, shape, count, position, size, relation, background). Negative captions read
  like true ones (same structure, same share of held-out pairs), so the text alone gives nothing away.
  This is also the judge's question (``JUDGE_TEMPLATE``).

A training-only kind, ``caption`` ("Describe the image." → a caption of the scene), names every object in one
answer: dense supervision that teaches the VLM what the judge's captions refer to. It has no single gold
answer (synonyms, word order), so ``score`` does not grade it and it is not in ``KINDS``.

Questions about train scenes never name a held-out (colour, shape) pair, so the held-out split stays unseen.
Completions are ``<answer>…</answer>``; ``score`` grades them with the rule-reward parsers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mmalign.rewards.rules import answer_matches, box_iou, extract_answer, parse_box
from mmalign.world.captions import caption
from mmalign.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_PAIRS,
    MAX_SHIFT,
    POSITIONS,
    SHAPES,
    Scene,
    SceneObject,
    make_rng,
    sample_scenes,
)
from mmalign.world.verify import CENTRE_RADIUS, REGION_EDGE

__all__ = [
    "CAPTION",
    "IMAGE_SIZE",
    "JUDGE_TEMPLATE",
    "KINDS",
    "Question",
    "checklist_questions",
    "make_question",
    "make_questions",
    "object_box",
    "question_set",
    "score",
]

KINDS: tuple[str, ...] = ("colour", "shape", "count", "position", "relation", "grounding", "yesno")
CAPTION = "caption"
#: Side of the renders the questions (and their boxes) are about.
IMAGE_SIZE = 32
JUDGE_TEMPLATE = "Does this image show {}?"
#: Grounding answers count as right from this IoU with the gold box on.
IOU_THRESHOLD = 0.5
#: ``question_set(balanced=True)`` draws this many times the questions asked for and takes answers in turn.
_BALANCE_POOL = 4
_RELATION_GAP = 0.2  # centres this far apart along an axis: jitter (at most 2 x MAX_SHIFT) cannot flip it
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
             "below": "above"}


@dataclass(frozen=True)
class Question:
    """A question about ``scene`` and its gold ``answer``.

    Attributes:
        box: the grounding answer as numbers (``answer`` holds it as text); None for other kinds.
        claim: for yes/no questions, the scene that the asked caption describes (``scene`` itself when the
            answer is yes), so a verifier can check the caption; None for other kinds.
    """

    kind: str
    text: str
    answer: str
    scene: Scene
    box: tuple[int, int, int, int] | None = None
    claim: Scene | None = None

    @property
    def completion(self) -> str:
        """The gold completion, as the model is trained to write it."""
        return f"<answer>{self.answer}</answer>"

    def metadata(self) -> dict[str, Any]:
        """Gold data as rule rewards read it (``answer``, ``box`` with ``image_size``), plus kind, scene, claim."""
        meta = {"kind": self.kind, "answer": self.answer, "scene": self.scene.to_dict()}
        if self.box is not None:
            meta |= {"box": list(self.box), "image_size": [IMAGE_SIZE, IMAGE_SIZE]}
        if self.claim is not None:
            meta["claim"] = self.claim.to_dict()
        return meta


def object_box(obj: SceneObject, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """Pixel box ``(x1, y1, x2, y2)`` that holds every pixel the un-jittered object touches."""
    left, top, right, bottom = obj.extent(margin=False)
    return (
        math.floor((obj.x - left) * size),
        math.floor((obj.y - top) * size),
        math.ceil((obj.x + right) * size),
        math.ceil((obj.y + bottom) * size),
    )


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))] if options else None


def _allowed(scene: Scene, pair: tuple[str, str]) -> bool:
    """Train scenes' questions never name a held-out pair."""
    return scene.is_heldout or pair not in HELDOUT_PAIRS


def _unique(scene: Scene) -> list[SceneObject]:
    """Objects that "the <colour> <shape>" names unambiguously."""
    pairs = [(o.colour, o.shape) for o in scene.objects]
    return [o for o in scene.objects if pairs.count((o.colour, o.shape)) == 1]


def _in_region(obj: SceneObject, region: str, slack: float) -> bool:
    """The verifier's region test on the scene's centre, loosened (slack > 0) or tightened (slack < 0)."""
    if region == "centre":
        return max(abs(obj.x - 0.5), abs(obj.y - 0.5)) < CENTRE_RADIUS + slack
    value = obj.x if region in ("left", "right") else obj.y
    return value < REGION_EDGE + slack if region in ("left", "top") else value > 1 - REGION_EDGE - slack


def _ask_colour(scene: Scene, rng: np.random.Generator, yes: bool | None) -> Question | None:
    shapes = [o.shape for o in scene.objects]
    obj = _pick(rng, [o for o in scene.objects if shapes.count(o.shape) == 1])
    return None if obj is None else Question("colour", f"What colour is the {obj.shape}?", obj.colour, scene)


def _ask_shape(scene: Scene, rng: np.random.Generator, yes: bool | None) -> Question | None:
    colours = [o.colour for o in scene.objects]
    obj = _pick(rng, [o for o in scene.objects if colours.count(o.colour) == 1])
    return None if obj is None else Question("shape", f"What shape is the {obj.colour} object?", obj.shape, scene)


def _ask_count(scene: Scene, rng: np.random.Generator, yes: bool | None) -> Question | None:
    present = rng.random() < 0.75  # else any colour / shape, often absent: "0"
    obj = _pick(rng, list(scene.objects))
    colour = obj.colour if present else str(_pick(rng, list(COLOURS)))
    shape = obj.shape if present else str(_pick(rng, list(SHAPES)))
    form = int(rng.integers(4))
    if form == 3 and not _allowed(scene, (colour, shape)):
        form = 1
    subject, count = [
        ("objects", len(scene.objects)),
        (f"{colour} objects", sum(o.colour == colour for o in scene.objects)),
        (_PLURAL[shape], sum(o.shape == shape for o in scene.objects)),
        (f"{colour} {_PLURAL[shape]}", sum((o.colour, o.shape) == (colour, shape) for o in scene.objects)),
    ][form]
    return Question("count", f"How many {subject} are there?", str(count), scene)


def _ask_position(scene: Scene, rng: np.random.Generator, yes: bool | None) -> Question | None:
    options = []
    for obj in _unique(scene):
        surely = [r for r in POSITIONS if _in_region(obj, r, -MAX_SHIFT)]
        maybe = [r for r in POSITIONS if _in_region(obj, r, MAX_SHIFT)]
        if len(surely) == len(maybe) == 1:
            options.append((obj, surely[0]))
    choice = _pick(rng, options)
    if choice is None:
        return None
    obj, region = choice
    return Question("position", f"Where is the {obj.colour} {obj.shape}?", region, scene)


def _ask_relation(scene: Scene, rng: np.random.Generator, yes: bool | None) -> Question | None:
    unique = _unique(scene)
    options = []
    for a in unique:
        for b in unique:
            if b is not a:
                if abs(b.x - a.x) > _RELATION_GAP:
                    options.append((a, b, ("to the left of", "to the right of")[b.x < a.x]))
                if abs(b.y - a.y) > _RELATION_GAP:
                    options.append((a, b, ("above", "below")[b.y < a.y]))
    choice = _pick(rng, options)
    if choice is None:
        return None
    a, b, true = choice
    yes = bool(rng.random() < 0.5) if yes is None else yes
    phrase = true if yes else _OPPOSITE[true]
    text = f"Is the {a.colour} {a.shape} {phrase} the {b.colour} {b.shape}?"
    return Question("relation", text, "yes" if yes else "no", scene)


def _ask_grounding(scene: Scene, rng: np.random.Generator, yes: bool | None) -> Question | None:
    obj = _pick(rng, _unique(scene))
    if obj is None:
        return None
    box = object_box(obj)
    text = f"Give the box of the {obj.colour} {obj.shape}."
    return Question("grounding", text, "[{}, {}, {}, {}]".format(*box), scene, box=box)


def _changed(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` with one stated attribute changed, so that its caption is false of ``scene``'s renders.

    The claim names a held-out pair exactly when the scene holds one, so that on the held-out split the
    mere presence of a held-out pair in the caption does not give the answer away.
    """
    pairs = [(o.colour, o.shape) for o in scene.objects]
    options: list[Scene] = []
    for old in dict.fromkeys(pairs):
        for new in [(c, old[1]) for c in COLOURS] + [(old[0], s) for s in SHAPES]:
            if new not in pairs:
                objects = [replace(o, colour=new[0], shape=new[1]) if p == old else o
                           for o, p in zip(scene.objects, pairs)]
                options.append(replace(scene, objects=tuple(objects)))
    for i, o in enumerate(scene.objects):
        if o.position is not None:
            options += [_with(scene, i, position=p) for p in POSITIONS if p != o.position]
        if o.size is not None:
            options.append(_with(scene, i, size="small" if o.size == "large" else "large"))
        if pairs.count(pairs[i]) > 1:  # one fewer of a counted group
            options.append(replace(scene, objects=scene.objects[:i] + scene.objects[i + 1 :]))
        elif scene.relation is None and len(pairs) < 3 and o.position is None and o.size is None:
            options.append(replace(scene, objects=(*scene.objects, o)))  # one more
    if scene.relation is not None:
        options.append(replace(scene, objects=scene.objects[::-1]))
    if scene.background_stated:
        options += [replace(scene, background=b) for b in BACKGROUNDS if b != scene.background]
    other = _other(scene, rng)
    if other is not None and rng.random() < 0.5:
        return other
    options = [o for o in options if o.is_heldout == scene.is_heldout]
    return options[int(rng.integers(len(options)))] if options else other


def _with(scene: Scene, index: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **changes)
    return replace(scene, objects=tuple(objects))


def _other(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """``scene`` with every (colour, shape) pair swapped for one it lacks, counts, sizes, positions, relation
    and background kept, so the caption reads like a true one but names objects the image does not hold.

    The new pairs include a held-out one exactly when ``scene`` holds one; None when that cannot be done.
    """
    pairs = list(dict.fromkeys((o.colour, o.shape) for o in scene.objects))
    fresh = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pairs]
    heldout = [p for p in fresh if p in HELDOUT_PAIRS]
    if scene.is_heldout and not heldout:
        return None
    first = [_pick(rng, heldout)] if scene.is_heldout else []
    rest = [p for p in fresh if p not in first and p not in HELDOUT_PAIRS]
    chosen = first + [rest[k] for k in rng.choice(len(rest), size=len(pairs) - len(first), replace=False)]
    chosen = [chosen[k] for k in rng.permutation(len(chosen))]
    new = dict(zip(pairs, chosen))
    objects = [replace(o, colour=new[o.colour, o.shape][0], shape=new[o.colour, o.shape][1]) for o in scene.objects]
    return replace(scene, objects=tuple(objects))


def _ask_yesno(scene: Scene, rng: np.random.Generator, yes: bool | None) -> Question | None:
    yes = bool(rng.random() < 0.5) if yes is None else yes
    claim = scene if yes else _changed(scene, rng)
    text = JUDGE_TEMPLATE.format(caption(claim, rng))
    return Question("yesno", text, "yes" if yes else "no", scene, claim=claim)


def _ask_caption(scene: Scene, rng: np.random.Generator, yes: bool | None) -> Question:
    return Question(CAPTION, "Describe the image.", caption(scene, rng), scene)


_ASK = {
    "colour": _ask_colour,
    "shape": _ask_shape,
    "count": _ask_count,
    "position": _ask_position,
    "relation": _ask_relation,
    "grounding": _ask_grounding,
    "yesno": _ask_yesno,
    CAPTION: _ask_caption,
}


def make_question(
    scene: Scene, kind: str, rng: int | np.random.Generator | None = None, yes: bool | None = None
) -> Question | None:
    """A question of ``kind`` about ``scene``, or None when the scene allows none (e.g. no unique shape).

    ``yes`` fixes the gold answer of yes/no kinds (relation, yesno); None draws it at random.
    """
    if kind not in _ASK:
        raise ValueError(f"kind: expected one of {(*KINDS, CAPTION)}, got {kind!r}")
    if not isinstance(scene, Scene):
        raise TypeError(f"scene: expected a Scene, got {type(scene).__name__}")
    return _ASK[kind](scene, make_rng(rng), yes)


def make_questions(scene: Scene, rng: int | np.random.Generator | None = None) -> list[Question]:
    """One question of each kind the scene allows, in ``KINDS`` order."""
    rng = make_rng(rng)
    return [q for kind in KINDS if (q := make_question(scene, kind, rng)) is not None]


def question_set(
    n: int, split: str = "train", seed: int = 0, kinds: tuple[str, ...] = KINDS, balanced: bool = False
) -> list[Question]:
    """``n`` questions about scenes of ``split``, kinds taken in turn, yes and no alternating within each
    yes/no kind; the same for the same seed.

    ``balanced`` takes each kind's gold answers in turn as well (count "0", "1", "2", "3", …; grounding boxes
    are not classes and keep their order), from a draw of ``_BALANCE_POOL`` times as many questions: in the
    natural draw half the count answers are "1", so a policy that always answers "1" is rewarded half the time.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    if not kinds or set(kinds) - set(_ASK):
        raise ValueError(f"kinds: expected a non-empty subset of {(*KINDS, CAPTION)}, got {kinds!r}")
    if balanced:
        return _answers_in_turn(question_set(_BALANCE_POOL * n, split, seed, kinds), n, kinds)
    rng = np.random.default_rng([seed, 11])
    pool = 2 * n + 16
    scenes = sample_scenes(pool, split, seed)  # a longer draw with the same seed extends this one
    out: list[Question] = []
    asked = dict.fromkeys(kinds, 0)
    position = 0
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        if position == len(scenes):
            pool *= 2
            scenes = sample_scenes(pool, split, seed)
        question = make_question(scenes[position], kind, rng, yes=asked[kind] % 2 == 0)
        position += 1
        if question is not None:
            out.append(question)
            asked[kind] += 1
    return out


def _round_robin(groups: list[list[Question]]):
    """The groups' first items, then their second items, …; a group that runs out drops out."""
    for rank in range(max(map(len, groups), default=0)):
        yield from (group[rank] for group in groups if rank < len(group))


def _answers_in_turn(pool: list[Question], n: int, kinds: tuple[str, ...]) -> list[Question]:
    """``n`` questions of ``pool``, kinds in turn as ``question_set`` takes them, and within each categorical
    kind its answers in turn (in the order they first appear)."""
    per_kind = {}
    for kind in kinds:
        by_answer: dict[str, list[Question]] = {}
        for q in pool:
            if q.kind == kind:
                by_answer.setdefault("box" if q.box is not None else q.answer, []).append(q)
        per_kind[kind] = _round_robin(list(by_answer.values()))
    return [next(per_kind[kinds[i % len(kinds)]]) for i in range(n)]


def score(question: Question, completion: str) -> float:
    """1.0 when ``completion``'s answer is right (grounding: IoU ≥ ``IOU_THRESHOLD``), else 0.0."""
    if question.kind == CAPTION:
        raise ValueError("question: caption questions have no single gold answer to score against")
    answer = extract_answer(completion)
    if question.kind == "grounding":
        box = None if answer is None else parse_box(answer)
        return float(box is not None and box_iou(box, question.box) >= IOU_THRESHOLD)
    mode = "numeric" if question.kind == "count" else "normalized"
    return float(answer_matches(answer, question.answer, mode))


def checklist_questions(prompt: str, metadata: dict[str, Any]) -> list[str]:
    """Yes/no questions whose gold answer is yes when an image shows ``metadata["scene"]`` (a Scene or its
    dict): one judge question per counted group of objects, with its stated size and position, and the
    relation question when the scene states one. The ``vlm_checklist`` reward's default generator."""
    scene = metadata.get("scene") if isinstance(metadata, dict) else None
    if scene is None:
        raise ValueError(f"metadata['scene']: the world's checklist needs each sample's scene (a Scene or "
                         f"Scene.to_dict()), got metadata keys {sorted(metadata)} for prompt {prompt!r}")
    scene = Scene.from_dict(scene) if isinstance(scene, dict) else scene
    questions = []
    for colour, shape, _ in scene.groups():
        group = tuple(o for o in scene.objects if (o.colour, o.shape) == (colour, shape))
        questions.append(JUDGE_TEMPLATE.format(caption(Scene(group, scene.background), 0)))
    if scene.relation is not None:
        a, b = scene.objects[:2]
        phrase = {"left of": "to the left of", "above": "above"}[scene.relation]
        questions.append(f"Is the {a.colour} {a.shape} {phrase} the {b.colour} {b.shape}?")
    return questions
