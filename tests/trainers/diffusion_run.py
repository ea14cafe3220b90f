"""Runs a tiny diffusion RL job; used by the resume and multi-process tests as a subprocess.

usage: python diffusion_run.py ALGORITHM OUTPUT_DIR EPOCHS [--kill-after-epoch N]   (prdp, ddpo, grpo or backprop)
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds tiny_models.py
from tiny_models import make_tiny_sd_pipeline  # noqa: E402

from mmalign.rewards import Reward, RewardOutput, register  # noqa: E402
from mmalign.trainers.backprop import BackpropConfig, BackpropTrainer  # noqa: E402
from mmalign.trainers.ddpo import DDPOConfig, DDPOTrainer  # noqa: E402
from mmalign.trainers.diffusion_grpo import GRPOConfig, GRPOTrainer  # noqa: E402
from mmalign.trainers.lora import trainable_state  # noqa: E402
from mmalign.trainers.prdp import PRDPConfig, PRDPTrainer  # noqa: E402

COMMON = dict(
    pipeline="tiny", reward=["jpeg_incompressibility"], prompts_per_epoch=4, samples_per_prompt=3,
    prompts_per_update=2, num_steps=3, guidance_scale=2.0, learning_rate=1e-3, lora={"rank": 2, "alpha": 2},
    report=None, prompts={"world": "train", "n": 16, "seed": 0},
)
ALGORITHMS = {
    "prdp": (PRDPTrainer, PRDPConfig, {"beta": 0.05, "clip_range": 0.5}),
    "ddpo": (DDPOTrainer, DDPOConfig, {"min_count": 2, "buffer_size": 6}),
    "grpo": (GRPOTrainer, GRPOConfig, {"beta": 0.1, "timestep_fraction": 0.5}),
    "backprop": (BackpropTrainer, BackpropConfig, {"reward": ["brightness"], "method": "alignprop", "grad_steps": 2}),
}


class Brightness(Reward):
    """Mean pixel value: the tiny runs' differentiable reward."""

    name = "brightness"
    differentiable = True

    def forward(self, batch):
        return RewardOutput(batch.pixels.flatten(1).mean(1))


register("brightness", Brightness)


def config(output_dir: str, epochs: int, algorithm: str = "prdp"):
    _, schema, own = ALGORITHMS[algorithm]
    return schema(**{**COMMON, **own}, epochs=epochs, output_dir=output_dir)


def kill_after(trainer, epoch_to_die: int) -> None:
    """Make ``trainer`` die with SIGKILL right after the checkpoint of epoch ``epoch_to_die`` is written."""
    save = trainer.loop.save_checkpoint

    def save_then_die(epoch: int) -> None:
        save(epoch)
        if epoch == epoch_to_die:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.loop.save_checkpoint = save_then_die


def main() -> None:
    """Train, then save each rank's final trainable weights."""
    algorithm, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    trainer_class = ALGORITHMS[algorithm][0]
    trainer = trainer_class(config(out, epochs, algorithm), pipeline=make_tiny_sd_pipeline(seed=0), progress=False)
    trainer.setup()
    if "--kill-after-epoch" in sys.argv:
        kill_after(trainer, int(sys.argv[sys.argv.index("--kill-after-epoch") + 1]))
    trainer.train()
    trainer.cleanup()
    unet = trainer.loop.raw_unet
    state = {k: v.detach().double().sum().item() for k, v in trainable_state(unet).items()}
    rank = trainer.loop.accelerator.process_index
    torch.save(dict(trainable_state(unet)), Path(out) / f"final-rank{rank}.pt")
    (Path(out) / f"done-rank{rank}.json").write_text(json.dumps({"epochs": epochs, "param_sums": state}))


if __name__ == "__main__":
    main()


def _job(algorithm: str, out: Path, epochs: int, *extra: str, check: bool = True):
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, __file__, algorithm, str(out), str(epochs), *extra], env=env, check=check,
                          capture_output=True, text=True, timeout=900)


def assert_resumes_bit_for_bit(tmp_path: Path, algorithm: str) -> None:
    """A run killed (SIGKILL) after epoch 1's checkpoint and restarted ends with the straight run's weights."""
    _job(algorithm, tmp_path / "straight", 3)
    killed = _job(algorithm, tmp_path / "killed", 3, "--kill-after-epoch", "1", check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "epoch-00001"
    assert not (tmp_path / "killed" / "done-rank0.json").exists()
    _job(algorithm, tmp_path / "killed", 3)
    straight = torch.load(tmp_path / "straight" / "final-rank0.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "final-rank0.pt", weights_only=True)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def assert_two_processes_agree(tmp_path: Path, algorithm: str) -> None:
    """Two gloo processes under accelerate train 2 epochs and end with identical weights."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               __file__, algorithm, str(tmp_path / "ddp"), "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"final-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
