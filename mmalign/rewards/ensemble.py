"""Reward ensembles (Coste et al.) and uncertainty weighting (Ctrl-U), both rewards themselves.

An ensemble turns disagreement between reward models into a conservative score and an uncertainty: members
are first put on one scale by running standardisation, since a CLIP cosine and an aesthetic 1–10 score cannot
be averaged as they come. A member's non-finite score makes the sample non-finite (trainers skip and count
it) rather than being averaged away.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from mmalign.media import MediaBatch
from mmalign.rewards.base import Reward, RewardOutput
from mmalign.rewards.composite import unique_names, widest_scope

__all__ = ["Ensemble", "UncertaintyWeighted", "as_reward"]

EnsembleMode = Literal["mean", "uwo", "wco"]
RewardLike = Reward | str | Mapping[str, Any]
_MODES = ("mean", "uwo", "wco")
_MIN_STD = 1e-6  # a member whose running std is below this is divided by it instead (constant members → 0)


def as_reward(spec: RewardLike) -> Reward:
    """A Reward as is; a name or ``{"name": ..., **options}`` built through the registry (for recipes)."""
    if isinstance(spec, Reward):
        return spec
    from mmalign.rewards.registry import build

    return build(spec)


def _check_lam(lam: float) -> float:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam: expected a finite number >= 0, got {lam!r}")
    return float(lam)


class Ensemble(Reward):
    """Members combined per sample: ``mean``, UWO ``mean − λ·var`` or WCO ``min``; uncertainty = their std.

    With ``standardize`` each member's scores become ``(r − μ) / σ`` with a running mean μ and population
    variance σ² of that member's finite scores. Statistics are updated from each batch *before* it is
    standardised, so the first batch initialises them. ``momentum=None`` pools every score seen (exact
    running moments, merged per batch as in Chan et al.); a float ``m`` keeps an exponential average
    ``μ ← (1−m)·μ + m·μ_batch`` (same for σ²) that follows a drifting policy. The statistics are buffers: they
    travel in ``state_dict`` so a resumed run standardises as before, and no gradient flows through them.
    ``hold_statistics()`` stops the updates (the statistics then standardise every batch alike, so a sample's
    score no longer depends on the rest of its batch: what noise optimisation, prompt by prompt, needs).

    ``var`` is the population variance across members (not the std), ``uncertainty`` the population std, both
    on the standardised scale. Components: each member's raw scores under its name, standardised ones under
    ``name/z``, and its own sub-scores under ``name/sub``; ``info`` logs the running ``name/mean``, ``name/std``.
    """

    name = "ensemble"

    def __init__(
        self,
        members: Sequence[RewardLike],
        mode: EnsembleMode = "mean",
        lam: float = 0.5,
        standardize: bool = True,
        momentum: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(members, (str, Mapping)) or not members:
            raise ValueError(
                f"members: expected a non-empty list of rewards or reward specs, got {members!r}"
            )
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {', '.join(_MODES)}, got {mode!r}")
        if momentum is not None and not 0 < momentum <= 1:
            raise ValueError(
                f"momentum: expected None (pool all batches) or a number in (0, 1], got {momentum!r}"
            )
        self.members = nn.ModuleList(as_reward(m) for m in members)
        self.member_names = unique_names(self.members)
        self.mode, self.lam, self.standardize, self.momentum = (
            mode,
            _check_lam(lam),
            bool(standardize),
            momentum,
        )
        self.scope = widest_scope(self.members)
        self.differentiable = all(m.differentiable for m in self.members)
        n = len(self.members)
        self.register_buffer("count", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.statistics_held = False

    def hold_statistics(self, held: bool = True) -> Ensemble:
        """Stop (or resume) updating the running statistics from the batches scored; returns self."""
        self.statistics_held = bool(held)
        return self

    @torch.no_grad()
    def update_statistics(self, raw: torch.Tensor) -> None:
        """Fold the finite entries of ``raw`` ``(members, B)`` into the running mean and variance."""
        finite = torch.isfinite(raw)
        n_batch = finite.sum(1).to(self.count)
        x = torch.where(finite, raw, 0.0).to(self.count)
        mean_batch = x.sum(1) / n_batch.clamp_min(1)
        var_batch = (torch.where(finite, x - mean_batch[:, None], 0.0) ** 2).sum(1) / n_batch.clamp_min(1)
        mean, var, count = self.running_mean, self.running_var, self.count
        if self.momentum is None:
            total = (count + n_batch).clamp_min(1)
            delta = mean_batch - mean
            new_mean = mean + delta * n_batch / total
            new_var = (count * var + n_batch * var_batch + delta**2 * count * n_batch / total) / total
        else:
            m, first = self.momentum, count == 0
            new_mean = torch.where(first, mean_batch, (1 - m) * mean + m * mean_batch)
            new_var = torch.where(first, var_batch, (1 - m) * var + m * var_batch)
        seen = n_batch > 0
        self.running_mean.copy_(torch.where(seen, new_mean, mean))
        self.running_var.copy_(torch.where(seen, new_var, var))
        self.count.add_(n_batch)

    def combine(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores, uncertainty, z)`` of members' raw scores ``(members, B)`` under the current statistics
        (not updated here): what ``forward`` returns, for scores computed elsewhere (e.g. all of an
        evaluation's samples at once, after ``update_statistics`` on all of them)."""
        if raw.ndim != 2 or raw.shape[0] != len(self.members):
            raise ValueError(f"raw: expected ({len(self.members)} members, B) scores, got shape {tuple(raw.shape)}")
        finite = torch.isfinite(raw).all(0)
        z = raw
        if self.standardize:
            mean = self.running_mean.to(raw)[:, None]
            std = self.running_var.sqrt().clamp_min(_MIN_STD).to(raw)[:, None]
            z = (raw - mean) / std
        safe = torch.where(finite, z, 0.0)  # keeps NaN out of the gradients of the finite samples
        spread = safe.var(0, unbiased=False)
        if self.mode == "mean":
            scores = safe.mean(0)
        elif self.mode == "uwo":
            scores = safe.mean(0) - self.lam * spread
        else:
            scores = safe.min(0).values
        return torch.where(finite, scores, math.nan), torch.where(finite, spread.sqrt(), math.nan), z

    def forward(self, batch: MediaBatch) -> RewardOutput:
        outputs = [member(batch) for member in self.members]
        raw = torch.stack([out.scores.to(batch.device, torch.float32) for out in outputs])  # (members, B)
        if self.standardize and not self.statistics_held:
            self.update_statistics(raw.detach())
        scores, uncertainty, z = self.combine(raw)
        components: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {}
        for k, (name, out) in enumerate(zip(self.member_names, outputs)):
            components[name] = raw[k]
            if self.standardize:
                components[f"{name}/z"] = z[k]
                info[f"{name}/mean"] = float(self.running_mean[k])
                info[f"{name}/std"] = float(self.running_var[k].sqrt())
            components.update({f"{name}/{key}": value for key, value in out.components.items()})
        return RewardOutput(scores, components, uncertainty, info)

    def extra_repr(self) -> str:
        lam = f", lam={self.lam:g}" if self.mode == "uwo" else ""
        return (
            f"mode={self.mode!r}{lam}, standardize={self.standardize}, momentum={self.momentum}, "
            f"members={self.member_names}, scope={self.scope!r}, differentiable={self.differentiable}"
        )


