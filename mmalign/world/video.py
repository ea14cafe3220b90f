"""Videos of the shapes world: scenes whose objects move together in one direction, captioned in the world's
grammar ("a red circle moving right", "two blue squares moving up on a black background"), rendered frame by
frame, and a gold verifier that checks each frame like an image and the motion across the clip.

A clip is a ``Scene`` (its first frame) and a ``Motion``: a direction and the distance travelled from the first
frame to the last, at constant speed. All objects move together, so a layout that holds in the first frame
(gaps between objects, a relation) holds in every frame; the start is placed so that the whole path stays on
the canvas with room for the render jitter. Motion clips state no positions (a moving object leaves its
region); relations hold throughout and are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch

from mmalign.media import MediaBatch
from mmalign.models.video import MOTION_DIRECTIONS
from mmalign.rewards.base import Reward, RewardOutput
from mmalign.rewards.video import video_pixels
from mmalign.world.captions import BACKGROUND_PHRASES, BACKGROUND_WORDS, caption, scene_from_prompt
from mmalign.world.gold import ATTRIBUTE_KINDS, kind_components
from mmalign.world.render import render
from mmalign.world.scenes import SPLITS, Scene, layout, make_rng, sample_scenes
from mmalign.world.verify import GoldResult, verify_batch

__all__ = [
    "DIRECTIONS",
    "GoldVideoReward",
    "Motion",
    "VideoGoldResult",
    "VideoPrompt",
    "frame_scenes",
    "render_video",
    "render_videos",
    "stated_direction",
    "video_caption",
    "video_prompt_set",
    "video_scene_from_prompt",
    "verify_video",
    "verify_videos",
]

#: Unit steps on the canvas (y grows downwards): the directions clip metadata states (``motion.direction``), as
#: travelling initial noise reads them.
DIRECTIONS: dict[str, tuple[int, int]] = MOTION_DIRECTIONS
#: Distance travelled from the first frame to the last by sampled clips, fractions of the canvas.
MIN_TRAVEL, MAX_TRAVEL = 0.25, 0.45
#: The verifier's motion check: the fitted displacement over the clip along the stated direction must be at
#: least this (a fraction of the canvas) and at least twice its drift across the direction.
MIN_DISPLACEMENT = 0.1
ACROSS_RATIO = 0.5
MOTION_KINDS: tuple[str, ...] = (*ATTRIBUTE_KINDS, "motion")


@dataclass(frozen=True)
class Motion:
    """Every object moves ``travel`` (a fraction of the canvas) in ``direction`` from the first frame to the last."""

    direction: str
    travel: float = 0.3

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction: expected one of {sorted(DIRECTIONS)}, got {self.direction!r}")
        if isinstance(self.travel, bool) or not isinstance(self.travel, (int, float)) or not 0 <= self.travel <= 1:
            raise ValueError(f"travel: expected a fraction of the canvas in [0, 1], got {self.travel!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"direction": self.direction, "travel": self.travel}

    @classmethod
    def from_value(cls, value: Motion | dict[str, Any] | str, name: str = "motion") -> Motion:
        """A ``Motion`` from itself, its dict or a direction name; ``ValueError`` naming ``name`` otherwise."""
        if isinstance(value, Motion):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict) and set(value) <= {"direction", "travel"} and "direction" in value:
            return cls(**value)
        raise ValueError(f"{name}: expected a Motion, its dict {{'direction': ..., 'travel': ...}} or one of "
                         f"{sorted(DIRECTIONS)}, got {value!r}")


class VideoPrompt(NamedTuple):
    """A caption, the scene of its first frame and the motion it states."""

    text: str
    scene: Scene
    motion: Motion


def _check_motion_scene(scene: Scene, name: str = "scene") -> None:
    placed = [i for i, o in enumerate(scene.objects) if o.position is not None]
    if placed:
        raise ValueError(f"{name}: a motion clip states no positions (a moving object leaves its region), got a "
                         f"position for objects {placed}")


def _shifted(scene: Scene, dx: float, dy: float) -> Scene:
    return replace(scene, objects=tuple(replace(o, x=o.x + dx, y=o.y + dy) for o in scene.objects))


def frame_scenes(scene: Scene, motion: Motion, frames: int) -> list[Scene]:
    """The scene of each of ``frames`` frames: the first is ``scene``, the last ``motion.travel`` further on."""
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise ValueError(f"frames: expected a positive int, got {frames!r}")
    dx, dy = DIRECTIONS[motion.direction]
    return [_shifted(scene, dx * s, dy * s) for s in np.linspace(0.0, motion.travel, frames)]


def _place(scene: Scene, direction: str, rng: np.random.Generator, tries: int = 100) -> tuple[Scene, Motion]:
    """A layout of ``scene`` whose path in ``direction`` stays on the canvas (with jitter room) for at least
    ``MIN_TRAVEL``; the travel is the room left, at most ``MAX_TRAVEL``, and the path is centred in the room."""
    dx, dy = DIRECTIONS[direction]
    sign = dx or dy
    for _ in range(tries):
        laid = layout(scene, rng)
        extents = [o.extent() for o in laid.objects]  # left, top, right, bottom
        if dx:
            back = min(o.x - e[0] for o, e in zip(laid.objects, extents))
            ahead = min(1 - o.x - e[2] for o, e in zip(laid.objects, extents))
        else:
            back = min(o.y - e[1] for o, e in zip(laid.objects, extents))
            ahead = min(1 - o.y - e[3] for o, e in zip(laid.objects, extents))
        room = back + ahead  # the group can shift by any amount in [-back, ahead] along the axis
        if room >= MIN_TRAVEL:
            travel = min(room, MAX_TRAVEL)
            start = -back + (room - travel) / 2 if sign > 0 else ahead - (room - travel) / 2  # on the axis
            return _shifted(laid, abs(dx) * start, abs(dy) * start), Motion(direction, float(travel))
    raise ValueError(f"scene: found no layout in {tries} tries with room to move {direction} by {MIN_TRAVEL}: "
                     f"{scene.to_dict()}")


def _place_any(scene: Scene, rng: np.random.Generator) -> tuple[Scene, Motion]:
    """``_place`` in the first direction, of a random order, that has room (a scene with a vertical relation
    may have room only sideways)."""
    errors = []
    for direction in rng.permutation(list(DIRECTIONS)):
        try:
            return _place(scene, str(direction), rng, tries=25)
        except ValueError as err:
            errors.append(str(err))
    raise ValueError(" / ".join(errors))


def video_caption(scene: Scene, motion: Motion, rng: int | np.random.Generator | None = None) -> str:
    """The scene's caption with ``moving {direction}`` after the objects (before a stated background)."""
    _check_motion_scene(scene)
    rng = make_rng(rng)
    text = f"{caption(replace(scene, background_stated=False), rng)} moving {motion.direction}"
    if scene.background_stated:
        words = BACKGROUND_WORDS[scene.background]
        phrase = BACKGROUND_PHRASES[int(rng.integers(len(BACKGROUND_PHRASES)))]
        text = f"{text} {phrase.format(words[int(rng.integers(len(words)))])}"
    return text


