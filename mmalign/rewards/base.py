"""The reward contract: what every reward takes (a MediaBatch) and returns (a RewardOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from mmalign.media import MediaBatch

__all__ = ["Reward", "RewardOutput", "Scope", "SCOPES"]

Scope = Literal["sample", "group", "set"]
#: Ordered from least to most context needed; a composite has the widest scope of its members.
SCOPES: tuple[str, ...] = ("sample", "group", "set")


@dataclass
class RewardOutput:
    """Scores of one batch; higher is better.

    Attributes:
        scores: ``(B,)`` float32 total reward per sample.
        components: named sub-scores, each ``(B,)``; composites keep every member's scores here.
        uncertainty: ``(B,)`` standard deviation of the score, when the reward can estimate it.
        info: anything worth logging (scalars, strings).
    """

    scores: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    uncertainty: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.scores, torch.Tensor) or self.scores.ndim != 1:
            got = tuple(self.scores.shape) if isinstance(self.scores, torch.Tensor) else type(self.scores).__name__
            raise ValueError(f"scores: expected a (B,) tensor, got {got}")
        n = self.scores.shape[0]
        named = dict(self.components)
        if self.uncertainty is not None:
            named["uncertainty"] = self.uncertainty
        for key, value in named.items():
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (n,):
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{key}: expected a ({n},) tensor like scores, got {got}")

    def __len__(self) -> int:
        return self.scores.shape[0]

    def finite_mask(self) -> torch.Tensor:
        """``(B,)`` bool: samples whose score is finite; the rest must never reach an optimiser."""
        return torch.isfinite(self.scores)

    def detach(self) -> RewardOutput:
        return RewardOutput(
            self.scores.detach(),
            {k: v.detach() for k, v in self.components.items()},
            None if self.uncertainty is None else self.uncertainty.detach(),
            dict(self.info),
        )


class Reward(nn.Module):
    """Base class of mmalign rewards.

    Subclasses set ``name``, ``scope`` and ``differentiable`` and implement ``forward(batch) -> RewardOutput``.
    Weights a reward holds are frozen: the reward stays in eval mode and its parameters take no gradients,
    while gradients still flow to the pixels when ``differentiable`` is True.
    """

    name: str = "reward"
    scope: Scope = "sample"
    differentiable: bool = False

    def __init__(self) -> None:
        """No options: a reward's options are its constructor's parameters (the registry checks specs against
        them), so one that defines no constructor takes none, rather than ``nn.Module``'s ``*args, **kwargs``."""
        super().__init__()

    def forward(self, batch: MediaBatch) -> RewardOutput:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> RewardOutput")

    def __call__(self, batch: MediaBatch) -> RewardOutput:
        if not isinstance(batch, MediaBatch):
            raise TypeError(f"batch: expected a MediaBatch, got {type(batch).__name__}")
        output = super().__call__(batch)
        if not isinstance(output, RewardOutput):
            raise TypeError(f"{type(self).__name__}.forward: expected a RewardOutput, got {type(output).__name__}")
        if len(output) != len(batch):
            raise ValueError(f"{self.name}: returned {len(output)} scores for a batch of {len(batch)}")
        return output

    def freeze(self) -> Reward:
        """Eval mode and no parameter gradients; call at the end of ``__init__`` of rewards with weights."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Reward:
        """Rewards are judges, never trained by the trainers that call them: they stay in eval mode."""
        return super().train(False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, scope={self.scope!r}, differentiable={self.differentiable}"
