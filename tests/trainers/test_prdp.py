import json
import sys
from pathlib import Path

import pytest
import torch

from mmalign.config import load_recipe
from mmalign.trainers.lora import trainable_state
from mmalign.trainers.prdp import PRDPConfig, PRDPTrainer

RUNNER = Path(__file__).with_name("diffusion_run.py")
sys.path.insert(0, str(RUNNER.parent))
from diffusion_run import assert_two_processes_agree, config  # noqa: E402


def test_config_rules():
    base = {"pipeline": "world", "prompts": {"world": "train"}, "reward": ["jpeg_compressibility"]}
    with pytest.raises(ValueError, match="must be a multiple of prompts_per_update"):
        PRDPConfig(**base, prompts_per_epoch=6, prompts_per_update=4)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PRDPConfig(**base, samples_per_prompt=1)
    with pytest.raises(ValueError, match="prompts"):  # world defaults come from recipes, not from the schema
        PRDPConfig(pipeline="world", reward=["jpeg_compressibility"])
    recipe = load_recipe("shapes-prdp", ["epochs=3", "lora=null"])
    assert recipe.epochs == 3 and recipe.lora is None and recipe.log_rewards == ["gold"]


def test_a_few_epochs_train_lora_log_and_export(tmp_path, tiny_sd_factory):
    trainer = PRDPTrainer(config(str(tmp_path / "run"), 2), pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.setup()
    before = {k: v.detach().clone() for k, v in trainable_state(trainer.loop.raw_denoiser).items()}
    assert before and all("lora" in k for k in before)
    trainer.train()
    after = trainable_state(trainer.loop.raw_denoiser)
    assert any(not torch.equal(before[k], after[k]) for k in before), "no LoRA weight changed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        for key in ("loss", "grad_norm", "approx_kl", "reward/mean", "clip_fraction", "samples_per_s"):
            assert torch.isfinite(torch.tensor(float(row[key]))), (key, row[key])
        assert row["pairs"] == 4 * 3  # 4 prompts × C(3, 2) pairs, over the epoch's two updates
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "epoch-00001"

    exported = trainer.export()
    plain = tiny_sd_factory(seed=0)
    plain.load_lora_weights(exported)  # plain diffusers, no mmalign code
    x, t, e = torch.randn(1, 4, 8, 8), 500, torch.randn(1, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            plain.unet(x, t, encoder_hidden_states=e).sample, trainer.loop.raw_denoiser(x, t, encoder_hidden_states=e).sample
        )


def test_nearly_deterministic_steps_are_not_trained(tmp_path, tiny_sd_factory, monkeypatch):
    import mmalign.trainers.prdp as prdp_module

    cfg = config(str(tmp_path / "run"), 1).model_copy(update={"min_step_std_fraction": 0.1})
    trainer = PRDPTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.setup()
    trained, stds = trainer.loop.trained_steps, trainer.loop.policy.stds
    assert trained.tolist() == [std >= 0.1 * max(stds) for std in stds]
    assert trained.any() and not trained.all()  # the last DDIM step is nearly deterministic
    coefficients, backward = [], prdp_module.backward_weighted_log_probs

    def spy(adapter, policy, unet, part, coef, no_sync=None):
        coefficients.append(coef.clone())
        return backward(adapter, policy, unet, part, coef, no_sync)

    monkeypatch.setattr(prdp_module, "backward_weighted_log_probs", spy)
    trainer.train()
    assert coefficients and all(c[:, ~trained].eq(0).all() and c[:, trained].ne(0).any() for c in coefficients)
    with pytest.raises(ValueError, match="min_step_std_fraction"):
        PRDPConfig(pipeline="world", prompts={"world": "train"}, reward=["gold"], min_step_std_fraction=1.5)


def test_training_raises_the_reward(tmp_path, tiny_sd_factory):
    """Full fine-tuning against mean brightness: the report's fixed-seed samples get brighter."""
    from mmalign.rewards import Reward, RewardOutput, register

    class Brightness(Reward):
        name = "brightness"

        def forward(self, batch):
            return RewardOutput(batch.pixels.flatten(1).mean(1))

    register("brightness", Brightness)
    report = {"prompts": {"world": "train", "n": 4, "seed": 0}, "samples_per_prompt": 8, "rewards": [],
              "grid_prompts": 0}
    cfg = PRDPConfig.model_validate({**config(str(tmp_path / "run"), 6).model_dump(), "reward": ["brightness"],
                                     "lora": None, "beta": 0.01, "learning_rate": 3e-3, "report": report})
    trainer = PRDPTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.train()
    summary = trainer.report()
    before, after = summary["before"]["reward"], summary["after"]["reward"]
    assert after["ci_low"] > before["ci_high"], (before, after)  # fixed seeds: the same noise, brighter images


def test_nonfinite_rewards_are_skipped_and_counted(tmp_path, tiny_sd_factory):
    from mmalign.rewards import Reward, RewardOutput, register

    class Flaky(Reward):
        """Mean pixel, NaN for the first sample of every batch."""

        name = "flaky"

        def forward(self, batch):
            scores = batch.pixels.flatten(1).mean(1).clone()
            scores[0] = float("nan")
            return RewardOutput(scores)

    register("flaky", Flaky)
    cfg = config(str(tmp_path / "run"), 1).model_copy(update={"reward": ["flaky"]})
    trainer = PRDPTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
    metrics = trainer.train()
    assert metrics["skipped_nonfinite"] == 1
    assert metrics["pairs"] == 4 * 3 - 2  # the NaN sample's two pairs are gone
    assert all(torch.isfinite(p).all() for p in trainable_state(trainer.loop.raw_denoiser).values())


@pytest.mark.slow
def test_two_processes_keep_identical_weights(tmp_path):
    """Two gloo processes under accelerate: each samples its own prompts, gradients are averaged."""
    assert_two_processes_agree(tmp_path, "prdp")
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # written by the main process only
    assert rows[0]["pairs"] == 2 * 3  # this process's 2 prompts × C(3, 2); the other process had its own
