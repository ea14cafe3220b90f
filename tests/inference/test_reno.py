"""ReNO: best iterates, the chi regulariser, per-prompt clipping and batching, stopping, named errors."""

import math

import pytest
import torch

from mmalign.inference import chi_regularizer, optimize_noise
from mmalign.models.stable_diffusion import StableDiffusionAdapter
from mmalign.rewards import Reward, RewardOutput
from mmalign.rewards.ensemble import Ensemble

PROMPTS = ["a red circle", "two blue squares", "a green box at the bottom"]


class Brightness(Reward):
    """Mean pixel value: differentiable, per sample."""

    name = "brightness"
    differentiable = True

    def forward(self, batch):
        return RewardOutput(batch.pixels.flatten(1).mean(1))


class Redness(Reward):
    """Red minus the other channels, a second reward with its own scale."""

    name = "redness"
    differentiable = True

    def forward(self, batch):
        p = batch.pixels
        return RewardOutput((p[:, 0] - p[:, 1:].mean(1)).flatten(1).mean(1))


class NaNForPrompt(Brightness):
    """Brightness, NaN for one prompt from the second call on."""

    def __init__(self, prompt: str) -> None:
        super().__init__()
        self.prompt, self.calls = prompt, 0

    def forward(self, batch):
        self.calls += 1
        scores = super().forward(batch).scores
        bad = torch.tensor([p == self.prompt and self.calls > 1 for p in batch.prompts])
        return RewardOutput(torch.where(bad, math.nan, scores))


@pytest.fixture(scope="module")
def adapter():
    from tiny_models import make_tiny_sd_pipeline

    return StableDiffusionAdapter(make_tiny_sd_pipeline(seed=0), guidance_scale=2.0)


def _run(adapter, prompts=PROMPTS, reward=None, **kwargs):
    settings = {"num_steps": 2, "iterations": 6, "lr": 20.0, "grad_clip": 0.5, "seeds": range(len(prompts))}
    return optimize_noise(adapter, prompts, reward or Brightness(), **{**settings, **kwargs})


def test_regularizer_is_the_negative_chi_log_density():
    """Against torch's chi-squared density of ‖z‖² with the Jacobian of r ↦ r²: equal up to one constant."""
    z = torch.randn(5, 4, 6, 6) * torch.linspace(0.5, 2, 5).view(-1, 1, 1, 1)
    d = z[0].numel()
    norm = z.flatten(1).norm(dim=1).double()
    log_density = torch.distributions.Chi2(d).log_prob(norm**2) + torch.log(2 * norm)
    difference = chi_regularizer(z).double() + log_density
    torch.testing.assert_close(difference, difference[:1].expand(5), rtol=0, atol=1e-3)
    assert chi_regularizer(z).dtype == torch.float32 and chi_regularizer(z.half()).isfinite().all()


def test_best_iterate_is_never_below_the_initial_and_the_reward_rises(adapter):
    result = _run(adapter, iterations=8)
    assert result.iterations == 8 and result.trace["reward"].shape == (8, len(PROMPTS))
    assert (result.best_scores >= result.initial_scores).all()
    torch.testing.assert_close(result.initial_scores, result.trace["reward"][0])
    torch.testing.assert_close(result.best_scores, result.trace["reward"].max(0).values)
    assert (result.best_scores > result.initial_scores + 1e-3).all()
    assert (result.best_iteration > 0).all() and result.stopped == [None] * len(PROMPTS)
    again = optimize_noise(adapter, PROMPTS, Brightness(), noise=result.best_noise, num_steps=2, iterations=1)
    torch.testing.assert_close(again.initial_scores, result.best_scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again.initial_pixels, result.best_pixels, rtol=1e-4, atol=1e-5)


class Brighter(Brightness):
    """100 × brightness: gradients large enough to push the noise off its shell."""

    def forward(self, batch):
        return RewardOutput(100 * super().forward(batch).scores)


