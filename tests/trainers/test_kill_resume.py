"""Every trainer survives a kill (#24): a run killed with SIGKILL resumes bit for bit, and a run folder left by a
kill in the report or the export is never taken for a finished one, and completes when run again.

The SIGKILL runs are subprocesses (slow); the default run covers every diffusion trainer's resume in process."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from diffusion_run import ALGORITHMS, _job, run  # noqa: E402
from vlm_grpo_run import config as vlm_config  # noqa: E402

from mmalign.eval.generator import load_run_pipeline  # noqa: E402
from mmalign.trainers.lora import trainable_state  # noqa: E402

VLM_RUNNER = Path(__file__).with_name("vlm_grpo_run.py")


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def _training_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_a_stopped_run_resumes_bit_for_bit(tmp_path, algorithm):
    """One epoch, then the same folder to two: the straight two-epoch run's weights, every bit."""
    straight = run(algorithm, tmp_path / "straight", 2)
    run(algorithm, tmp_path / "resumed", 1)
    resumed = run(algorithm, tmp_path / "resumed", 2)
    assert resumed.loop.start_epoch == 1  # resumed, not trained again from the start
    assert [r["epoch"] for r in _training_rows(tmp_path / "resumed")] == [0, 1]
    assert_same_weights(trainable_state(straight.loop.raw_denoiser), trainable_state(resumed.loop.raw_denoiser))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_a_killed_run_resumes_bit_for_bit(tmp_path, algorithm):
    """Killed (SIGKILL) right after epoch 1's checkpoint and started again: the straight run's weights."""
    _job(algorithm, tmp_path / "straight", 3)
    killed = _job(algorithm, tmp_path / "killed", 3, "--kill-after-epoch", "1", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "epoch-00001"
    assert not (tmp_path / "killed" / "done-rank0.json").exists()
    _job(algorithm, tmp_path / "killed", 3)
    assert_same_weights(torch.load(tmp_path / "straight" / "final-rank0.pt", weights_only=True),
                        torch.load(tmp_path / "killed" / "final-rank0.pt", weights_only=True))


def test_a_run_killed_in_its_report_or_export_is_unfinished_until_run_again(tmp_path):
    """Killed as summary.json, then as lora/, is moved into place: neither is there half-written, the trained
    epoch is not trained again, and the next run writes what is missing."""
    out = tmp_path / "run"
    killed = _job("prdp", out, 1, "--report", "--kill-at", "summary.json", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text() == "epoch-00000"
    assert not (out / "summary.json").exists() and not (out / "lora").exists()

    killed = _job("prdp", out, 1, "--report", "--kill-at", "lora", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["after"]["reward"]["n"] == 4
    assert not (out / "lora").exists()
    with pytest.raises(ValueError, match="has no exported weights .* has it finished"):
        load_run_pipeline(out)

    _job("prdp", out, 1, "--report")
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text()) == summary  # the same weights, prompts and seeds
    assert [r["epoch"] for r in _training_rows(out)] == [0]


def _vlm_job(out: Path, steps: int, *extra: str, check: bool = True):
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(VLM_RUNNER), str(out), str(steps), *extra], env=env, check=check,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_killed_vlm_grpo_run_resumes_bit_for_bit(tmp_path, lora):
    """The recipe on TRL, full fine-tuning (the checkpoint's keys in the hub's layout, converted back on resume) and
    LoRA: killed right after the checkpoint of step 1 and started again, the straight run's weights."""
    extra = ("--lora",) if lora else ()
    _vlm_job(tmp_path / "straight", 2, *extra)
    killed = _vlm_job(tmp_path / "killed", 2, *extra, "--kill-after-step", "1", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-1").is_dir()
    assert not (tmp_path / "killed" / "done-rank0.json").exists()
    _vlm_job(tmp_path / "killed", 2, *extra)
    assert json.loads((tmp_path / "killed" / "done-rank0.json").read_text())["steps"] == 2
    assert [r["step"] for r in _training_rows(tmp_path / "killed")] == [1, 2]
    assert_same_weights(torch.load(tmp_path / "straight" / "final-rank0.pt", weights_only=True),
                        torch.load(tmp_path / "killed" / "final-rank0.pt", weights_only=True))


class Poisoned:
    """Wraps a built reward's ``forward``: NaN for sample 0 and +Inf for sample 5 of every call, the rest as they
    were (gradients included)."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, batch):
        out = self.forward(batch)
        index = torch.arange(len(out.scores), device=out.scores.device)
        bad = torch.where(index == 0, float("nan"), float("inf")).to(out.scores)
        out.scores = torch.where((index == 0) | (index == 5), bad, out.scores)
        return out


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_nonfinite_rewards_are_dropped_counted_and_logged(tmp_path, algorithm):
    """Two non-finite rewards in every call of the trained reward: the weights train and stay finite, and each
    epoch's metrics.jsonl row counts the two."""

    def poison(trainer):
        trainer.loop.reward.forward = Poisoned(trainer.loop.reward.forward)
        trainer.initial = {k: v.detach().clone() for k, v in trainable_state(trainer.loop.raw_denoiser).items()}

    trainer = run(algorithm, tmp_path / "run", 2, before_train=poison)
    weights = trainable_state(trainer.loop.raw_denoiser)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(trainer.initial[k], v) for k, v in weights.items()), "nothing was trained"
    rows = _training_rows(tmp_path / "run")
    assert [r["skipped_nonfinite"] for r in rows] == [2, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward/mean"]) for r in rows)


def test_nonfinite_vlm_grpo_rewards_are_dropped_counted_and_logged(tmp_path):
    """The VLM GRPO recipe with a NaN and an Inf in every call of one reward (8 completions a call): those
    completions are scored by the other reward only, the share is logged in metrics.jsonl, and the weights
    train and stay finite."""
    from tiny_models import make_tiny_vlm

    from mmalign.trainers.vlm_grpo.recipe import VLMGRPORecipeTrainer

    cfg = vlm_config(str(tmp_path / "run"), 2)
    cfg = cfg.model_copy(update={"grpo": {**cfg.grpo, "per_device_train_batch_size": 8}})
    model, processor = make_tiny_vlm(seed=0)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runner = VLMGRPORecipeTrainer(cfg, model, processor, progress=False)
    runner.setup()
    accuracy = runner.functions[0]
    accuracy.reward.forward = Poisoned(accuracy.reward.forward)
    runner.train()
    weights = runner.trainer.accelerator.unwrap_model(runner.trainer.model).state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(not torch.equal(initial[k], v) for k, v in weights.items()), "nothing was trained"
    rows = _training_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["rewards/world_accuracy/nonfinite"] for r in rows] == [0.25, 0.25]
    assert [r["rewards/length_penalty/nonfinite"] for r in rows] == [0.0, 0.0]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["reward"]) for r in rows)
