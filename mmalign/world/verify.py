"""The gold verifier: which of a prompt's attributes an image satisfies.

Every scene states a set of attributes, each checked on the detected objects:

- ``object{i}.colour`` / ``object{i}.shape``: the object matched to scene object ``i`` has that colour / shape;
- ``object{i}.position``: its centre lies in the stated region (left: x < 0.4, right: x > 0.6, top: y < 0.4,
  bottom: y > 0.6, centre: both within 0.11 of the middle), when the prompt places it;
- ``object{i}.size``: "small" below 0.28 of the canvas, "large" above 0.365, when the prompt states a size;
- ``count``: the image holds exactly as many objects as the scene (extra or missing objects fail it);
- ``relation``: "A left of B" needs A's centre 0.1 of the canvas left of B's ("above" likewise), when stated;
- ``background``: the border is nearest the stated background colour, when the prompt names one.

Scene objects are matched one-to-one to detected objects by the assignment that passes the most checks, so an
object in the wrong place or colour fails that one attribute, and a missing object fails all of its own. The
score is the fraction of checks passed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmalign.world.detect import DetectedObject, Detection, detect
from mmalign.world.scenes import Scene, SceneObject

__all__ = ["GoldResult", "verify", "verify_batch"]

REGION_EDGE = 0.4  # left: x < 0.4, right: x > 1 - 0.4, likewise top and bottom
CENTRE_RADIUS = 0.11
SMALL_BELOW, LARGE_ABOVE = 0.28, 0.365
RELATION_MARGIN = 0.1
_MAX_MATCHED = 6  # candidates for matching: the largest detected objects


@dataclass(frozen=True)
class GoldResult:
    """The verdict on one image.

    Attributes:
        score: fraction of ``checks`` passed, in [0, 1].
        checks: pass/fail per attribute the prompt states (see the module docstring for the names).
        objects: detected objects, largest first.
        background: name of the detected background colour, or None when it is none of them.
        matches: index into ``objects`` of the object matched to each scene object (None when unmatched).
    """

    score: float
    checks: dict[str, bool]
    objects: list[DetectedObject]
    background: str | None
    matches: tuple[int | None, ...]


def _in_region(det: DetectedObject, region: str) -> bool:
    if region == "centre":
        return max(abs(det.x - 0.5), abs(det.y - 0.5)) < CENTRE_RADIUS
    value = det.x if region in ("left", "right") else det.y
    return value < REGION_EDGE if region in ("left", "top") else value > 1 - REGION_EDGE


def _object_checks(obj: SceneObject, det: DetectedObject | None) -> dict[str, bool]:
    checks = {
        "colour": det is not None and det.colour == obj.colour,
        "shape": det is not None and det.shape == obj.shape,
    }
    if obj.position is not None:
        checks["position"] = det is not None and _in_region(det, obj.position)
    if obj.size is not None:
        checks["size"] = det is not None and (
            det.scale < SMALL_BELOW if obj.size == "small" else det.scale > LARGE_ABOVE
        )
    return checks


def _related(a: DetectedObject | None, b: DetectedObject | None, relation: str) -> bool:
    if a is None or b is None:
        return False
    return (b.x - a.x if relation == "left of" else b.y - a.y) > RELATION_MARGIN


def _judge(scene: Scene, detection: Detection) -> GoldResult:
    found = detection.objects[:_MAX_MATCHED]
    per_pair = [[_object_checks(o, d) for d in [*found, None]] for o in scene.objects]
    best, best_passed = None, -1
    slots = [*range(len(found)), *([None] * len(scene.objects))]
    for assignment in dict.fromkeys(itertools.permutations(slots, len(scene.objects))):
        passed = sum(sum(per_pair[i][-1 if j is None else j].values()) for i, j in enumerate(assignment))
        if scene.relation is not None:
            a, b = (None if j is None else found[j] for j in assignment)
            passed += _related(a, b, scene.relation)
        if passed > best_passed:
            best, best_passed = assignment, passed
    checks: dict[str, bool] = {}
    for i, j in enumerate(best):
        for name, ok in per_pair[i][-1 if j is None else j].items():
            checks[f"object{i}.{name}"] = ok
    checks["count"] = len(detection.objects) == len(scene.objects)
    if scene.relation is not None:
        a, b = (None if j is None else found[j] for j in best)
        checks["relation"] = _related(a, b, scene.relation)
    if scene.background_stated:
        checks["background"] = detection.background == scene.background
    score = sum(checks.values()) / len(checks)
    return GoldResult(score, checks, detection.objects, detection.background, tuple(best))


def _as_scene(scene: Scene | dict[str, Any], index: int) -> Scene:
    if isinstance(scene, Scene):
        return scene
    if isinstance(scene, dict):
        return Scene.from_dict(scene)
    raise TypeError(f"scenes[{index}]: expected a Scene or its dict, got {type(scene).__name__}")


def _as_tensor(image: torch.Tensor | np.ndarray | Image.Image) -> torch.Tensor:
    """``(3, H, W)`` float in [0, 1] from a tensor, an (H, W, 3) or (3, H, W) array, or a PIL image."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / scale)
        image = tensor.permute(2, 0, 1) if tensor.ndim == 3 and tensor.shape[-1] == 3 else tensor
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"image: expected a (3, H, W) tensor, an (H, W, 3) array or a PIL image, got {got}")
    return image.float()


def verify_batch(images: torch.Tensor, scenes: Sequence[Scene | dict[str, Any]]) -> list[GoldResult]:
    """Verdicts on a ``(B, 3, H, W)`` batch in [0, 1], one scene (or its dict) per image."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a (B, 3, H, W) tensor, got {got}")
    if len(scenes) != len(images):
        raise ValueError(f"scenes: expected one scene per image ({len(images)}), got {len(scenes)}")
    parsed = [_as_scene(s, i) for i, s in enumerate(scenes)]
    return [_judge(s, d) for s, d in zip(parsed, detect(images))]


def verify(image: torch.Tensor | np.ndarray | Image.Image, scene: Scene | dict[str, Any]) -> GoldResult:
    """Verdict on one image (``(3, H, W)`` tensor in [0, 1], array or PIL image) against its scene."""
    return verify_batch(_as_tensor(image)[None], [scene])[0]
