import math

import pytest
import torch

from mmalign import MediaBatch
from mmalign.rewards import Reward, RewardOutput, WeightedSum


class Const(Reward):
    def __init__(self, name, values, uncertainty=None, scope="sample", differentiable=True):
        super().__init__()
        self.name, self.scope, self.differentiable = name, scope, differentiable
        self.values, self.unc = torch.tensor(values), uncertainty

    def forward(self, batch):
        unc = None if self.unc is None else torch.tensor(self.unc)
        return RewardOutput(self.values, {"half": self.values / 2}, unc, {"calls": 1})


BATCH = MediaBatch(torch.rand(2, 3, 4, 4), ["a", "b"])


def test_weighted_sum_values_and_components():
    total = WeightedSum([Const("a", [1.0, 2.0]), Const("b", [10.0, 20.0])], [2.0, -0.5])
    out = total(BATCH)
    torch.testing.assert_close(out.scores, torch.tensor([2 - 5.0, 4 - 10.0]))
    assert set(out.components) == {"a", "a/half", "b", "b/half"}
    torch.testing.assert_close(out.components["b"], torch.tensor([10.0, 20.0]))
    assert out.uncertainty is None and out.info == {"a/calls": 1, "b/calls": 1}


def test_uncertainty_combines_as_independent_std():
    out = WeightedSum(
        [Const("a", [0.0, 0.0], [3.0, 1.0]), Const("b", [0.0, 0.0], [4.0, 1.0])], [1.0, 2.0]
    )(BATCH)
    torch.testing.assert_close(out.uncertainty, torch.tensor([math.sqrt(9 + 64), math.sqrt(1 + 4)]))


def test_scope_names_and_errors():
    members = [Const("a", [0.0, 0.0]), Const("a", [1.0, 1.0], scope="group", differentiable=False)]
    total = WeightedSum(members)
    assert total.member_names == ["a", "a_2"] and total.scope == "group" and not total.differentiable
    assert set(total(BATCH).components) >= {"a", "a_2"}
    with pytest.raises(ValueError, match="members: expected at least one"):
        WeightedSum([])
    with pytest.raises(ValueError, match=r"weights: expected one weight per member \(2\), got 1"):
        WeightedSum(members, [1.0])
