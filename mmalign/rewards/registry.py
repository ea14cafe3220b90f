"""Reward names → classes, so recipes can say ``reward: {name: clip, ...}``.

The table holds import paths, not classes: nothing heavy is imported until a reward is built, and nothing is
registered as a side effect of importing a module. Third-party packages add rewards through the entry-point
group ``mmalign.rewards`` (``name = "package.module:RewardClass"``); a session can add one with ``register``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Annotated, Any

from pydantic import BeforeValidator

from mmalign.rewards.base import Reward

__all__ = ["ENTRY_POINT_GROUP", "RewardSpec", "RewardSpecs", "available", "build", "register", "resolve"]

ENTRY_POINT_GROUP = "mmalign.rewards"

_BUILTIN: dict[str, str] = {
    "jpeg_compressibility": "mmalign.rewards.jpeg:JpegCompressibility",
    "jpeg_incompressibility": "mmalign.rewards.jpeg:JpegIncompressibility",
    "clip": "mmalign.rewards.clip:CLIPScore",
    "pickscore": "mmalign.rewards.pickscore:PickScore",
    "hpsv2": "mmalign.rewards.hps:HPSv2",
    "aesthetic": "mmalign.rewards.aesthetic:LaionAesthetic",
    "artifact_classifier": "mmalign.rewards.artifact:ArtifactClassifier",
    "goal_baseline": "mmalign.rewards.vlmrm:GoalBaselineReward",
    "answer_accuracy": "mmalign.rewards.rules:AnswerAccuracy",
    "box_iou": "mmalign.rewards.rules:BoxIoU",
    "format": "mmalign.rewards.rules:StrictFormat",
    "length_penalty": "mmalign.rewards.rules:LengthPenalty",
    "ensemble": "mmalign.rewards.ensemble:Ensemble",
    "uncertainty_weighted": "mmalign.rewards.ensemble:UncertaintyWeighted",
    "direction_corrected": "mmalign.rewards.direction:DirectionCorrected",
    "exemplar_similarity": "mmalign.rewards.distributional:ExemplarSimilarity",
    "exemplar_knn": "mmalign.rewards.distributional:ExemplarKNN",
    "exemplar_fd": "mmalign.rewards.distributional:ExemplarFD",
    "exemplar_kid": "mmalign.rewards.distributional:ExemplarKID",
    "vendi": "mmalign.rewards.distributional:VendiScore",
    "vlm_question": "mmalign.rewards.vlm_questions:QuestionReward",
    "vqascore": "mmalign.rewards.vlm_questions:VQAScore",
    "vlm_artifact": "mmalign.rewards.vlm_questions:ArtifactJudge",
    "vlm_checklist": "mmalign.rewards.vlm_questions:Checklist",
    "prompt_echo": "mmalign.rewards.vlm_questions:PromptEcho",
    "frame_aggregate": "mmalign.rewards.video:FrameAggregate",
    "temporal_consistency": "mmalign.rewards.video:TemporalConsistency",
    "flicker": "mmalign.rewards.video:Flicker",
    "motion_smoothness": "mmalign.rewards.video:MotionSmoothness",
    "gold": "mmalign.world.gold:GoldReward",
    "gold_video": "mmalign.world.video:GoldVideoReward",
    "motion_proxy": "mmalign.world.motion_reward:MotionProxyScore",
    "proxy": "mmalign.world.proxy_reward:ProxyScore",
    "preference_proxy": "mmalign.world.proxy_reward:PreferenceProxyScore",
    "preference_ensemble": "mmalign.world.proxy_reward:PreferenceEnsemble",
    "world_accuracy": "mmalign.world.answer_reward:WorldAnswerAccuracy",
    "world_iou": "mmalign.world.answer_reward:WorldBoxIoU",
}
_SESSION: dict[str, str | type] = {}

RewardSpec = str | Mapping[str, Any] | Sequence[Mapping[str, Any]]


def _spec_entry(value: Any) -> Any:
    """One entry of a recipe's reward list, checked whole so that a bad one gets one message, not one per type."""
    if not (isinstance(value, (str, dict)) or isinstance(value, list) and all(isinstance(v, dict) for v in value)):
        raise ValueError(f"expected a reward name, a dict {{name: ..., **options}} or a list of such dicts, got {value!r}")
    return value


