"""Set metrics of embeddings in float64, differentiable: Vendi score, Fréchet distance, KID's unbiased MMD², and
each sample's leave-one-out contribution to a set's value. The distributional rewards
(``mmalign.rewards.distributional``) and the diversity report (``mmalign.eval.diversity``) use them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["GaussianStats", "frechet_distance", "gaussian_stats", "kid", "kid_within", "leave_one_out", "vendi"]


def _rows(name: str, x: torch.Tensor, at_least: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or len(x) < at_least:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected (n, D) embeddings with n >= {at_least}, got {got}")
    return x.double()


def _same_dim(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"x, y: expected embeddings of one dimension, got {x.shape[-1]} and {y.shape[-1]}")


def vendi(embeddings: torch.Tensor) -> torch.Tensor:
    """Vendi score ``exp(−Σ λ log λ)``, λ the eigenvalues of ``K / n``, ``K`` the cosine kernel of ``(n, D)``
    embeddings (normalised here); float64 ``eigvalsh``, negatives clamped, ``0·log 0 = 0``. Differentiable."""
    x = F.normalize(_rows("embeddings", embeddings, 1), dim=-1)
    eigenvalues = torch.linalg.eigvalsh(x @ x.T / len(x)).clamp_min(0.0)
    positive = eigenvalues[eigenvalues > 0]
    return torch.exp(-(positive * positive.log()).sum())


class GaussianStats(NamedTuple):
    """What the Fréchet distance needs of the reference set: mean, symmetric square root of the covariance
    (``n − 1`` denominator, eigenvalues clamped at 0), trace of the covariance."""

    mean: torch.Tensor
    sqrt_cov: torch.Tensor
    trace: torch.Tensor


def gaussian_stats(y: torch.Tensor) -> GaussianStats:
    y = _rows("y", y, 2)
    centred = y - y.mean(0)
    cov = centred.T @ centred / (len(y) - 1)
    eigenvalues, vectors = torch.linalg.eigh(cov)
    return GaussianStats(y.mean(0), (vectors * eigenvalues.clamp_min(0).sqrt()) @ vectors.T, cov.diagonal().sum())


def frechet_distance(x: torch.Tensor, y: torch.Tensor | GaussianStats) -> torch.Tensor:
    """``‖μx − μy‖² + tr Σx + tr Σy − 2·Σ sqrt(eig(Σx Σy))`` of ``(n, D)`` embeddings against ``y``
    (embeddings or their ``gaussian_stats``), float64.

    The eigenvalues of ``Σx Σy`` are those of ``S Σx S`` with ``S = Σy^½``, that is ``σᵢ² / (n − 1)`` for the
    singular values σ of the centred ``x`` times ``S``; so the last term is ``2 Σ σᵢ / sqrt(n − 1)``: no square
    root of a matrix product, and gradients that stay finite when ``x`` has fewer samples than dimensions.
    """
    x = _rows("x", x, 2)
    ref = GaussianStats(*(t.double() for t in y)) if isinstance(y, GaussianStats) else gaussian_stats(y)
    _same_dim(x, ref.mean)
    mean = x.mean(0)
    centred = x - mean
    root_trace = torch.linalg.svdvals(centred @ ref.sqrt_cov).sum() / math.sqrt(len(x) - 1)
    return (mean - ref.mean).pow(2).sum() + centred.pow(2).sum() / (len(x) - 1) + ref.trace - 2 * root_trace


def _kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[-1] + 1) ** 3


def kid_within(y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Mean of KID's kernel ``k(yᵢ, yⱼ)`` over the pairs ``i ≠ j`` of ``(m, D)`` embeddings, in row chunks."""
    y = _rows("y", y, 2)
    total = sum(_kernel(y[s : s + chunk], y).sum() for s in range(0, len(y), chunk))
    diagonal = (y.pow(2).sum(1) / y.shape[-1] + 1).pow(3).sum()
    return (total - diagonal) / (len(y) * (len(y) - 1))


def kid(x: torch.Tensor, y: torch.Tensor, y_within: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased MMD² of ``(n, D)`` and ``(m, D)`` embeddings with KID's kernel ``k(a, b) = (aᵀb/D + 1)³``, float64:
    the means of ``k`` over the pairs ``i ≠ j`` within each set, minus twice the mean over all cross pairs.

    This is over all samples at once, the expectation of KID's average over random subsets; ``y_within``
    (``kid_within(y)``) saves recomputing the reference's own term.
    """
    x, y = _rows("x", x, 2), _rows("y", y, 2)
    _same_dim(x, y)
    xx = _kernel(x, x)
    within_x = (xx.sum() - xx.diagonal().sum()) / (len(x) * (len(x) - 1))
    within_y = kid_within(y) if y_within is None else y_within.double()
    return within_x + within_y - 2 * _kernel(x, y).mean()


def leave_one_out(metric: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``(n,)`` ``metric(x) − metric(x without row i)``, detached: each row's contribution to a set's value."""
    with torch.no_grad():
        full, keep = metric(x), ~torch.eye(len(x), dtype=torch.bool, device=x.device)
        return torch.stack([full - metric(x[keep[i]]) for i in range(len(x))])
