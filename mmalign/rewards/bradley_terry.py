"""Fitting a reward model to comparisons: the Bradley–Terry likelihood ``P(a ≻ b) = σ(s_a − s_b)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(scores: torch.Tensor, gold: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Mean ``−log σ(s_win − s_lose)`` over the pairs of each row of ``scores`` ``(G, k)`` whose ``gold`` differs
    (ties carry no preference and are left out); 0 when no pair differs.

    ``flip`` ``(G, k(k−1)/2)`` bool, pairs in ``torch.triu_indices(k, k, 1)`` order, reverses those pairs'
    preferences: label noise, as annotators who disagree (Coste et al. flip 25% of the labels)."""
    if scores.shape != gold.shape or scores.ndim != 2:
        raise ValueError(f"scores, gold: expected equal (G, k) shapes, got {tuple(scores.shape)}, {tuple(gold.shape)}")
    i, j = torch.triu_indices(scores.shape[1], scores.shape[1], 1, device=scores.device)
    sign = torch.sign(gold[:, i] - gold[:, j])
    if flip is not None:
        if flip.shape != sign.shape or flip.dtype != torch.bool:
            raise ValueError(f"flip: expected a bool tensor of shape {tuple(sign.shape)} (groups, pairs), got "
                             f"{flip.dtype} of shape {tuple(flip.shape)}")
        sign = torch.where(flip.to(sign.device), -sign, sign)
    decided = sign != 0
    if not decided.any():
        return scores.sum() * 0
    return F.softplus(-sign * (scores[:, i] - scores[:, j]))[decided].mean()
