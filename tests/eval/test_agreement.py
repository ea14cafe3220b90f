import itertools

import pytest
import torch

from mmalign.eval.agreement import agreement, auroc


def test_auroc_matches_counting_pairs():
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(13, generator=gen).round(decimals=1), torch.rand(9, generator=gen).round(decimals=1)
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos.tolist(), neg.tolist())]
    assert auroc(pos, neg) == pytest.approx(sum(pairs) / len(pairs))
    with pytest.raises(ValueError, match="negatives"):
        auroc(pos, neg[:0])


def test_agreement_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    proxy = torch.randn(24, generator=gen)
    gold = torch.randint(0, 4, (24,), generator=gen).float() / 4  # ties, as gold scores have
    groups = torch.arange(6).repeat_interleave(4)
    got = agreement(proxy, gold, groups)

    def ranks(x):
        return torch.tensor([sum((y < v).item() + 0.5 * (y == v).item() for y in x) - 0.5 + 1 for v in x])

    rp, rg = ranks(proxy), ranks(gold)
    expected = torch.corrcoef(torch.stack([rp, rg]))[0, 1].item()
    right = total = 0.0
    for i in range(24):
        for j in range(24):
            if groups[i] == groups[j] and gold[i] > gold[j]:
                total += 1
                right += 1.0 if proxy[i] > proxy[j] else 0.5 if proxy[i] == proxy[j] else 0.0
    assert got["spearman"] == pytest.approx(expected, abs=1e-6)
    assert got["pairwise_accuracy"] == pytest.approx(right / total)
    assert got["pairs"] == total
