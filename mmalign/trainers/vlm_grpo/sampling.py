"""DAPO dynamic sampling: which prompt groups carry a learning signal.

A group of ``G`` completions of one prompt whose rewards are all equal gets zero advantages under GRPO: it
costs a forward and backward pass and teaches nothing, and as a policy gets better more of its groups are all
right. DAPO drops such groups and samples more prompts until the batch is full again. Whether a group is
"flat" depends on how TRL turns several rewards into advantages:

- ``sum_then_normalize`` (GRPO): the weighted sum per completion is what gets normalised, so a group is flat
  when that sum has no spread, even if its members do (accuracy 1 / format 0 against accuracy 0 / format 1);
- ``normalize_then_sum`` (GDPO): each reward is normalised in the group first, so a group carries signal
  as soon as any one reward has spread in it.

Completions whose every reward is NaN are ignored, as TRL ignores them; a group needs two scored
completions to have spread.

``merged_pairs`` measures what the two aggregations are said to differ in: pairs of completions of one group
whose reward combinations differ but whose advantages came out equal, so the update cannot tell them apart.
"""

from __future__ import annotations

import torch

__all__ = ["flat_groups", "merged_pairs", "signal_groups"]

AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def _spread(values: torch.Tensor) -> torch.Tensor:
    """``(groups, G)`` → ``(groups,)`` bool: at least two finite values and not all (close to) equal."""
    finite = torch.isfinite(values)
    high = torch.where(finite, values, -torch.inf).max(1).values
    low = torch.where(finite, values, torch.inf).min(1).values
    enough = finite.sum(1) >= 2
    return enough & ~torch.isclose(high, low)


def signal_groups(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    num_generations: int,
    aggregation: str = "sum_then_normalize",
) -> torch.Tensor:
    """``(N // G,)`` bool: the groups of consecutive ``G`` rows of ``rewards_per_func`` ``(N, K)`` whose
    advantages are not all zero under ``aggregation`` with reward ``weights`` ``(K,)``."""
    if rewards_per_func.ndim != 2:
        raise ValueError(f"rewards_per_func: expected (N, K), got shape {tuple(rewards_per_func.shape)}")
    n, k = rewards_per_func.shape
    if not isinstance(num_generations, int) or num_generations < 2 or n % num_generations:
        raise ValueError(
            f"num_generations: expected an int >= 2 that divides the {n} rows, got {num_generations!r}"
        )
    if tuple(weights.shape) != (k,):
        raise ValueError(f"weights: expected one weight per reward function ({k},), got {tuple(weights.shape)}")
    grouped = rewards_per_func.float().view(-1, num_generations, k)
    if aggregation == "sum_then_normalize":
        unscored = torch.isnan(grouped).all(-1)
        total = (grouped * weights.to(grouped).view(1, 1, k)).nansum(-1)
        return _spread(total.masked_fill(unscored, torch.nan))
    if aggregation == "normalize_then_sum":
        per_reward = torch.stack([_spread(grouped[..., j]) for j in range(k)], dim=-1)
        return per_reward.any(-1)
    raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")


def flat_groups(*args, **kwargs) -> torch.Tensor:
    """The complement of ``signal_groups``: groups DAPO drops."""
    return ~signal_groups(*args, **kwargs)


def merged_pairs(
    rewards_per_func: torch.Tensor, advantages: torch.Tensor, num_generations: int, atol: float = 1e-6
) -> tuple[int, int]:
    """``(merged, distinct)``: of the pairs of completions within a group whose reward vectors differ
    (``distinct``; NaN equals NaN), those whose ``advantages`` are equal within ``atol`` (``merged``).

    ``rewards_per_func`` is ``(N, K)`` and ``advantages`` ``(N,)``, groups of ``num_generations`` consecutive rows,
    as TRL computes them for one generation batch.
    """
    if rewards_per_func.ndim != 2 or advantages.shape != rewards_per_func.shape[:1]:
        raise ValueError(f"advantages: expected shape ({rewards_per_func.shape[0]},) beside rewards_per_func (N, K), "
                         f"got {tuple(advantages.shape)} and {tuple(rewards_per_func.shape)}")
    n, k = rewards_per_func.shape
    if not isinstance(num_generations, int) or num_generations < 2 or n % num_generations:
        raise ValueError(f"num_generations: expected an int >= 2 that divides the {n} rows, got {num_generations!r}")
    rewards = rewards_per_func.double().view(-1, num_generations, 1, k)
    others = rewards.transpose(1, 2)
    same = ((rewards == others) | (rewards.isnan() & others.isnan())).all(-1)  # (groups, G, G)
    values = advantages.double().view(-1, num_generations, 1)
    tied = (values - values.transpose(1, 2)).abs() <= atol
    upper = torch.ones(num_generations, num_generations, dtype=torch.bool).triu(1)
    distinct = ~same & upper
    return int((distinct & tied).sum()), int(distinct.sum())