class UncertaintyWeighted(Reward):
    """Ctrl-U as a reward transform: ``exp(−U)·r − λ·U``, so confident scores count more.

    Ctrl-U weights each sample's reward *loss* by ``exp(−U)`` and adds ``λ·U``; with the reward ``r = −loss``
    to be maximised this is the score above. Uncertain samples are shrunk towards 0 and penalised by ``λ·U``;
    gradients flow through ``U`` too, so a differentiable policy is also pushed towards samples the judges
    agree on. ``U`` is the inner reward's ``uncertainty`` (e.g. an ``Ensemble``), or, with ``repeats = K``,
    the population std of ``K`` evaluations of a stochastic reward, whose mean is then ``r``. A non-finite
    ``r`` or ``U`` gives a non-finite score. Components: ``r`` under the inner reward's name, the weight
    ``exp(−U)`` under ``weight``, and the inner components and info (of the first evaluation) under
    ``name/sub``.
    """

    name = "uncertainty_weighted"

    def __init__(self, reward: RewardLike, lam: float = 0.1, repeats: int | None = None) -> None:
        super().__init__()
        if repeats is not None and not (isinstance(repeats, int) and repeats >= 2):
            raise ValueError(
                f"repeats: expected None (use the reward's uncertainty) or an int >= 2, got {repeats!r}"
            )
        self.reward = as_reward(reward)
        self.lam, self.repeats = _check_lam(lam), repeats
        self.scope, self.differentiable = self.reward.scope, self.reward.differentiable

    def forward(self, batch: MediaBatch) -> RewardOutput:
        first = self.reward(batch)
        if self.repeats is None:
            if first.uncertainty is None:
                raise ValueError(
                    f"reward: {self.reward.name} reports no uncertainty; wrap an Ensemble or pass repeats >= 2 "
                    "to measure it from repeated evaluations of a stochastic reward"
                )
            r, u = first.scores, first.uncertainty
        else:
            draws = torch.stack([first.scores] + [self.reward(batch).scores for _ in range(self.repeats - 1)])
            r, u = draws.mean(0), draws.std(0, unbiased=False)
        r, u = r.to(batch.device, torch.float32), u.to(batch.device, torch.float32)
        ok = torch.isfinite(r) & torch.isfinite(u)
        r_safe, u_safe = torch.where(ok, r, 0.0), torch.where(ok, u, 0.0)
        weight = torch.exp(-u_safe)
        scores = torch.where(ok, weight * r_safe - self.lam * u_safe, math.nan)
        components = {self.reward.name: r, "weight": torch.where(ok, weight, math.nan)}
        components.update({f"{self.reward.name}/{k}": v for k, v in first.components.items()})
        info = {f"{self.reward.name}/{k}": v for k, v in first.info.items()}
        return RewardOutput(scores, components, u, info)

    def extra_repr(self) -> str:
        source = f"repeats={self.repeats}" if self.repeats else "uncertainty from the reward"
        return f"lam={self.lam:g}, {source}, scope={self.scope!r}, differentiable={self.differentiable}"
