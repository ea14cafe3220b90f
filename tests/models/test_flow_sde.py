"""The flow-matching SDE policy against diffusers' scheduler and independent computations."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmalign.models.flow_sde import FlowSDEPolicy, dynamic_shift_mu

SD3 = FlowMatchEulerDiscreteScheduler(shift=3.0).config
FLUX = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                       base_image_seq_len=256, max_image_seq_len=4096).config
SHAPE = (2, 4, 6, 6)


def _tensors(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=dtype), torch.randn(SHAPE, generator=g, dtype=dtype)


def test_sigmas_and_timesteps_are_the_schedulers():
    policy = FlowSDEPolicy(SD3, 5)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    scheduler.set_timesteps(5)
    assert torch.equal(policy.timesteps, scheduler.timesteps) and torch.equal(policy.sigmas, scheduler.sigmas)
    assert policy.sigmas[0] == 1 and policy.sigmas[-1] == 0
    mu = dynamic_shift_mu(FLUX, 64)
    sigmas = np.linspace(1.0, 1 / 4, 4)
    flux = FlowSDEPolicy(FLUX, 4, mu=mu, sigmas=sigmas)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    assert torch.equal(flux.timesteps, scheduler.timesteps) and torch.equal(flux.sigmas, scheduler.sigmas)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) * (64 - 256) / (4096 - 256))


def test_the_ode_limit_is_the_schedulers_euler_step_exactly():
    policy = FlowSDEPolicy(SD3, 4, noise_level=0.0)
    assert not policy.stochastic and policy.stds == [0.0] * 4
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    scheduler.set_timesteps(4)
    x, _ = _tensors()
    ours = x.clone()
    for index, t in enumerate(scheduler.timesteps):
        v = torch.sin(3 * x + index)  # any velocity field
        x = scheduler.step(v, t, x).prev_sample
        out = policy.step(torch.sin(3 * ours + index), ours, index)
        ours = out.prev_sample
        assert torch.equal(ours, x), index
        assert torch.isnan(out.log_prob).all()


def test_step_mean_std_and_log_prob_against_the_formula_and_torch_normal():
    policy = FlowSDEPolicy(SD3, 5, noise_level=0.7)
    x, v = _tensors(dtype=torch.float64)
    for index in range(5):
        sigma, following = float(policy.sigmas[index]), float(policy.sigmas[index + 1])
        dt = following - sigma
        s = 0.7 * math.sqrt(sigma / (1 - (following if index == 0 else sigma)))
        mean = x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
        out = policy.step(v, x, index, generator=torch.Generator().manual_seed(index))
        torch.testing.assert_close(out.mean, mean, rtol=1e-6, atol=1e-6)  # dt from fp32 sigmas
        assert out.std == pytest.approx(s * math.sqrt(-dt), rel=1e-12)
        normal = torch.distributions.Normal(out.mean, out.std)
        expected = normal.log_prob(out.prev_sample).flatten(1).sum(1)
        torch.testing.assert_close(out.log_prob, expected, rtol=1e-12, atol=1e-9)
        assert out.log_prob.dtype == torch.float64


def test_the_first_step_uses_the_next_sigma_and_the_last_step_has_a_density():
    policy = FlowSDEPolicy(SD3, 3, noise_level=0.5)
    s1 = float(policy.sigmas[1])
    assert policy.stds[0] == pytest.approx(0.5 * math.sqrt(1 / (1 - s1)) * math.sqrt(1 - s1))
    last = float(policy.sigmas[-2])
    assert policy.sigmas[-1] == 0 and policy.stds[-1] == pytest.approx(0.5 * last / math.sqrt(1 - last))
    assert min(policy.stds) > 0


def test_rescoring_reproduces_the_sampled_log_prob_and_samples_are_seeded():
    policy = FlowSDEPolicy(SD3, 4)
    x, v = _tensors()
    out = policy.step(v, x, 1, generator=torch.Generator().manual_seed(5))
    again = policy.step(v, x, 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out.prev_sample, again.prev_sample)
    rescored = policy.step(v, x, 1, prev_sample=out.prev_sample)
    assert torch.equal(rescored.log_prob, out.log_prob)
    z = (out.prev_sample - out.mean) / out.std  # the step's noise is standard normal
    assert abs(float(z.mean())) < 0.25 and abs(float(z.std()) - 1) < 0.25


def test_means_in_fp32_for_half_precision_model_outputs():
    policy = FlowSDEPolicy(SD3, 4)
    x, v = _tensors()
    out = policy.step(v.bfloat16(), x.bfloat16(), 2, generator=torch.Generator().manual_seed(0))
    assert out.mean.dtype == torch.float32 and out.prev_sample.dtype == torch.float32


def test_predictions_are_the_ends_of_the_straight_path():
    policy = FlowSDEPolicy(SD3, 4)
    x0, eps = _tensors(dtype=torch.float64)
    sigma = float(policy.sigmas[2])
    x_t = (1 - sigma) * x0 + sigma * eps
    x0_hat, eps_hat = policy.predictions(eps - x0, x_t, 2)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="noise_level"):
        FlowSDEPolicy(SD3, 4, noise_level=-1)
    with pytest.raises(ValueError, match="num_steps"):
        FlowSDEPolicy(SD3, 0)
    with pytest.raises(ValueError, match="mu"):
        FlowSDEPolicy(FLUX, 4)
    with pytest.raises(ValueError, match="invert_sigmas"):
        FlowSDEPolicy(FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config, 4)
