import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.config import load_recipe
from mmalign.trainers import trainer_for
from mmalign.trainers.diffusion_grpo import GRPOConfig, GRPOTrainer, group_advantages

sys.path.insert(0, str(Path(__file__).parent))
from diffusion_run import assert_two_processes_agree, config  # noqa: E402


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 4.0, 3.0, 3.0, 3.0, 0.0, float("nan"), 2.0])
    out = group_advantages(rewards, 3).numpy()
    groups = rewards.view(3, 3).double().numpy()
    expected = []
    for g in groups:
        f = g[np.isfinite(g)]
        expected.extend((g - f.mean()) / (f.std() + 1e-4))
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert np.all(out[3:6] == 0)  # a zero-spread group teaches nothing
    batch = group_advantages(rewards, 3, torch.tensor(2.0)).numpy()
    np.testing.assert_allclose(batch[:3], (groups[0] - groups[0].mean()) / (2.0 + 1e-4), rtol=1e-12)


def test_kl_penalty_is_the_gaussian_kl_to_the_reference(tmp_path, tiny_sd_factory):
    """β·‖μ_θ − μ_ref‖²/(2σ²) equals torch's KL(N(μ_θ, σ²) ‖ N(μ_ref, σ²)) summed over latent dims."""
    cfg = config(str(tmp_path / "run"), 1, "grpo").model_copy(update={"beta": 0.5})
    trainer = GRPOTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.setup()
    loop = trainer.loop
    with torch.no_grad():  # move the policy away from the reference (LoRA B starts at zero)
        for name, p in loop.raw_denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trajectory = loop.rollout(0)
    index, rows = 1, torch.arange(len(trajectory))
    x = trajectory.latents[:, index]
    out = loop.adapter.model_output(loop.raw_denoiser, x, trajectory.timesteps[index], trajectory.embeds)
    step = loop.policy.step(out, x, index, prev_sample=trajectory.latents[:, index + 1])
    penalty = trainer.kl_to_reference(index, rows, step, trajectory)
    with torch.no_grad():
        loop.raw_denoiser.disable_adapters()
        ref_out = loop.adapter.model_output(loop.raw_denoiser, x, trajectory.timesteps[index], trajectory.embeds)
        loop.raw_denoiser.enable_adapters()
    ref_mean = loop.policy.step(ref_out, x, index, prev_sample=trajectory.latents[:, index + 1]).mean
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(step.mean.double(), step.std),
                                           torch.distributions.Normal(ref_mean.double(), step.std)).flatten(1).sum(1)
    torch.testing.assert_close(penalty.double(), 0.5 * kl, rtol=1e-5, atol=1e-9)
    assert (penalty > 0).all()


def test_a_few_epochs_log_kl_and_zero_spread(tmp_path, tiny_sd_factory):
    trainer = GRPOTrainer(config(str(tmp_path / "run"), 2, "grpo"), pipeline=tiny_sd_factory(seed=0), progress=False)
    metrics = trainer.train()
    for key in ("loss", "clip_fraction", "approx_kl", "kl", "zero_spread_groups", "reward/mean"):
        assert math.isfinite(metrics[key]), key
    assert metrics["kl"] > 0  # the policy left the reference in the first epoch
    trained = int(trainer.loop.trained_steps.sum())
    assert metrics["trained_pairs"] == 12 * math.ceil(0.5 * trained)  # a random half of the trained steps
    trainer.cleanup()


def test_recipe_and_task_table():
    recipe = load_recipe("shapes-grpo")
    assert isinstance(recipe, GRPOConfig) and trainer_for(recipe) is GRPOTrainer
    prdp = load_recipe("shapes-prdp")
    for key in ("reward", "epochs", "prompts_per_epoch", "samples_per_prompt", "num_steps", "learning_rate", "report"):
        assert getattr(recipe, key) == getattr(prdp, key), key


def test_training_raises_the_reward(tmp_path, tiny_sd_factory):
    from brightness import brightness_run

    before, after = brightness_run(GRPOTrainer, "grpo", tmp_path, tiny_sd_factory, learning_rate=3e-3, beta=0.0)
    assert after["ci_low"] > before["ci_high"], (before, after)


@pytest.mark.slow
def test_two_processes_keep_identical_weights(tmp_path):
    assert_two_processes_agree(tmp_path, "grpo")
