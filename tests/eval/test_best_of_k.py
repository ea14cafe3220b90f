"""The best-of-k probe's selection and agreement helpers, against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from mmalign.eval import best_of_k as probe

GOLD = torch.tensor([[0.2, 0.8, 0.4, 0.0], [1.0, 0.5, 0.5, 0.0]])
PICKER = torch.tensor([[0.1, 0.3, 0.9, 0.2], [0.2, 0.2, 0.1, 0.7]])


def test_best_of_k_takes_the_pickers_choice_among_the_first_k():
    # k=2: row 0 picks 0.8, row 1 ties (first wins) -> 1.0; k=4: row 0 picks 0.4, row 1 picks 0.0
    assert probe.best_of_k(PICKER, GOLD, 2) == pytest.approx((0.8 + 1.0) / 2)
    assert probe.best_of_k(PICKER, GOLD, 4) == pytest.approx((0.4 + 0.0) / 2)
    assert probe.best_of_k(GOLD, GOLD, 4) == pytest.approx((0.8 + 1.0) / 2)


def test_within_prompt_agreement_counts_decided_pairs_and_half_ties():
    out = probe.within_prompt_agreement(PICKER, GOLD)
    # row 0: all 6 pairs decided, right: (0,1) (0,2) (1,3) (2,3) -> 4; row 1: pair (1,2) undecided in gold;
    # of the other 5, (0,1) ties in the picker -> 0.5, (0,2) right, (0,3) wrong, (1,3) wrong, (2,3) wrong
    assert out["pairs"] == 11
    assert out["pairwise_accuracy"] == pytest.approx((4 + 0.5 + 1) / 11)
    assert -1 <= out["correlation"] <= 1
    assert probe.within_prompt_agreement(GOLD, GOLD)["pairwise_accuracy"] == 1.0


def test_table_holds_every_reward_gold_ceiling_and_kl_cost():
    table = probe.best_of_k_table({"picker": PICKER}, GOLD)
    assert table["prompts"] == 2 and table["samples"] == 4 and table["gold_mean"] == pytest.approx(3.4 / 8)
    assert table["kl_nats"] == {2: pytest.approx(0.193, abs=1e-3), 4: pytest.approx(0.636, abs=1e-3)}
    assert table["best_of_k"]["gold"] == {2: pytest.approx(0.9), 4: pytest.approx(0.9)}
    assert table["best_of_k"]["picker"][4] == pytest.approx(0.2)
    assert table["picker"] == probe.within_prompt_agreement(PICKER, GOLD) and "gold" not in table