def video_prompt_set(split: str = "train", n: int = 100, seed: int = 0) -> list[VideoPrompt]:
    """``n`` clips of a split, the same for the same seed: the scenes of ``sample_scenes(n, split, seed)`` without
    positions, each moving in the first direction of a random order that has room; train clips never hold a
    held-out (colour, shape) pair."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), 11])
    out = []
    for scene in sample_scenes(n, split, seed):
        scene = replace(scene, objects=tuple(replace(o, position=None) for o in scene.objects))
        start, motion = _place_any(scene, rng)
        out.append(VideoPrompt(video_caption(start, motion, rng), start, motion))
    return out


def _motion_phrase(prompt: str, name: str = "prompt") -> tuple[list[str], int]:
    """The caption's lower-cased words and the index of its one ``moving`` followed by a direction."""
    if not isinstance(prompt, str):
        raise TypeError(f"{name}: expected a caption (a string), got {type(prompt).__name__}")
    words = prompt.lower().split()
    at = [i for i, w in enumerate(words[:-1]) if w == "moving" and words[i + 1] in DIRECTIONS]
    if len(at) != 1:
        raise ValueError(f"{name}: expected a world caption with one 'moving {{{'|'.join(DIRECTIONS)}}}' "
                         f"(e.g. 'a red circle moving right'), got {prompt!r}")
    return words, at[0]


