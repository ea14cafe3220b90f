"""DAPO dynamic sampling: which groups carry a learning signal, by hand."""

import math

import pytest
import torch

from mmalign.trainers.vlm_grpo.sampling import flat_groups, merged_pairs, signal_groups

nan = math.nan

# Six groups of three completions; columns: accuracy, format.
REWARDS = torch.tensor([
    [1, 1], [1, 1], [1, 1],   # 0: all right, all formatted: flat for both
    [1, 0], [0, 1], [0, 1],   # 1: sums 1, 1, 1: flat for GRPO, signal for GDPO (each reward has spread)
    [1, 1], [0, 1], [0, 1],   # 2: sums 2, 1, 1: signal for both
    [nan, nan], [1, 0], [nan, nan],  # 3: one scored completion only: no spread
    [0.5, 0], [0.5, 0], [0.5 + 1e-9, 0],  # 4: equal up to float noise: flat
    [nan, 1], [1, 0], [0, 0],  # 5: a None reward is left out of the sum (1, 1, 0): signal
], dtype=torch.float32)


def test_grpo_sum_then_normalize_needs_spread_of_the_weighted_sum():
    got = signal_groups(REWARDS, torch.ones(2), 3, "sum_then_normalize")
    assert got.tolist() == [False, False, True, False, False, True]
    # weights 1 and 2 make group 1's sums 1, 2, 2 → signal; group 5's sums 2, 1, 0 → signal
    weighted = signal_groups(REWARDS, torch.tensor([1.0, 2.0]), 3)
    assert weighted.tolist() == [False, True, True, False, False, True]
    assert torch.equal(flat_groups(REWARDS, torch.ones(2), 3), ~got)


def test_gdpo_normalize_then_sum_needs_spread_of_any_reward():
    got = signal_groups(REWARDS, torch.ones(2), 3, "normalize_then_sum")
    assert got.tolist() == [False, True, True, False, False, True]
    # a zero weight does not remove spread from the decision: TRL normalises before weighting
    assert signal_groups(REWARDS, torch.tensor([1.0, 0.0]), 3, "normalize_then_sum").tolist() == got.tolist()


def _advantages(rewards, aggregation, g):
    """TRL's advantages with weights 1 (GRPO: the sum normalised in its group; GDPO: each reward normalised in
    its group, the sum normalised over the batch), written out."""
    grouped = rewards.view(-1, g, rewards.shape[1])
    if aggregation == "sum_then_normalize":
        total = grouped.nansum(-1)
        return ((total - total.mean(1, keepdim=True)) / (total.std(1, keepdim=True) + 1e-4)).flatten()
    z = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    total = z.sum(-1).flatten()
    return (total - total.mean()) / (total.std() + 1e-4)


def test_merged_pairs_count_differing_reward_combinations_with_equal_advantages():
    rewards = torch.tensor([
        [1, 0], [0, 1], [0, 1], [0, 0],  # sums 1, 1, 1, 0; accuracy is rarer than format here
        [1, 0], [0, 1], [0, 1], [1, 0],  # sums all 1; the two rewards are exact opposites
    ], dtype=torch.float32)
    grpo = merged_pairs(rewards, _advantages(rewards, "sum_then_normalize", 4), 4)
    gdpo = merged_pairs(rewards, _advantages(rewards, "normalize_then_sum", 4), 4)
    # 5 + 4 pairs differ in their rewards. GRPO ties (1, 0) with (0, 1) in both groups; GDPO weighs the rarer
    # reward's success more and keeps them apart in the first, but its per-reward z-scores cancel in the second
    assert grpo == (2 + 4, 9) and gdpo == (0 + 4, 9)
    assert merged_pairs(REWARDS[9:12], torch.zeros(3), 3) == (2, 2)  # NaN rows equal each other, not (1, 0)
    with pytest.raises(ValueError, match=r"advantages: expected shape \(8,\)"):
        merged_pairs(rewards, torch.zeros(5), 4)
    with pytest.raises(ValueError, match="num_generations: expected an int >= 2 that divides the 8 rows, got 3"):
        merged_pairs(rewards, torch.zeros(8), 3)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_generations: expected an int >= 2 that divides the 18 rows, got 4"):
        signal_groups(REWARDS, torch.ones(2), 4)
    with pytest.raises(ValueError, match="weights: expected one weight per reward function \\(2,\\), got \\(3,\\)"):
        signal_groups(REWARDS, torch.ones(3), 3)
    with pytest.raises(ValueError, match="rewards_per_func: expected \\(N, K\\), got shape \\(18,\\)"):
        signal_groups(REWARDS[:, 0], torch.ones(1), 3)
    with pytest.raises(ValueError, match="aggregation: expected one of"):
        signal_groups(REWARDS, torch.ones(2), 3, "sum")
