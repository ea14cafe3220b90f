"""Rewards built from other rewards; each is itself a Reward."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mmalign.media import MediaBatch
from mmalign.rewards.base import SCOPES, Reward, RewardOutput

__all__ = ["WeightedSum", "check_weight", "unique_names", "widest_scope"]


def check_weight(value: object, name: str = "weight") -> float:
    """``value`` as a float when it is a finite real number (not a bool); else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def widest_scope(members: Sequence[Reward]) -> str:
    """The scope a composite needs: the most context any member needs."""
    return max((m.scope for m in members), key=SCOPES.index)


def unique_names(members: Sequence[Reward]) -> list[str]:
    """Member names for components, with ``_2``, ``_3`` … appended where two members share one."""
    seen: dict[str, int] = {}
    names = []
    for member in members:
        seen[member.name] = seen.get(member.name, 0) + 1
        names.append(member.name if seen[member.name] == 1 else f"{member.name}_{seen[member.name]}")
    return names


class WeightedSum(Reward):
    """Weighted sum of rewards, keeping each member's scores as a named component.

    ``components[member]`` holds the member's unweighted scores and ``components[member/sub]`` its own
    sub-scores. Member uncertainties, read as independent standard deviations, combine as
    ``sqrt(Σ wᵢ² uᵢ²)``; the sum reports an uncertainty only when every member does.
    """

    name = "weighted_sum"

    def __init__(self, members: Sequence[Reward], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("members: expected at least one reward, got none")
        if weights is None:
            weights = [1.0] * len(members)
        if isinstance(weights, str) or not isinstance(weights, Sequence):
            raise TypeError(f"weights: expected a list of numbers or None, got {type(weights).__name__}")
        weights = [check_weight(w, f"weights[{i}]") for i, w in enumerate(weights)]
        if len(weights) != len(members):
            raise ValueError(f"weights: expected one weight per member ({len(members)}), got {len(weights)}")
        self.members = nn.ModuleList(members)
        self.weights = weights
        self.member_names = unique_names(members)
        self.scope = widest_scope(members)
        self.differentiable = all(m.differentiable for m in members)

    def forward(self, batch: MediaBatch) -> RewardOutput:
        total = torch.zeros(len(batch), dtype=torch.float32, device=batch.device)
        variance = torch.zeros_like(total)
        has_uncertainty = True
        components: dict[str, torch.Tensor] = {}
        info: dict = {}
        for name, weight, member in zip(self.member_names, self.weights, self.members):
            out = member(batch)
            scores = out.scores.to(total.device, torch.float32)
            total = total + weight * scores
            components[name] = scores
            components.update({f"{name}/{k}": v for k, v in out.components.items()})
            info.update({f"{name}/{k}": v for k, v in out.info.items()})
            if out.uncertainty is None:
                has_uncertainty = False
            else:
                variance = variance + (weight * out.uncertainty.to(total.device, torch.float32)) ** 2
        return RewardOutput(total, components, variance.sqrt() if has_uncertainty else None, info)

    def extra_repr(self) -> str:
        terms = " + ".join(f"{w:g}·{n}" for w, n in zip(self.weights, self.member_names))
        return f"{terms}, scope={self.scope!r}, differentiable={self.differentiable}"