def stated_direction(prompt: str, name: str = "prompt") -> str:
    """The direction a video caption states (``"a red circle moving right"`` → ``"right"``)."""
    words, at = _motion_phrase(prompt, name)
    return words[at + 1]


def video_scene_from_prompt(prompt: str, seed: int = 0) -> tuple[Scene, Motion]:
    """``(first-frame scene, motion)`` of a caption such as ``"two blue squares moving up"``."""
    words, at = _motion_phrase(prompt)
    direction = words[at + 1]
    scene = scene_from_prompt(" ".join(words[:at] + words[at + 2 :]), seed)
    _check_motion_scene(scene, "prompt")
    return _place(scene, direction, make_rng(seed))


def render_video(scene: Scene, motion: Motion, frames: int = 8, size: int = 32, jitter: float = 0.0,
                 rng: int | np.random.Generator | None = None) -> torch.Tensor:
    """``(frames, 3, size, size)`` renders of the clip in [0, 1]; ``jitter`` is drawn afresh in every frame."""
    rng = make_rng(rng)
    return torch.stack([render(s, size, jitter, rng) for s in frame_scenes(scene, motion, frames)])


def render_videos(clips: Sequence[VideoPrompt | tuple[Scene, Motion]], frames: int = 8, size: int = 32,
                  jitter: float = 0.0, seed: int = 0) -> torch.Tensor:
    """``(B, frames, 3, size, size)`` renders of ``(scene, motion)`` pairs or ``VideoPrompt``s, the jitter drawn
    from one generator seeded by ``seed``."""
    if not len(clips):
        raise ValueError("clips: expected at least one (scene, motion) pair, got none")
    rng = np.random.default_rng(seed)
    pairs = [(c.scene, c.motion) if isinstance(c, VideoPrompt) else tuple(c) for c in clips]
    return torch.stack([render_video(s, m, frames, size, jitter, rng) for s, m in pairs])


@dataclass(frozen=True)
class VideoGoldResult:
    """The verdict on one clip.

    Attributes:
        score: the fraction of the prompt's attributes the clip satisfies, each image attribute counted by its
            pass rate over the frames, each group's motion by its check: ``(Σ rates + Σ motion) / count``.
        checks: the image checks' pass rates over the frames (``object{i}.colour``, ``count``, ...) and one
            ``object{i}.motion`` pass (0 or 1) per group of like objects, ``i`` its first object.
        frames: the image verdict of each frame.
        displacements: per motion check, the group's fitted ``(dx, dy)`` from the first frame to the last (None
            when it is matched in fewer than two frames or half of them).
    """

    score: float
    checks: dict[str, float]
    frames: list[GoldResult]
    displacements: dict[str, tuple[float, float] | None]


def _displacement(frames: list[GoldResult], members: list[int]) -> tuple[float, float] | None:
    """Least-squares velocity of the mean centre of scene objects ``members`` over the frames where all are
    matched, times the clip's length; None when that holds in fewer than two frames or half of them."""
    ts, xs, ys = [], [], []
    for t, result in enumerate(frames):
        found = [result.matches[i] for i in members]
        if all(j is not None for j in found):
            ts.append(t)
            xs.append(np.mean([result.objects[j].x for j in found]))
            ys.append(np.mean([result.objects[j].y for j in found]))
    if len(ts) < max(2, len(frames) / 2):
        return None
    t = np.asarray(ts, dtype=float) - np.mean(ts)
    span = len(frames) - 1
    return (float(t @ (np.asarray(xs) - np.mean(xs)) / (t @ t) * span),
            float(t @ (np.asarray(ys) - np.mean(ys)) / (t @ t) * span))


def _moves(displacement: tuple[float, float] | None, direction: str) -> bool:
    if displacement is None:
        return False
    dx, dy = DIRECTIONS[direction]
    along = displacement[0] * dx + displacement[1] * dy
    across = abs(displacement[0] * dy - displacement[1] * dx)
    return along >= MIN_DISPLACEMENT and across <= ACROSS_RATIO * along


