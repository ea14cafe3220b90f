"""How well a score orders samples like the truth: rank correlation, within-group pairwise accuracy, AUROC."""

from __future__ import annotations

import torch

__all__ = ["agreement", "auroc"]


def auroc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    if not len(positives) or not len(negatives):
        raise ValueError(f"positives, negatives: expected both non-empty, got {len(positives)}, {len(negatives)}")
    diff = torch.as_tensor(positives)[:, None] - torch.as_tensor(negatives)[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    values, inverse = torch.unique(x, return_inverse=True)
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    means = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    return (means / torch.bincount(inverse, minlength=len(values)))[inverse]


def agreement(proxy: torch.Tensor, gold: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """How well proxy scores order samples like gold: Spearman over all, pairwise accuracy within groups.

    ``groups`` ``(N,)`` ids samples of one prompt; the pairwise accuracy counts, over pairs of one group whose
    gold scores differ, the fraction that the proxy orders the same way (ties in the proxy count a half).
    """
    if not proxy.shape == gold.shape == groups.shape or proxy.ndim != 1:
        raise ValueError(f"proxy, gold, groups: expected equal (N,) shapes, got {proxy.shape}, {gold.shape}, "
                         f"{groups.shape}")
    rp, rg = _ranks(proxy.double()), _ranks(gold.double())
    rp, rg = rp - rp.mean(), rg - rg.mean()
    spearman = float((rp * rg).sum() / (rp.norm() * rg.norm()).clamp_min(1e-12))
    same = groups[:, None] == groups[None, :]
    dg = gold[:, None] - gold[None, :]
    dp = proxy[:, None] - proxy[None, :]
    pairs = same & (dg > 0)
    right = ((dp > 0) & pairs).sum() + 0.5 * ((dp == 0) & pairs).sum()
    return {"spearman": spearman, "pairwise_accuracy": float(right / pairs.sum().clamp_min(1)),
            "pairs": int(pairs.sum())}
