import copy
import itertools

import pytest
import torch

from mmalign.models.ddim import DDIMPolicy
from mmalign.models.rollout import (
    backward_weighted_log_probs,
    sample_trajectories,
    step_log_probs,
    trajectory_log_probs,
)
from mmalign.models.stable_diffusion import StableDiffusionAdapter
from mmalign.trainers.prdp_loss import pair_indices, rdp_coefficients, rdp_loss


def test_pairs_stay_within_groups_and_skip_invalid():
    groups = torch.tensor([0, 0, 1, 1, 1, 0])
    i, j = pair_indices(groups, valid=torch.tensor([True, True, True, True, False, True]))
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 5), (1, 5), (2, 3)]


def test_loss_by_hand():
    """Two samples, two steps: the formula written out."""
    s = torch.tensor([[0.3, 0.2], [0.0, -0.1]], dtype=torch.float64)
    s_old = torch.zeros(2, 2, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0])
    beta, eps = 2.0, 0.15
    loss, clipped = rdp_loss(s, s_old, rewards, pair_indices(torch.tensor([0, 0])), beta, eps)
    plain = ((0.5 - (-0.1)) - 1.0 / beta) ** 2  # (0.6 - 0.5)^2 = 0.01
    proximal = ((0.15 + 0.15) - (0.0 - 0.1) - 0.5) ** 2  # (0.4 - 0.5)^2 = 0.01
    assert float(loss) == pytest.approx(max(plain, proximal))
    s2 = torch.tensor([[0.3, 0.3], [0.0, 0.0]], dtype=torch.float64)
    loss2, clipped2 = rdp_loss(s2, s_old, rewards, pair_indices(torch.tensor([0, 0])), beta, eps)
    assert float(loss2) == pytest.approx(max((0.6 - 0.5) ** 2, (0.3 - 0.5) ** 2)) and float(clipped2) == 1.0


def test_coefficients_match_autograd_of_the_loss_for_many_pairs():
    torch.manual_seed(0)
    s, s_old = torch.randn(6, 4, dtype=torch.float64) * 0.1, torch.randn(6, 4, dtype=torch.float64) * 0.1
    rewards, groups = torch.randn(6), torch.tensor([0, 0, 0, 1, 1, 1])
    pairs = pair_indices(groups)
    terms = rdp_coefficients(s, s_old, rewards, pairs, 0.5, 0.05)
    leaf = s.clone().requires_grad_()
    manual = 0
    for a, b in itertools.combinations(range(6), 2):
        if groups[a] != groups[b]:
            continue
        c = (rewards[a] - rewards[b]).double() / 0.5
        clip = lambda x: torch.minimum(torch.maximum(x, s_old - 0.05), s_old + 0.05)  # noqa: E731
        plain = (leaf[a].sum() - leaf[b].sum() - c) ** 2
        prox = (clip(leaf)[a].sum() - clip(leaf)[b].sum() - c) ** 2
        manual = manual + torch.maximum(plain, prox)
    (manual / 6).backward()
    assert terms.num_pairs == 6 and terms.loss == pytest.approx((manual / 6).item())
    torch.testing.assert_close(terms.coef, leaf.grad)


@pytest.fixture(scope="module")
def tiny(tiny_sd_factory):
    pipe = tiny_sd_factory()
    adapter = StableDiffusionAdapter(pipe, guidance_scale=3.0)
    policy = DDIMPolicy(pipe.scheduler.config, num_steps=4, eta=1.0)
    prompts = ["a red circle"] * 3 + ["a blue square"] * 3
    meta = [{"group": i // 3} for i in range(6)]
    traj = sample_trajectories(adapter, policy, prompts, meta, torch.Generator().manual_seed(0))
    return pipe, adapter, policy, traj


def test_rescoring_reproduces_stored_log_probs_and_ratio_is_one(tiny):
    pipe, adapter, policy, traj = tiny
    assert traj.latents.shape == (6, 5, 4, 8, 8) and traj.log_probs.dtype == torch.float64
    assert torch.equal(trajectory_log_probs(adapter, policy, pipe.unet, traj), traj.log_probs)
    again = sample_trajectories(adapter, policy, traj.prompts, traj.metadata, torch.Generator().manual_seed(0))
    assert torch.equal(again.latents, traj.latents)
    assert traj.pixels.shape == (6, 3, 16, 16) and traj.pixels.min() >= 0 and traj.pixels.max() <= 1
    sub = traj.select([4, 1])
    assert sub.prompts == ["a blue square", "a red circle"] and torch.equal(sub.log_probs, traj.log_probs[[4, 1]])


def test_memory_light_gradient_equals_whole_graph_gradient(tiny):
    pipe, adapter, policy, traj = tiny
    ref = pipe.unet
    theta = copy.deepcopy(ref)
    with torch.no_grad():
        for p in theta.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref_lp = trajectory_log_probs(adapter, policy, ref, traj)
    s_old = traj.log_probs - ref_lp
    rewards = torch.tensor([1.0, 0.2, -0.3, 0.5, 0.9, -1.0])
    pairs = pair_indices(traj.groups)
    beta, eps = 0.5, 0.5

    # whole graph: every step's log-prob with grad, the loss on top
    s_full = torch.stack([step_log_probs(adapter, policy, theta, traj, t) for t in range(4)], 1) - ref_lp
    loss, _ = rdp_loss(s_full, s_old, rewards, pairs, beta, eps)
    loss.backward()
    naive = [p.grad.clone() for p in theta.parameters()]
    theta.zero_grad()

    # memory-light: coefficients from s without grad, then one timestep at a time
    s = trajectory_log_probs(adapter, policy, theta, traj) - ref_lp
    terms = rdp_coefficients(s, s_old, rewards, pairs, beta, eps)
    assert terms.loss == pytest.approx(float(loss.detach()), rel=1e-9)
    backward_weighted_log_probs(adapter, policy, theta, traj, terms.coef)
    for g_naive, p in zip(naive, theta.parameters()):
        # fp32 UNet passes summed in another order: agreement to float32 accumulation error
        torch.testing.assert_close(p.grad, g_naive, rtol=1e-3, atol=1e-6 * float(g_naive.abs().max()) + 1e-9)


def test_groups_share_their_initial_noise_only(tiny):
    _, adapter, policy, traj = tiny
    shared = sample_trajectories(adapter, policy, traj.prompts, traj.metadata, torch.Generator().manual_seed(0),
                                 group_size=3)
    start = shared.latents[:, 0]
    assert torch.equal(start[0], start[2]) and torch.equal(start[3], start[5]) and not torch.equal(start[0], start[3])
    assert not torch.equal(shared.latents[0, 1], shared.latents[1, 1])  # each sample draws its own step noise
    assert torch.equal(trajectory_log_probs(adapter, policy, adapter.denoiser, shared), shared.log_probs)
    with pytest.raises(ValueError, match="group_size"):
        sample_trajectories(adapter, policy, traj.prompts, None, None, group_size=4)