def _judge_clip(scene: Scene, motion: Motion, frames: list[GoldResult]) -> VideoGoldResult:
    checks = {name: float(np.mean([f.checks[name] for f in frames])) for name in frames[0].checks}
    displacements = {}
    groups: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(scene.objects):
        groups.setdefault((o.colour, o.shape), []).append(i)
    for members in groups.values():
        name = f"object{members[0]}.motion"
        displacements[name] = _displacement(frames, members)
        checks[name] = float(_moves(displacements[name], motion.direction))
    return VideoGoldResult(sum(checks.values()) / len(checks), checks, frames, displacements)


def _as_scene(scene: Scene | dict[str, Any], name: str) -> Scene:
    if isinstance(scene, dict):
        scene = Scene.from_dict(scene)
    if not isinstance(scene, Scene):
        raise TypeError(f"{name}: expected a Scene or its dict, got {type(scene).__name__}")
    _check_motion_scene(scene, name)
    return scene


def verify_videos(videos: torch.Tensor, scenes: Sequence[Scene | dict[str, Any]],
                  motions: Sequence[Motion | dict[str, Any] | str]) -> list[VideoGoldResult]:
    """Verdicts on ``(B, T, 3, H, W)`` clips in [0, 1] (T ≥ 2), one scene (its first frame, or the dict) and one
    stated motion per clip. The scene's coordinates do not matter: it states no positions."""
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[2] != 3 or videos.shape[1] < 2:
        got = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"videos: expected a (B, T, 3, H, W) tensor with T >= 2 frames, got {got}")
    b, t = videos.shape[:2]
    if len(scenes) != b or len(motions) != b:
        raise ValueError(f"scenes, motions: expected one per clip ({b}), got {len(scenes)} and {len(motions)}")
    parsed = [_as_scene(s, f"scenes[{i}]") for i, s in enumerate(scenes)]
    moving = [Motion.from_value(m, f"motions[{i}]") for i, m in enumerate(motions)]
    results = verify_batch(videos.flatten(0, 1), [s for s in parsed for _ in range(t)])
    return [_judge_clip(s, m, results[k * t : (k + 1) * t]) for k, (s, m) in enumerate(zip(parsed, moving))]


def verify_video(video: torch.Tensor, scene: Scene | dict[str, Any], motion: Motion | dict[str, Any] | str):
    """Verdict on one ``(T, 3, H, W)`` clip against its scene and stated motion."""
    if not isinstance(video, torch.Tensor) or video.ndim != 4:
        got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video: expected a (T, 3, H, W) tensor, got {got}")
    return verify_videos(video[None], [scene], [motion])[0]


class GoldVideoReward(Reward):
    """Gold verifier of world clips: the fraction of the prompt's attributes a video satisfies, image attributes
    by their pass rate over the frames, plus the stated motion of each group of objects.

    Needs ``metadata["scene"]`` (the first frame's Scene or its dict) and ``metadata["motion"]`` (a Motion, its
    dict or a direction) per sample, as ``video_prompt_set`` provides them. Components: per kind of attribute
    (``colour`` … ``background``, ``motion``) the sample's fraction passed (1 where it states none of the kind);
    ``info`` holds ``{kind}_rate`` over the samples that state the kind.
    """

    name = "gold_video"
    scope = "sample"
    differentiable = False

    def forward(self, batch: MediaBatch) -> RewardOutput:
        pixels = video_pixels(batch, self.name, min_frames=2).detach().float()
        for i, meta in enumerate(batch.metadata):
            missing = [k for k in ("scene", "motion") if k not in meta]
            if missing:
                raise ValueError(f"metadata[{i}]: the gold_video reward needs each clip's 'scene' and 'motion' "
                                 f"(video_prompt_set), sample {i} lacks {missing}; it has {sorted(meta)}")
        results = verify_videos(pixels.expand(-1, -1, 3, -1, -1), [m["scene"] for m in batch.metadata],
                                [m["motion"] for m in batch.metadata])
        components, info = kind_components([r.checks for r in results], MOTION_KINDS, batch.device)
        scores = torch.tensor([r.score for r in results], dtype=torch.float32, device=batch.device)
        return RewardOutput(scores, components, info=info)