def test_regularizer_keeps_the_norm_on_the_shell(adapter):
    """A strong reward without the prior drives ‖z‖ far from √d; with it, every iterate stays near the shell."""

    def norms(regularization):
        result = _run(adapter, reward=Brighter(), iterations=12, lr=2.0, grad_clip=1.0, regularization=regularization)
        assert (result.best_scores > result.initial_scores + 1).all()
        return result.trace["noise_norm"]

    free, held = norms(0.0), norms(0.1)
    torch.testing.assert_close(free[0], held[0])
    assert (free[-1] > 1.4).all()
    assert ((held - 1).abs() < 0.12).all()


def test_batching_gives_each_prompt_its_own_run(adapter):
    """The same seeds alone and together: same trace, same best iterate."""
    together = _run(adapter, seeds=[3, 4, 5])
    for i, prompt in enumerate(PROMPTS):
        alone = _run(adapter, prompts=[prompt], seeds=[3 + i])
        torch.testing.assert_close(alone.trace["reward"][:, 0], together.trace["reward"][:, i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone.best_noise[0], together.best_noise[i], rtol=1e-4, atol=1e-4)
        assert int(alone.best_iteration[0]) == int(together.best_iteration[i])


class ScaledByPrompt(Brightness):
    """Brightness × 1, 10, 100 for the three prompts: gradients two orders of magnitude apart."""

    def forward(self, batch):
        scale = torch.tensor([10.0 ** PROMPTS.index(p) for p in batch.prompts])
        return RewardOutput(scale * super().forward(batch).scores)


def test_gradient_clipping_acts_per_prompt(adapter):
    """Each prompt's gradient exceeds the clip, so its first step moves its noise by exactly lr·(1 + μ)·clip
    (Nesterov's first step), whatever the size of its own gradient; a step that small raises the reward, so
    the best iterate is the updated noise."""
    lr, clip, mu = 3.0, 1e-3, 0.9
    result = _run(adapter, reward=ScaledByPrompt(), iterations=2, lr=lr, grad_clip=clip, momentum=mu, regularization=0.0)
    norms = result.trace["grad_norm"][0]
    assert (norms > 2 * clip).all() and norms.max() > 50 * norms.min()
    assert (result.best_iteration == 1).all()
    step = (result.best_noise - result.initial_noise).flatten(1).norm(dim=1)
    torch.testing.assert_close(step, torch.full((3,), lr * (1 + mu) * clip), rtol=1e-3, atol=0)


def test_non_finite_reward_stops_that_prompt_only(adapter):
    result = _run(adapter, reward=NaNForPrompt(PROMPTS[1]))
    assert result.stopped[0] is None and result.stopped[2] is None
    assert "non-finite reward" in result.stopped[1]
    assert int(result.best_iteration[1]) == 0
    torch.testing.assert_close(result.best_noise[1], result.initial_noise[1])
    assert (result.best_scores[[0, 2]] > result.initial_scores[[0, 2]]).all()


def test_callback_stops_early_and_sees_each_iteration(adapter):
    seen = []

    def stop_after_three(state):
        seen.append((state.iteration, state.pixels.shape, bool(state.active.all())))
        return state.iteration == 2

    result = _run(adapter, callback=stop_after_three)
    assert result.iterations == 3 and [s[0] for s in seen] == [0, 1, 2]
    assert seen[0][1] == (len(PROMPTS), 3, 16, 16) and all(s[2] for s in seen)


def test_several_rewards_with_weights_and_their_components(adapter):
    from mmalign.rewards import register

    register("brightness", Brightness)
    register("redness", Redness)
    reward = [{"name": "brightness", "weight": 1.0}, {"name": "redness", "weight": 2.0}]
    result = _run(adapter, reward=reward, iterations=3)
    trace = result.trace
    torch.testing.assert_close(trace["reward"], trace["brightness"] + 2 * trace["redness"])


def test_ensembles_need_held_statistics(adapter):
    ensemble = Ensemble([Brightness(), Redness()], mode="uwo")
    with pytest.raises(ValueError, match="hold_statistics"):
        _run(adapter, reward=ensemble)
    from mmalign.media import MediaBatch

    ensemble(MediaBatch(torch.rand(8, 3, 16, 16), ["x"] * 8))  # calibrate, then hold
    before = ensemble.running_mean.clone()
    result = _run(adapter, reward=ensemble.hold_statistics(), iterations=3)
    assert torch.equal(ensemble.running_mean, before) and result.iterations == 3


class Frozen(Brightness):
    differentiable = False


class GroupScope(Brightness):
    scope = "group"


@pytest.mark.parametrize("kwargs, match", [
    ({"reward": Frozen()}, "no gradients in the pixels"),
    ({"reward": GroupScope()}, "per-sample reward"),
    ({"iterations": 0}, "iterations: expected an int ≥ 1"),
    ({"seeds": [1, 2]}, "seeds: expected one per prompt"),
    ({"noise": torch.zeros(2, 4, 8, 8)}, "noise: expected shape"),
    ({"lr": -1.0}, "lr: expected"),
    ({"momentum": 1.0}, "momentum: expected"),
    ({"grad_clip": 0}, "grad_clip: expected"),
    ({"prompts": []}, "prompts: expected a non-empty list"),
])
def test_bad_inputs_are_named(adapter, kwargs, match):
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", PROMPTS)
    reward = kwargs.pop("reward", Brightness())
    if "noise" in kwargs:
        kwargs["seeds"] = None
    with pytest.raises(ValueError, match=match):
        optimize_noise(adapter, prompts, reward, num_steps=2, **{"seeds": range(len(prompts)), **kwargs})


@pytest.mark.parametrize("timestep_spacing, steps", [("leading", 2), ("trailing", 1)])
def test_the_sampler_is_diffusers_deterministic_ddim(timestep_spacing, steps):
    """The initial images are what the diffusers pipeline draws from the same latents with DDIM at η = 0,
    also in one step from t = T (trailing spacing, as the turbo models sample)."""
    from diffusers import DDIMScheduler
    from tiny_models import make_tiny_sd_pipeline

    pipe = make_tiny_sd_pipeline(seed=0)
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "timestep_spacing": timestep_spacing})
    result = optimize_noise(pipe, PROMPTS[:2], Brightness(), seeds=[5, 6], num_steps=steps, iterations=1,
                            guidance_scale=2.0)
    expected = pipe(PROMPTS[:2], num_inference_steps=steps, guidance_scale=2.0, eta=0.0, latents=result.initial_noise,
                    output_type="pt").images
    torch.testing.assert_close(result.initial_pixels, expected.float(), rtol=1e-4, atol=1e-4)


def test_video_noise_is_optimised_per_clip():
    """ReNO on the world's video generator: noise and pixels keep their frame axis, the best iterate is never
    below the first, and each clip's run is its own (the same seed alone gives the same best noise)."""
    from mmalign.models.pipelines import adapter_for, load_pipeline

    video = adapter_for(load_pipeline("world-video"), 1.0, num_frames=3)
    prompts = ["a red circle moving left", "two blue squares moving up"]
    together = _run(video, prompts, num_steps=2, iterations=4, lr=5.0, grad_clip=0.1)
    assert together.best_noise.shape == (2, *video.latent_shape) and video.latent_shape[1] == 3
    assert together.best_pixels.shape == (2, 3, 3, 32, 32)
    assert (together.best_scores >= together.initial_scores).all()
    assert (together.trace["reward"][-1] != together.trace["reward"][0]).all()  # the noise moved
    alone = _run(video, prompts[1:], seeds=[1], num_steps=2, iterations=4, lr=5.0, grad_clip=0.1)
    torch.testing.assert_close(alone.best_noise[0], together.best_noise[1], rtol=1e-4, atol=1e-4)
