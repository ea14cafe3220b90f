"""The PRDP objective (Deng et al., CVPR 2024) on per-step implicit rewards, and its memory-light gradient.

With ``s_t = log π_θ(x_{t−1}|x_t, c) − log π_ref(x_{t−1}|x_t, c)`` the implicit reward of a trajectory is
``r̂ = Σ_t s_t``. For two samples a, b of one prompt the reward-difference-prediction loss is
``l = ([r̂(a) − r̂(b)] − [r(a) − r(b)]/β)²``; the proximal version clips each step,
``s_t^clip = clip(s_t, s_t^old − ε, s_t^old + ε)``, and PRDP minimises ``max(l, l^clip)`` averaged over all
C(B, 2) pairs of each prompt's B samples.

The loss depends on the network only through the ``(B, T)`` matrix ``s``. So the gradient is taken in two
stages: ``coefficients`` differentiates the scalar loss with respect to ``s`` (cheap: B·T numbers, any number of
pairs), and the trainer back-propagates ``Σ coef_bt · log π_θ(step b, t)`` one timestep at a time, holding one
UNet graph in memory. The cost of an epoch is linear in B; the C(B, 2) pairs only touch scalars.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RDPTerms", "pair_indices", "rdp_loss", "rdp_coefficients"]


def pair_indices(groups: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(i, j)``, ``i < j``, of every pair of valid samples that share a group."""
    groups = groups.cpu()
    valid = torch.ones_like(groups, dtype=torch.bool) if valid is None else valid.cpu()
    same = (groups[:, None] == groups[None, :]) & valid[:, None] & valid[None, :]
    i, j = torch.triu_indices(len(groups), len(groups), offset=1)
    keep = same[i, j]
    return i[keep], j[keep]


def rdp_loss(
    s: torch.Tensor,
    s_old: torch.Tensor,
    rewards: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
    beta: float,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``max(l, l^clip)`` over ``pairs``, and the fraction of pairs where the clipped term is larger.

    Args:
        s: ``(B, T)`` implicit per-step rewards under the current weights.
        s_old: ``(B, T)`` the same under the weights that sampled the trajectories.
        rewards: ``(B,)`` finite rewards (samples with non-finite rewards are left out of ``pairs``).
    """
    i, j = (p.to(s.device) for p in pairs)
    target = (rewards[i] - rewards[j]).to(s.dtype) / beta
    clipped = torch.minimum(torch.maximum(s, s_old - clip_range), s_old + clip_range)
    total, total_clipped = s.sum(1), clipped.sum(1)
    plain = (total[i] - total[j] - target).pow(2)
    proximal = (total_clipped[i] - total_clipped[j] - target).pow(2)
    return torch.maximum(plain, proximal).mean(), (proximal > plain).double().mean()


@dataclass
class RDPTerms:
    loss: float
    coef: torch.Tensor  # (B, T): d loss / d s
    clip_fraction: float
    num_pairs: int


def rdp_coefficients(
    s: torch.Tensor,
    s_old: torch.Tensor,
    rewards: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor],
    beta: float,
    clip_range: float,
) -> RDPTerms:
    """The loss and ``d loss / d s`` for given ``s`` (no network involved), by autograd on the scalar loss."""
    if len(pairs[0]) == 0:
        return RDPTerms(0.0, torch.zeros_like(s), 0.0, 0)
    leaf = s.detach().double().requires_grad_()
    with torch.enable_grad():
        loss, clip_fraction = rdp_loss(leaf, s_old.double(), rewards.double(), pairs, beta, clip_range)
        (coef,) = torch.autograd.grad(loss, leaf)
    loss = loss.detach()
    return RDPTerms(loss.item(), coef, clip_fraction.item(), len(pairs[0]))
