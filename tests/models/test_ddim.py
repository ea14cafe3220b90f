import math

import pytest
import torch
from diffusers import DDIMScheduler

from mmalign.models.ddim import DDIMPolicy, gaussian_log_prob

CONFIG = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                       steps_offset=1, clip_sample=False).config


def test_log_prob_is_the_gaussian_density():
    x, mean = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    expected = torch.distributions.Normal(mean.double(), 0.3).log_prob(x.double()).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.3), expected)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_mean_matches_diffusers_ddim(prediction_type):
    """With the same noise, our step lands where diffusers' DDIMScheduler.step does."""
    config = {**CONFIG, "prediction_type": prediction_type}
    policy = DDIMPolicy(config, num_steps=10, eta=1.0)
    reference = DDIMScheduler.from_config(config)
    reference.set_timesteps(10)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for index in (0, 4, 9):
        t = policy.timesteps[index]
        noise = torch.randn(2, 4, 8, 8)
        expected = reference.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
        ours = policy.step(out, x, index, prev_sample=None, generator=None)
        ours_with_noise = ours.mean + ours.std * noise
        torch.testing.assert_close(ours_with_noise, expected, atol=1e-5, rtol=1e-5)


def test_rescoring_reproduces_the_sampled_log_prob_and_std_formula():
    policy = DDIMPolicy(CONFIG, num_steps=5, eta=0.7)
    x, out = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    sampled = policy.step(out, x, 2, generator=torch.Generator().manual_seed(0))
    rescored = policy.step(out, x, 2, prev_sample=sampled.prev_sample)
    assert torch.equal(sampled.log_prob, rescored.log_prob)
    a, a_prev = policy._alpha[2], policy._alpha_prev[2]
    assert sampled.std == pytest.approx(0.7 * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)))


@pytest.mark.parametrize("timestep_spacing, steps", [("leading", 4), ("trailing", 1)])
def test_deterministic_steps_match_diffusers_ddim(timestep_spacing, steps):
    """η = 0 (also one step from t = 999, as one-step generators sample): diffusers' DDIM step, no noise drawn,
    no log-prob (NaN), and a final ᾱ_prev of 1 allowed."""
    config = {**CONFIG, "timestep_spacing": timestep_spacing, "set_alpha_to_one": True}
    policy = DDIMPolicy(config, num_steps=steps, eta=0.0)
    reference = DDIMScheduler.from_config(config)
    reference.set_timesteps(steps)
    assert not policy.stochastic and torch.equal(policy.timesteps, reference.timesteps)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    generator = torch.Generator().manual_seed(0)
    for index, t in enumerate(policy.timesteps):
        step = policy.step(out, x, index, generator=generator)
        torch.testing.assert_close(step.prev_sample, reference.step(out, t, x, eta=0.0).prev_sample)
        assert step.log_prob.isnan().all()
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_invalid_settings():
    with pytest.raises(ValueError, match="eta: expected η ≥ 0"):
        DDIMPolicy(CONFIG, 5, eta=-0.1)
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        DDIMPolicy({**CONFIG, "set_alpha_to_one": True}, 5)
    with pytest.raises(ValueError, match="num_steps"):
        DDIMPolicy(CONFIG, 0)
