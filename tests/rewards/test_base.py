import pytest
import torch

from mmalign import MediaBatch
from mmalign.rewards import Reward, RewardOutput


class Brightness(Reward):
    """Mean pixel value."""

    name = "brightness"
    differentiable = True

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = offset
        self.linear = torch.nn.Linear(1, 1)
        self.freeze()

    def forward(self, batch):
        return RewardOutput(batch.pixels.flatten(1).mean(1) + self.offset)


def test_output_validation():
    with pytest.raises(ValueError, match=r"scores: expected a \(B,\) tensor, got \(2, 1\)"):
        RewardOutput(torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"cosine: expected a \(2,\) tensor like scores, got \(3,\)"):
        RewardOutput(torch.zeros(2), {"cosine": torch.zeros(3)})
    with pytest.raises(ValueError, match="uncertainty: expected"):
        RewardOutput(torch.zeros(2), uncertainty=torch.zeros(2, 2))
    out = RewardOutput(torch.tensor([1.0, float("nan"), float("inf")]))
    assert out.finite_mask().tolist() == [True, False, False]


def test_reward_is_frozen_and_checked():
    reward = Brightness()
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()
    assert not reward.training
    with pytest.raises(TypeError, match="batch: expected a MediaBatch, got Tensor"):
        reward(torch.rand(1, 3, 4, 4))
    pixels = torch.rand(2, 3, 4, 4, requires_grad=True)
    reward(MediaBatch(pixels, ["a", "b"])).scores.sum().backward()
    torch.testing.assert_close(pixels.grad, torch.full_like(pixels, 1 / 48))


def test_reward_must_return_output_of_batch_size():
    class Wrong(Reward):
        def forward(self, batch):
            return torch.zeros(len(batch))

    class Short(Reward):
        def forward(self, batch):
            return RewardOutput(torch.zeros(1))

    batch = MediaBatch(torch.rand(2, 3, 4, 4), ["a", "b"])
    with pytest.raises(TypeError, match="expected a RewardOutput"):
        Wrong()(batch)
    with pytest.raises(ValueError, match="returned 1 scores for a batch of 2"):
        Short()(batch)
