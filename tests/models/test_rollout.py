"""Sampling with gradients: values against the no-grad sampler, gradients against finite differences."""

import pytest
import torch

from mmalign.models.ddim import DDIMPolicy
from mmalign.models.rollout import sample_trajectories, sample_with_grad
from mmalign.models.stable_diffusion import StableDiffusionAdapter

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def setup():
    from tiny_models import make_tiny_sd_pipeline

    pipe = make_tiny_sd_pipeline(seed=0).to(torch.float64)
    adapter = StableDiffusionAdapter(pipe, guidance_scale=2.0)
    return adapter, DDIMPolicy(pipe.scheduler.config, num_steps=3, eta=1.0)


def _noise(adapter, dtype=torch.float64):
    return torch.randn((len(PROMPTS), *adapter.latent_shape), generator=torch.Generator().manual_seed(3), dtype=dtype)


def test_same_sample_as_the_no_grad_sampler(setup):
    adapter, policy = setup
    expected = sample_trajectories(adapter, policy, PROMPTS, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((len(PROMPTS), *adapter.latent_shape), generator=generator)
    out = sample_with_grad(adapter, policy, PROMPTS, noise, generator, grad_steps=1)
    torch.testing.assert_close(out.latents.float(), expected.latents[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pixels.float(), expected.pixels, rtol=1e-5, atol=1e-5)


def _loss(adapter, policy, noise, **kwargs):
    out = sample_with_grad(adapter, policy, PROMPTS, noise, torch.Generator().manual_seed(1), **kwargs)
    weights = torch.linspace(-1, 1, out.pixels.numel(), dtype=out.pixels.dtype).view_as(out.pixels)
    return (out.pixels * weights).sum()


def test_gradient_in_the_initial_noise_matches_finite_differences(setup):
    """All steps kept: d loss / d noise along a random direction, against a central difference (fp64)."""
    adapter, policy = setup
    noise = _noise(adapter).requires_grad_()
    (grad,) = torch.autograd.grad(_loss(adapter, policy, noise), noise)
    direction = torch.randn_like(noise)
    h = 1e-5
    with torch.no_grad():
        numeric = (_loss(adapter, policy, noise + h * direction) - _loss(adapter, policy, noise - h * direction)) / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("grad_steps", [1, 2])
def test_truncated_gradient_in_the_weights_matches_finite_differences(setup, grad_steps):
    """DRaFT-K: the gradient of a UNet weight through the last K steps equals the finite difference of the loss
    computed with the earlier steps' weights held fixed (they are outside the graph)."""
    adapter, policy = setup
    unet = adapter.denoiser
    weight = unet.conv_out.weight
    noise = _noise(adapter)
    unet.zero_grad(set_to_none=True)
    _loss(adapter, policy, noise, grad_steps=grad_steps).backward()
    analytic = weight.grad.clone()
    unet.zero_grad(set_to_none=True)

    direction = torch.randn_like(weight)
    first = policy.num_steps - grad_steps
    h = 1e-5

    def perturbed_loss(sign):  # the first steps with the weight as it was, the kept ones perturbed
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            x = noise
            embeds = adapter.encode_prompts(PROMPTS)
            for index, t in enumerate(policy.timesteps):
                if index == first:
                    weight.add_(sign * h * direction)
                x = policy.step(adapter.model_output(unet, x, t, embeds), x, index, generator=generator).prev_sample
            weight.sub_(sign * h * direction)
            pixels = adapter.decode(x)
        weights = torch.linspace(-1, 1, pixels.numel(), dtype=pixels.dtype).view_as(pixels)
        return (pixels * weights).sum()

    numeric = (perturbed_loss(1) - perturbed_loss(-1)) / (2 * h)
    torch.testing.assert_close((analytic * direction).sum(), numeric, rtol=1e-5, atol=1e-8)


def test_per_sample_truncation_cuts_each_samples_own_chain(setup):
    """AlignProp: a (B,) grad_steps gives each sample its own K; with K < num_steps the initial noise of that
    sample gets no gradient, with K = num_steps it does."""
    adapter, policy = setup
    noise = _noise(adapter).requires_grad_()
    _loss(adapter, policy, noise, grad_steps=torch.tensor([policy.num_steps, 1])).backward()
    assert noise.grad[0].abs().sum() > 0 and noise.grad[1].abs().sum() == 0


def test_gradient_checkpointing_gives_the_same_gradients(setup):
    adapter, policy = setup
    weight = adapter.denoiser.conv_out.weight
    grads = []
    for flag in (False, True):
        adapter.denoiser.zero_grad(set_to_none=True)
        _loss(adapter, policy, _noise(adapter), grad_steps=2, gradient_checkpointing=flag,
              decoder_checkpointing=flag).backward()
        grads.append(weight.grad.clone())
    adapter.denoiser.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_invalid_arguments(setup):
    adapter, policy = setup
    with pytest.raises(ValueError, match="grad_steps"):
        sample_with_grad(adapter, policy, PROMPTS, _noise(adapter), grad_steps=4)
    with pytest.raises(ValueError, match="noise: expected shape"):
        sample_with_grad(adapter, policy, PROMPTS, _noise(adapter)[:1])
