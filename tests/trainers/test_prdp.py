import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmalign.config import load_recipe
from mmalign.trainers.lora import trainable_state
from mmalign.trainers.prdp import PRDPConfig, PRDPTrainer

RUNNER = Path(__file__).with_name("prdp_run.py")
sys.path.insert(0, str(RUNNER.parent))
from prdp_run import config  # noqa: E402


def test_config_rules():
    with pytest.raises(ValueError, match="must be a multiple of prompts_per_update"):
        PRDPConfig(reward=["jpeg_compressibility"], prompts_per_epoch=6, prompts_per_update=4)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PRDPConfig(reward=["jpeg_compressibility"], samples_per_prompt=1)
    recipe = load_recipe("shapes-prdp", ["epochs=3", "lora=null"])
    assert recipe.epochs == 3 and recipe.lora is None and recipe.log_rewards == ["gold"]


def test_a_few_epochs_train_lora_log_and_export(tmp_path, tiny_sd_factory):
    trainer = PRDPTrainer(config(str(tmp_path / "run"), 2), pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.setup()
    before = {k: v.detach().clone() for k, v in trainable_state(trainer.raw_unet).items()}
    assert before and all("lora" in k for k in before)
    trainer.train()
    after = trainable_state(trainer.raw_unet)
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
            plain.unet(x, t, encoder_hidden_states=e).sample, trainer.raw_unet(x, t, encoder_hidden_states=e).sample
        )


def test_nearly_deterministic_steps_are_not_trained(tmp_path, tiny_sd_factory, monkeypatch):
    import mmalign.trainers.prdp as prdp_module

    cfg = config(str(tmp_path / "run"), 1).model_copy(update={"min_step_std_fraction": 0.1})
    trainer = PRDPTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.setup()
    trained, stds = trainer.trained_steps, trainer.policy.stds
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
        PRDPConfig(reward=["jpeg_compressibility"], min_step_std_fraction=1.5)


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
    assert all(torch.isfinite(p).all() for p in trainable_state(trainer.raw_unet).values())


def _run(out: Path, epochs: int, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(RUNNER), str(out), str(epochs), *extra], env=env, check=check,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_killed_run_resumes_bit_for_bit(tmp_path):
    _run(tmp_path / "straight", 3)
    killed = _run(tmp_path / "killed", 3, "--kill-after-epoch", "1", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "epoch-00001"
    assert not (tmp_path / "killed" / "done-rank0.json").exists()
    _run(tmp_path / "killed", 3)
    straight = torch.load(tmp_path / "straight" / "final-rank0.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "final-rank0.pt", weights_only=True)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.slow
def test_two_processes_keep_identical_weights(tmp_path):
    """Two gloo processes under accelerate: each samples its own prompts, gradients are averaged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(RUNNER), str(tmp_path / "ddp"), "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"final-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # written by the main process only
    assert rows[0]["pairs"] == 2 * 3  # this process's 2 prompts × C(3, 2); the other process had its own
