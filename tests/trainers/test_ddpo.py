import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.config import load_recipe
from mmalign.trainers.ddpo import DDPOConfig, DDPOTrainer, PromptStats
from mmalign.trainers.lora import trainable_state
from mmalign.trainers.ppo import clipped_surrogate, timestep_mask

sys.path.insert(0, str(Path(__file__).parent))
from diffusion_run import assert_two_processes_agree, config  # noqa: E402


def test_clipped_surrogate_is_ppos_loss():
    new, old = torch.tensor([0.0, 0.3, -0.3, 0.05], dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0], dtype=torch.float64)
    loss, clipped = clipped_surrogate(new, old, adv, 0.2)
    expected, flags = [], []
    for n, o, a in zip(new.tolist(), old.tolist(), adv.tolist()):
        ratio = math.exp(n - o)
        expected.append(max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
        flags.append(abs(ratio - 1) > 0.2)
    assert loss.tolist() == pytest.approx(expected) and clipped.tolist() == flags


def test_prompt_stats_are_ddpos_per_prompt_tracker():
    """Against a NumPy transcription of DDPO's PerPromptStatTracker (buffer per prompt, epoch stats before
    ``min_count``), over two epochs so the buffers carry over."""
    rng = np.random.default_rng(0)
    stats, buffers = PromptStats(buffer_size=5, min_count=4), {}
    for _ in range(2):
        keys, rewards = rng.integers(0, 3, 9), rng.normal(size=9)
        out = stats.advantages(torch.as_tensor(keys), torch.as_tensor(rewards)).numpy()
        expected = np.empty(9)
        for key in np.unique(keys):
            buffers[key] = (list(buffers.get(key, [])) + list(rewards[keys == key]))[-5:]
            if len(buffers[key]) < 4:
                mean, std = rewards.mean(), rewards.std()
            else:
                mean, std = np.mean(buffers[key]), np.std(buffers[key])
            expected[keys == key] = (rewards[keys == key] - mean) / (std + 1e-6)
        np.testing.assert_allclose(out, expected, rtol=1e-12)
    again = PromptStats(5, 4)
    again.load_state_dict(stats.state_dict())
    assert again.buffers.keys() == stats.buffers.keys()
    nan = stats.advantages(torch.tensor([0, 0]), torch.tensor([float("nan"), 1.0]))
    assert math.isnan(nan[0]) and math.isfinite(nan[1])


def test_timestep_mask_trains_a_fraction_of_the_trained_steps():
    trained = torch.tensor([True, True, True, True, False])
    mask = timestep_mask(6, trained, 0.5, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [2] * 6 and not mask[:, 4].any()
    assert len({tuple(row.tolist()) for row in mask}) > 1  # drawn per sample


def test_a_few_epochs_train_log_and_export(tmp_path, tiny_sd_factory):
    trainer = DDPOTrainer(config(str(tmp_path / "run"), 2, "ddpo"), pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.setup()
    before = {k: v.detach().clone() for k, v in trainable_state(trainer.loop.raw_denoiser).items()}
    metrics = trainer.train()
    after = trainable_state(trainer.loop.raw_denoiser)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key in ("loss", "clip_fraction", "approx_kl", "zero_spread_groups", "reward/mean", "grad_norm"):
        assert math.isfinite(metrics[key]), key
    assert 0 <= metrics["clip_fraction"] <= 1 and metrics["approx_kl"] > 0
    assert metrics["trained_pairs"] == 12 * int(trainer.loop.trained_steps.sum())
    assert trainer.stats.buffers  # the per-prompt buffers are filled and checkpointed
    assert trainer.export().is_dir()
    trainer.cleanup()


def test_the_first_update_checks_that_the_ratio_is_one(tmp_path, tiny_sd_factory):
    trainer = DDPOTrainer(config(str(tmp_path / "run"), 1, "ddpo"), pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.setup()
    trajectory = trainer.loop.rollout(0)
    trainer.loop.score(trajectory)
    trajectory.log_probs = trajectory.log_probs + 0.05  # a sampler and a re-scorer that disagree (0.05 nats)
    with pytest.raises(RuntimeError, match="ratio is not 1"):
        trainer.update(trajectory, 0)


def test_recipe_has_prdps_budget_and_reward():
    ddpo, prdp = load_recipe("shapes-ddpo"), load_recipe("shapes-prdp")
    assert isinstance(ddpo, DDPOConfig)
    for key in ("reward", "epochs", "prompts_per_epoch", "samples_per_prompt", "prompts_per_update", "num_steps",
                "learning_rate", "lora", "prompts", "report"):
        assert getattr(ddpo, key) == getattr(prdp, key), key


def test_training_raises_the_reward(tmp_path, tiny_sd_factory):
    from brightness import brightness_run

    before, after = brightness_run(DDPOTrainer, "ddpo", tmp_path, tiny_sd_factory, learning_rate=3e-3, epochs=6)
    assert after["ci_low"] > before["ci_high"], (before, after)


@pytest.mark.slow
def test_two_processes_keep_identical_weights(tmp_path):
    assert_two_processes_agree(tmp_path, "ddpo")
