"""Direct reward back-propagation: the loss's gradient against finite differences, truncation, the
ground-truth-noise prior, refusal of black-box rewards, a run that raises its reward (resume: test_kill_resume.py)."""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from brightness import brightness_run  # noqa: E402
from diffusion_run import config  # noqa: E402

from mmalign.media import MediaBatch  # noqa: E402
from mmalign.models.rollout import denoise_in_one_step  # noqa: E402
from mmalign.models.stable_diffusion import StableDiffusionAdapter  # noqa: E402
from mmalign.rewards import Reward, RewardOutput, register  # noqa: E402
from mmalign.trainers.backprop import BackpropConfig, BackpropTrainer  # noqa: E402
from mmalign.trainers.lora import trainable_state  # noqa: E402


class WeightedPixels(Reward):
    """A fixed linear functional of the pixels, per sample: exact in fp64."""

    name = "weighted_pixels"
    differentiable = True

    def forward(self, batch):
        pixels = batch.pixels.flatten(1)
        weights = torch.linspace(-1, 1, pixels.shape[1], dtype=pixels.dtype)
        return RewardOutput((pixels * weights).sum(1))


def _fp64_trainer(tmp_path, tiny_sd_factory, **overrides):
    register("weighted_pixels", WeightedPixels)
    base = config(str(tmp_path / "run"), 1, "backprop").model_dump()
    cfg = BackpropConfig.model_validate({**base, "reward": ["weighted_pixels"], "lora": None, "report": None,
                                         "prompts_per_epoch": 2, "samples_per_prompt": 2, "prompts_per_update": 2,
                                         **overrides})
    trainer = BackpropTrainer(cfg, pipeline=tiny_sd_factory(seed=0).to(torch.float64), progress=False)
    trainer.setup()
    return trainer


@pytest.mark.parametrize(("method", "reference_weight"), [("draft", 0.0), ("direct_align", 0.5)])
def test_loss_gradient_matches_finite_differences(tmp_path, tiny_sd_factory, method, reference_weight):
    """The trainer's loss differentiated into a UNet weight, against a central difference in fp64; every step
    keeps its graph, so the loss is a plain function of the weight. The reference penalty's target is the
    reference's output at the visited input, held fixed: exact for Direct-Align, whose input x_t does not
    depend on the weights (through a chain, the target moves with the visited states)."""
    trainer = _fp64_trainer(tmp_path, tiny_sd_factory, method=method, grad_steps=3, reference_weight=reference_weight)
    with torch.no_grad():  # move off the reference, so the penalty has a gradient too
        trainer.loop.raw_denoiser.conv_out.bias.add_(0.05)
    part = trainer.loop.rollout(0)
    weight = trainer.loop.raw_denoiser.conv_out.weight

    def loss() -> torch.Tensor:
        pixels, penalty = trainer.differentiable_sample(part, torch.Generator().manual_seed(7))
        scores = trainer.loop.reward(MediaBatch(pixels, part.prompts, part.metadata)).scores
        return -scores.mean() + trainer.config.reference_weight * penalty

    (grad,) = torch.autograd.grad(loss(), weight)
    direction = torch.randn_like(weight)
    h = 1e-4  # the chain carries ~1e-8 of rounding (fp32 time embeddings): smaller steps measure that instead
    with torch.no_grad():
        weight.add_(h * direction)
        up = loss()
        weight.sub_(2 * h * direction)
        down = loss()
        weight.add_(h * direction)
    torch.testing.assert_close((grad * direction).sum(), (up - down) / (2 * h), rtol=1e-4, atol=1e-9)
    trainer.cleanup()


def test_truncation_leaves_earlier_steps_without_gradient(tmp_path, tiny_sd_factory):
    """DRaFT-1 re-runs only the last step from the stored latent: the stored chain before it gets no gradient,
    and only the last step's UNet call reaches the weights (its gradient equals a one-step re-run's)."""
    trainer = _fp64_trainer(tmp_path, tiny_sd_factory, method="draft", grad_steps=1)
    part = trainer.loop.rollout(0)
    part.latents.requires_grad_()
    pixels, _ = trainer.differentiable_sample(part, torch.Generator().manual_seed(7))
    pixels.sum().backward()
    assert part.latents.grad[:, :-2].abs().sum() == 0  # steps before the kept one: outside the graph
    assert part.latents.grad[:, -2].abs().sum() > 0  # the kept step's input
    trainer.cleanup()


