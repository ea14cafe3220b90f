"""Runs a tiny diffusion RL job (train, report, export); used by the kill-and-resume and multi-process tests as a
subprocess, and in process through ``run``.

usage: python diffusion_run.py ALGORITHM OUTPUT_DIR EPOCHS [--report] [--kill-after-epoch N] [--kill-at NAME]
(ALGORITHM: prdp, ddpo, grpo, backprop, d2align or nft; --kill-at: die just before NAME, a file or folder of the run
folder such as summary.json or lora, is moved into place)
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds tiny_models.py
from tiny_models import make_tiny_sd_pipeline, save_tiny_open_clip  # noqa: E402

from mmalign.rewards import Reward, RewardOutput, register  # noqa: E402
from mmalign.trainers.backprop import BackpropConfig, BackpropTrainer  # noqa: E402
from mmalign.trainers.d2align import D2AlignConfig, D2AlignTrainer  # noqa: E402
from mmalign.trainers.ddpo import DDPOConfig, DDPOTrainer  # noqa: E402
from mmalign.trainers.diffusion_grpo import GRPOConfig, GRPOTrainer  # noqa: E402
from mmalign.trainers.diffusion_nft import NFTConfig, NFTTrainer  # noqa: E402
from mmalign.trainers.lora import trainable_state  # noqa: E402
from mmalign.trainers.prdp import PRDPConfig, PRDPTrainer  # noqa: E402

COMMON = dict(
    pipeline="tiny", reward=["jpeg_incompressibility"], prompts_per_epoch=4, samples_per_prompt=3,
    prompts_per_update=2, num_steps=3, guidance_scale=2.0, learning_rate=1e-3, lora={"rank": 2, "alpha": 2},
    prompts={"world": "train", "n": 16, "seed": 0},
)
ALGORITHMS = {
    "prdp": (PRDPTrainer, PRDPConfig, {"beta": 0.05, "clip_range": 0.5}),
    "ddpo": (DDPOTrainer, DDPOConfig, {"min_count": 2, "buffer_size": 6}),
    "grpo": (GRPOTrainer, GRPOConfig, {"beta": 0.1, "timestep_fraction": 0.5}),
    "backprop": (BackpropTrainer, BackpropConfig, {"reward": ["brightness"], "method": "alignprop", "grad_steps": 2}),
    "d2align": (D2AlignTrainer, D2AlignConfig, {"correction_prompts": 2, "correction_steps": 20, "correction_radius": 0.2}),
    "nft": (NFTTrainer, NFTConfig, {"timestep_fraction": 0.5, "old_decay_rate": 0.3, "reference_weight": 0.1}),
}
#: a small before/after report (``--report``)
REPORT = {"prompts": {"world": "train", "n": 2, "seed": 0}, "samples_per_prompt": 2, "rewards": [], "grid_prompts": 2}


class Brightness(Reward):
    """Mean pixel value: the tiny runs' differentiable reward."""

    name = "brightness"
    differentiable = True

    def forward(self, batch):
        return RewardOutput(batch.pixels.flatten(1).mean(1))


register("brightness", Brightness)


def config(output_dir: str, epochs: int, algorithm: str = "prdp", report: bool = False):
    _, schema, own = ALGORITHMS[algorithm]
    if schema is D2AlignConfig:  # a CLIP-type reward, the same tiny weights beside every run folder of a test
        clip = Path(output_dir).parent / "tiny_open_clip"
        if not clip.is_dir():
            save_tiny_open_clip(clip)
        own = {**own, "reward": [{"name": "clip", "model": str(clip), "pretrained": None, "clamp": False}]}
    return schema(**{**COMMON, **own}, epochs=epochs, output_dir=output_dir, report=REPORT if report else None)


def run(algorithm: str, out, epochs: int, report: bool = False, before_train=None):
    """Train ``algorithm`` for ``epochs`` in ``out`` (resuming what is there), then report and export; returns
    the trainer, cleaned up. ``before_train(trainer)`` runs after ``setup``."""
    trainer_class = ALGORITHMS[algorithm][0]
    trainer = trainer_class(config(str(out), epochs, algorithm, report), pipeline=make_tiny_sd_pipeline(seed=0),
                            progress=False)
    trainer.setup()
    if before_train is not None:
        before_train(trainer)
    try:
        trainer.train()
        trainer.report()
        trainer.export()
    finally:
        trainer.cleanup()
    return trainer


def kill_at(name: str) -> None:
    """Die with SIGKILL just before a file or folder called ``name`` is moved into place (``mmalign.files``)."""
    replace = os.replace

    def replace_or_die(src, dst):
        if Path(dst).name == name:
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)

    os.replace = replace_or_die


def kill_after(trainer, epoch_to_die: int) -> None:
    """Make ``trainer`` die with SIGKILL right after the checkpoint of epoch ``epoch_to_die`` is written."""
    save = trainer.loop.save_checkpoint

    def save_then_die(epoch: int) -> None:
        save(epoch)
        if epoch == epoch_to_die:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.loop.save_checkpoint = save_then_die


def main() -> None:
    """Train, report, export, then save each rank's final trainable weights."""
    algorithm, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if "--kill-at" in sys.argv:
        kill_at(sys.argv[sys.argv.index("--kill-at") + 1])

    def before_train(trainer):
        if "--kill-after-epoch" in sys.argv:
            kill_after(trainer, int(sys.argv[sys.argv.index("--kill-after-epoch") + 1]))

    trainer = run(algorithm, out, epochs, "--report" in sys.argv, before_train)
    unet = trainer.loop.raw_denoiser
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
