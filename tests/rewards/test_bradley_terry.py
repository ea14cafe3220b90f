import pytest
import torch

from mmalign.rewards.bradley_terry import bradley_terry_loss


def test_bradley_terry_loss_matches_a_loop_over_pairs():
    scores = torch.tensor([[0.3, -0.2, 1.0], [0.5, 0.1, 0.4]])
    gold = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.8]])
    terms = []
    for s, g in zip(scores.tolist(), gold.tolist()):
        for i in range(3):
            for j in range(i + 1, 3):
                if g[i] != g[j]:  # ties state no preference
                    win, lose = (s[i], s[j]) if g[i] > g[j] else (s[j], s[i])
                    terms.append(-torch.log(torch.sigmoid(torch.tensor(win - lose))))
    assert len(terms) == 5
    assert bradley_terry_loss(scores, gold).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


def test_bradley_terry_loss_without_decided_pairs_is_zero_and_keeps_the_graph():
    scores = torch.randn(2, 3, requires_grad=True)
    loss = bradley_terry_loss(scores, torch.full((2, 3), 0.5))
    loss.backward()
    assert loss.item() == 0 and torch.equal(scores.grad, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="scores, gold"):
        bradley_terry_loss(torch.zeros(2, 3), torch.zeros(3, 2))


def test_flipped_pairs_reverse_their_preference():
    """A flipped pair counts its loser as the winner; ties stay left out even when flipped (a loop by hand)."""
    softplus = torch.nn.functional.softplus
    scores = torch.tensor([[0.3, -0.2, 1.0], [0.5, 0.1, 0.4]])
    gold = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.8]])
    flip = torch.tensor([[True, False, False], [True, True, False]])  # pairs (0,1), (0,2), (1,2) per row
    terms = [softplus(torch.tensor(0.3 + 0.2)),   # row 0 (0,1): 1.0 > 0.0, flipped: item 1 wins
             softplus(torch.tensor(1.0 - 0.3)),   # (0,2): item 0 wins
             softplus(torch.tensor(-0.2 - 1.0)),  # (1,2): item 2 wins
             softplus(torch.tensor(0.4 - 0.5)),   # row 1 (0,1) is a tie; (0,2): item 2 wins, flipped: item 0
             softplus(torch.tensor(0.1 - 0.4))]   # (1,2): item 2 wins
    assert bradley_terry_loss(scores, gold, flip).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    assert bradley_terry_loss(scores, gold, torch.zeros(2, 3, dtype=torch.bool)).item() == pytest.approx(
        bradley_terry_loss(scores, gold).item())
    with pytest.raises(ValueError, match="flip"):
        bradley_terry_loss(scores, gold, torch.zeros(2, 2, dtype=torch.bool))