def test_ground_truth_noise_prior_recovers_x0_from_the_true_noise(tiny_sd_factory):
    """x_t is diffusers' ``add_noise``, and a model that predicts the noise exactly gives x̂0 = x0."""
    pipe = tiny_sd_factory(seed=0).to(torch.float64)
    x0 = torch.randn(3, *StableDiffusionAdapter(pipe).latent_shape, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 500, 900])

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, x, timestep, encoder_hidden_states):
            return SimpleNamespace(sample=noise.repeat(x.shape[0] // noise.shape[0], 1, 1, 1))

    adapter = StableDiffusionAdapter(pipe, guidance_scale=3.0)
    x0_hat, x_t, _ = denoise_in_one_step(adapter, Oracle(), x0, noise, t, adapter.encode_prompts(["a"] * 3))
    torch.testing.assert_close(x_t, pipe.scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(x0_hat, x0)


@pytest.mark.parametrize("reward", ["jpeg_compressibility", "gold",
                                    {"name": "ensemble", "members": ["brightness", "jpeg_compressibility"]}])
def test_a_black_box_reward_is_refused_when_the_recipe_is_validated(reward):
    with pytest.raises(ValueError, match="'(jpeg_compressibility|gold)'.*not differentiable.*prdp"):
        BackpropConfig.model_validate({**config("/tmp/unused", 1, "backprop").model_dump(), "reward": [reward]})


def test_an_ensemble_of_differentiable_rewards_is_accepted():
    spec = {"name": "ensemble", "members": ["brightness", {"name": "brightness"}], "mode": "uwo"}
    cfg = BackpropConfig.model_validate({**config("/tmp/unused", 1, "backprop").model_dump(), "reward": [spec]})
    assert cfg.reward == [spec]


def test_a_few_epochs_train_log_and_export(tmp_path, tiny_sd_factory):
    trainer = BackpropTrainer(config(str(tmp_path / "run"), 2, "backprop"), pipeline=tiny_sd_factory(seed=0),
                              progress=False)
    trainer.setup()
    before = {k: v.detach().clone() for k, v in trainable_state(trainer.loop.raw_denoiser).items()}
    metrics = trainer.train()
    after = trainable_state(trainer.loop.raw_denoiser)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key in ("loss", "reward_loss", "grad_norm", "reward/mean"):
        assert math.isfinite(metrics[key]), key
    assert metrics["skipped_steps"] == 0
    assert (trainer.export() / "pytorch_lora_weights.safetensors").is_file()
    trainer.cleanup()


class NaNHalf(Reward):
    name = "nan_half"
    differentiable = True

    def forward(self, batch):
        scores = batch.pixels.flatten(1).mean(1)
        return RewardOutput(torch.where(torch.arange(len(scores)) % 2 == 0, scores, torch.nan))


def test_non_finite_rewards_never_reach_the_optimiser(tmp_path, tiny_sd_factory):
    register("nan_half", NaNHalf)
    cfg = config(str(tmp_path / "run"), 1, "backprop").model_copy(update={"reward": ["nan_half"]})
    trainer = BackpropTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
    metrics = trainer.train()
    assert math.isfinite(metrics["loss"]) and metrics["skipped_steps"] == 0
    assert all(torch.isfinite(v).all() for v in trainable_state(trainer.loop.raw_denoiser).values())
    trainer.cleanup()


@pytest.mark.parametrize("method", ["alignprop", "direct_align"])
def test_training_raises_the_reward(tmp_path, tiny_sd_factory, method):
    before, after = brightness_run(BackpropTrainer, "backprop", tmp_path, tiny_sd_factory, epochs=4, method=method)
    assert after["mean"] > before["mean"] + 0.01, (before, after)
