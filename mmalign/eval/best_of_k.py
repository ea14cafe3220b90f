"""What a reward can buy: best-of-k selection scored by gold, and within-prompt agreement with gold.

Best-of-k costs about ``log k − (k−1)/k`` nats of KL, so the gold of a reward's best-of-k pick bounds what a
KL-regularised trainer on that reward can reach at that budget: measure it before tuning a trainer.
Scores are ``(prompts, samples)`` tables: one row per prompt.
"""

from __future__ import annotations

import torch

from mmalign.eval.overoptimization import kl_best_of_n

__all__ = ["best_of_k", "best_of_k_table", "variance_components", "within_prompt_agreement"]


def best_of_k(picker: torch.Tensor, gold: torch.Tensor, k: int) -> float:
    """Mean gold of each row's sample with the highest ``picker`` score among its first ``k``."""
    choice = picker[:, :k].argmax(1, keepdim=True)
    return float(gold[:, :k].gather(1, choice).mean())


def variance_components(scores: torch.Tensor) -> dict[str, float]:
    """Where a score's spread comes from: the variance of the prompts' means (between prompts) and the mean of each
    prompt's own sample variance (within prompts: the seed's share). A policy-gradient trainer learns from the
    within-prompt share; a generator whose spread is mostly within prompts fails by noise, not systematically."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores: expected a (prompts, samples ≥ 2) table, got shape {tuple(scores.shape)}")
    scores = scores.double()
    return {"between_prompts": float(scores.mean(1).var(unbiased=False)),
            "within_prompts": float(scores.var(1, unbiased=True).mean()),
            "total": float(scores.flatten().var(unbiased=False))}


def within_prompt_agreement(scores: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy over same-prompt pairs whose gold differs (ties in ``scores`` count a half), and the
    correlation of the prompt-centred scores."""
    i, j = torch.triu_indices(scores.shape[1], scores.shape[1], 1)
    dg, ds = gold[:, i] - gold[:, j], scores[:, i] - scores[:, j]
    decided = dg != 0
    right = ((dg > 0) == (ds > 0)) & (ds != 0)
    accuracy = (right.float() + 0.5 * (ds == 0).float())[decided].mean()
    centred = torch.stack([(x - x.mean(1, keepdim=True)).flatten() for x in (scores, gold)])
    return {"pairwise_accuracy": float(accuracy), "pairs": int(decided.sum()),
            "correlation": float(torch.corrcoef(centred)[0, 1])}


def best_of_k_table(scores: dict[str, torch.Tensor], gold: torch.Tensor) -> dict:
    """For k = 2, 4, … up to the samples: each reward's best-of-k gold (and gold's own, the ceiling), the KL
    cost of each k, and each reward's within-prompt agreement with gold."""
    ks = [k for k in (2**i for i in range(1, 8)) if k <= gold.shape[1]]
    table: dict = {"prompts": gold.shape[0], "samples": gold.shape[1], "gold_mean": float(gold.mean()),
                   "kl_nats": {k: round(kl_best_of_n(k), 3) for k in ks}, "best_of_k": {}}
    for name, values in {"gold": gold, **scores}.items():
        table["best_of_k"][name] = {k: round(best_of_k(values, gold, k), 4) for k in ks}
        if name != "gold":
            table[name] = within_prompt_agreement(values, gold)
    return table
