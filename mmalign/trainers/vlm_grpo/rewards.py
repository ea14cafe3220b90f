"""Any mmalign ``Reward`` as a TRL reward function, and reward ensembles as one function (UWO / WCO).

TRL calls a reward function with ``prompts``, ``completions`` and every dataset column as keyword lists, and
wants one float per completion back, or ``None`` where the reward does not apply. ``RewardFunction`` turns
that call into a ``MediaBatch`` (images or video frames, the question text, the completion text, the other
columns as metadata), scores it with the wrapped reward on the trainer's device, logs the reward's
components, uncertainty and non-finite count through TRL's ``log_metric``, and returns non-finite scores as
``None``: TRL then leaves that reward out for that completion (and zeroes the advantage of a completion no
reward could score), so a NaN never reaches the optimiser.

It is a plain callable class, not an ``nn.Module``: TRL treats ``nn.Module`` reward functions as sequence
classifiers over token ids.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from mmalign.media import MediaBatch
from mmalign.rewards.base import Reward
from mmalign.rewards.composite import unique_names

__all__ = [
    "MEDIA_COLUMNS",
    "RewardFunction",
    "completion_text",
    "ensemble_function",
    "prompt_text",
    "reward_functions",
    "to_pixels",
]

#: Dataset columns that hold media rather than metadata.
MEDIA_COLUMNS = ("image", "images", "video")
# Keyword arguments TRL adds to every reward call besides the dataset columns.
_TRL_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")

RewardSpec = str | Mapping[str, Any]
AggregateMode = Literal["mean", "uwo", "wco"]


# --------------------------------------------------------------------------------------------- text
def _text_parts(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") for part in content if isinstance(part, Mapping) and part.get("type") == "text")
    return ""


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a completion: a string as is; conversational: the assistant turns' text, joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence):
        return "".join(_text_parts(m.get("content")) for m in completion if m.get("role", "assistant") == "assistant")
    raise TypeError(f"completions: expected strings or lists of messages, got {type(completion).__name__}")


def prompt_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The question of a prompt: a string as is; conversational: the text of the last user turn."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        users = [m for m in prompt if m.get("role") == "user"]
        return _text_parts(users[-1].get("content")) if users else ""
    raise TypeError(f"prompts: expected strings or lists of messages, got {type(prompt).__name__}")


# -------------------------------------------------------------------------------------------- media
def to_pixels(image: Any, key: str = "image") -> torch.Tensor:
    """``(C, H, W)`` float in [0, 1] from a PIL image, an ``(H, W, C)`` uint8/float array, or a CHW tensor."""
    if isinstance(image, torch.Tensor):
        pixels = image.detach()
        if pixels.ndim != 3:
            raise ValueError(f"{key}: expected a (C, H, W) tensor, got shape {tuple(pixels.shape)}")
        return pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    if hasattr(image, "convert"):  # PIL
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None].repeat(3, -1)
        if image.ndim != 3:
            raise ValueError(f"{key}: expected an (H, W, C) array, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
    raise TypeError(f"{key}: expected a PIL image, a numpy array or a tensor, got {type(image).__name__}")


def _resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(pixels.shape[-2:]) == (size, size):
        return pixels
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    out = torch.nn.functional.interpolate(flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp(0, 1).reshape(*pixels.shape[:-2], size, size)


def _stack(samples: list[torch.Tensor], image_size: int | None, column: str) -> torch.Tensor:
    if image_size is not None:
        samples = [_resize(s, image_size) for s in samples]
    shapes = sorted({tuple(s.shape) for s in samples})
    if len(shapes) > 1:
        raise ValueError(
            f"image_size: the {column!r} column holds media of different sizes {shapes[:3]}; set image_size to "
            "resize them to one square size for the reward"
        )
    return torch.stack(samples)


# ---------------------------------------------------------------------------------------- the adapter
class RewardFunction:
    """A TRL reward function over an mmalign ``Reward``.

    Args:
        reward: the reward, or a spec that ``mmalign.rewards.build`` accepts.
        name: the name TRL logs it under (``rewards/<name>/mean``); default the reward's name.
        device: where the reward runs; the trainer sets its own device when it is None.
        image_size: resize every image (or frame) to this square size before scoring, for datasets whose
            images differ in size; None requires one size per batch.

    Media come from the ``image``, ``images`` (the first image of each sample) or ``video`` column (frames:
    a ``(B, T, C, H, W)`` batch); without any, rewards that read only text get ``(B, 3, 1, 1)`` zeros.
    Every other column goes into the samples' metadata, with ``group`` (the completion's prompt group on
    this process) when ``group_size`` is set.
    """

    def __init__(
        self,
        reward: Reward | RewardSpec,
        name: str | None = None,
        device: torch.device | str | None = None,
        image_size: int | None = None,
    ) -> None:
        if not isinstance(reward, Reward):
            reward = build_reward(reward)
        if image_size is not None and not (isinstance(image_size, int) and image_size > 0):
            raise ValueError(f"image_size: expected a positive int or None, got {image_size!r}")
        self.reward = reward
        self.__name__ = name or reward.name
        self.image_size = image_size
        self.group_size: int | None = None
        self.device = None
        if device is not None:
            self.to(device)

    def to(self, device: torch.device | str) -> RewardFunction:
        """Run the reward on ``device`` from now on."""
        self.device = torch.device(device)
        self.reward.to(self.device)
        return self

    def __repr__(self) -> str:
        return f"RewardFunction({self.__name__!r}, {self.reward!r})"

    def media_batch(
        self, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Sequence[Any]]
    ) -> MediaBatch:
        """The ``MediaBatch`` a reward sees for one TRL call."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"prompts: expected one per completion ({n}), got {len(prompts)}")
        for key, values in columns.items():
            if len(values) != n:
                raise ValueError(f"{key}: expected one value per completion ({n}), got {len(values)}")
        if "video" in columns:
            frames = [torch.stack([to_pixels(f, "video") for f in video]) for video in columns["video"]]
            pixels = _stack(frames, self.image_size, "video")
        elif "images" in columns or "image" in columns:
            column = "images" if "images" in columns else "image"
            firsts = [v[0] if column == "images" and v else v for v in columns[column]]
            if any(v is None for v in firsts):
                raise ValueError(f"{column}: expected an image for every sample, got None")
            pixels = _stack([to_pixels(v, column) for v in firsts], self.image_size, column)
        else:
            pixels = torch.zeros(n, 3, 1, 1)
        metadata = [{k: v[i] for k, v in columns.items() if k not in MEDIA_COLUMNS} for i in range(n)]
        if self.group_size:
            for i, meta in enumerate(metadata):
                meta.setdefault("group", i // self.group_size)
        batch = MediaBatch(
            pixels.clamp(0, 1), [prompt_text(p) for p in prompts], metadata, [completion_text(c) for c in completions]
        )
        return batch if self.device is None else batch.to(self.device)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        log_metric = kwargs.get("log_metric")
        columns = {k: v for k, v in kwargs.items() if k not in _TRL_KWARGS}
        batch = self.media_batch(prompts, completions, columns)
        with torch.no_grad():
            out = self.reward(batch)
        scores = out.scores.detach().float().cpu()
        finite = torch.isfinite(scores)
        if log_metric is not None:
            for key, value in self.metrics(out, finite).items():
                log_metric(key, value)
        return [float(s) if ok else None for s, ok in zip(scores.tolist(), finite.tolist())]

    def metrics(self, out, finite: torch.Tensor) -> dict[str, float]:
        """``rewards/<name>/<component>`` means over finite values, the mean uncertainty, the non-finite share."""
        prefix = f"rewards/{self.__name__}"
        values = {f"{prefix}/{k}": v for k, v in out.components.items()}
        if out.uncertainty is not None:
            values[f"{prefix}/uncertainty"] = out.uncertainty
        metrics = {}
        for key, value in values.items():
            value = value.detach().float().cpu()
            value = value[torch.isfinite(value)]
            if value.numel():
                metrics[key] = float(value.mean())
        for key, value in out.info.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                metrics[f"{prefix}/{key}"] = float(value)
        metrics[f"{prefix}/nonfinite"] = float((~finite).float().mean())
        return metrics


# ----------------------------------------------------------------------------------------- builders
def build_reward(spec: Reward | RewardSpec) -> Reward:
    """A reward from a spec (a built ``Reward`` passes through)."""
    from mmalign.rewards import registry

    return spec if isinstance(spec, Reward) else registry.build(spec)


def ensemble_function(
    members: Sequence[Reward | RewardSpec],
    mode: AggregateMode = "uwo",
    lam: float = 0.5,
    standardize: bool = True,
    momentum: float | None = None,
    name: str | None = None,
    image_size: int | None = None,
) -> RewardFunction:
    """One TRL reward function that aggregates a reward ensemble per completion.

    ``mean``, UWO ``mean − λ·var`` or WCO ``min`` over the members' scores (running-standardised with
    ``standardize``), so that GRPO's advantages follow the conservative score rather than a sum that one
    over-optimised member can dominate. Members' raw and standardised scores and the ensemble's uncertainty
    (the members' std) are logged as ``rewards/<name>/<member>``, ``…/<member>/z`` and ``…/uncertainty``.
    """
    from mmalign.rewards.ensemble import Ensemble

    built = [build_reward(m) for m in members]
    ensemble = Ensemble(built, mode=mode, lam=lam, standardize=standardize, momentum=momentum)
    return RewardFunction(ensemble, name=name or f"ensemble_{mode}", image_size=image_size)


def reward_functions(
    specs: Sequence[Reward | RewardSpec],
    aggregate: Mapping[str, Any] | None = None,
    image_size: int | None = None,
) -> tuple[list[RewardFunction], list[float]]:
    """TRL reward functions and weights from reward specs.

    Without ``aggregate`` each spec becomes one function, weighted by its ``weight`` key (default 1), so that
    TRL's ``multi_objective_aggregation`` (GRPO's sum, GDPO's per-reward normalisation) combines them. With
    ``aggregate = {"mode": "uwo" | "wco" | "mean", "lam": …, "standardize": …, "momentum": …}`` the specs
    become the members of one ensemble function (weight 1).
    """
    if isinstance(specs, (str, Mapping)) or not specs:
        raise ValueError(f"rewards: expected a non-empty list of reward specs, got {specs!r}")
    weights, rewards = [], []
    for i, spec in enumerate(specs):
        weight = 1.0
        if isinstance(spec, Mapping):
            spec = dict(spec)
            weight = float(spec.pop("weight", 1.0))
        if aggregate is not None and weight != 1.0:
            raise ValueError(
                f"rewards.{i}.weight: ensemble members are not weighted (aggregate={dict(aggregate)!r}), got {weight}"
            )
        rewards.append(build_reward(spec))
        weights.append(weight)
    if aggregate is not None:
        options = dict(aggregate)
        unknown = sorted(set(options) - {"mode", "lam", "standardize", "momentum", "name"})
        if unknown:
            raise ValueError(f"aggregate: unknown option {unknown}; accepted: mode, lam, standardize, momentum, name")
        return [ensemble_function(rewards, image_size=image_size, **options)], [1.0]
    names = unique_names(rewards)
    return [RewardFunction(r, name=n, image_size=image_size) for r, n in zip(rewards, names)], weights