#: the recipe field type of reward specs: names, dicts with options, or lists of dicts (a weighted sum)
RewardSpecs = list[Annotated[str | dict[str, Any] | list[dict[str, Any]], BeforeValidator(_spec_entry)]]


def register(name: str, target: str | type) -> None:
    """Make a reward buildable by name in this process (``target``: a class or ``"module:Class"``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    _SESSION[name] = target


def _table() -> dict[str, str | type]:
    table: dict[str, str | type] = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    table.update(_BUILTIN)  # built-ins cannot be shadowed by a plug-in by accident
    table.update(_SESSION)  # but a deliberate register() can
    return table


def available() -> dict[str, str]:
    """Every reward name that ``build`` accepts, with the first paragraph of its docstring."""
    out = {}
    for name in sorted(_table()):
        try:
            doc = inspect.getdoc(resolve(name)) or ""
        except (ImportError, AttributeError) as err:  # a broken plug-in must not hide the others
            doc = f"(cannot be imported: {err})"
        out[name] = " ".join(doc.strip().split("\n\n")[0].split())  # the docstring's first paragraph
    return out


def resolve(name: str) -> type:
    """The reward class registered under ``name``."""
    table = _table()
    if name not in table:
        close = difflib.get_close_matches(name, table, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"reward name: unknown reward {name!r}{hint} Available: {', '.join(sorted(table))}")
    target = table[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def build(spec: RewardSpec) -> Reward:
    """Build a reward from a name, a dict ``{"name": ..., **kwargs}``, or a list of dicts.

    A list becomes a ``WeightedSum`` whose members take their ``weight`` key (default 1.0); a single dict with
    a ``weight`` other than 1 becomes a one-member sum, so the weight is never silently dropped.
    """
    from mmalign.rewards.composite import WeightedSum

    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, Mapping):
        weight, reward = _build_one(spec)
        return reward if weight == 1.0 else WeightedSum([reward], [weight])
    if isinstance(spec, Sequence):
        if not spec:
            raise ValueError("spec: expected a reward name, a dict with 'name', or a non-empty list of them, got []")
        members, weights = [], []
        for i, item in enumerate(spec):
            if not isinstance(item, (str, Mapping)):
                raise ValueError(f"spec[{i}]: expected a reward name or a dict with 'name', got {item!r}")
            weight, member = _build_one({"name": item} if isinstance(item, str) else item)
            weights.append(weight)
            members.append(member)
        return WeightedSum(members, weights)
    raise TypeError(f"spec: expected a reward name, a dict with 'name', or a non-empty list of them, got {spec!r}")


def _build_one(spec: Mapping[str, Any]) -> tuple[float, Reward]:
    """``(weight, reward)`` of one ``{"name": ..., "weight": ..., **options}`` spec."""
    from mmalign.rewards.composite import check_weight

    kwargs = dict(spec)
    if "name" not in kwargs:
        raise ValueError(f"reward spec: expected a 'name' key, got keys {sorted(kwargs)}")
    name = kwargs.pop("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward spec {dict(spec)!r}: name: expected a reward name (a non-empty string), got {name!r}")
    weight = check_weight(kwargs.pop("weight", 1.0), f"reward spec {dict(spec)!r}: weight")
    cls = resolve(name)
    params = inspect.signature(cls).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not accepts_any]
    if unknown:
        valid = [p for p in params if params[p].kind is not inspect.Parameter.VAR_POSITIONAL]
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"reward {name!r}: unknown option {', '.join(hints)}; accepted: {', '.join(valid) or 'none'}")
    required = [p for p, param in params.items() if param.default is inspect.Parameter.empty
                and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and p not in kwargs]
    if required:
        raise ValueError(f"reward {name!r}: expected the option(s) {', '.join(map(repr, required))}, got "
                         f"{sorted(kwargs) or 'none'}")
    reward = cls(**kwargs)
    if not isinstance(reward, Reward):
        raise TypeError(f"reward {name!r}: {cls.__name__} is not an mmalign.rewards.Reward")
    return weight, reward
