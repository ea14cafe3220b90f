"""Runs a tiny PRDP job; used by the resume and multi-process tests as a subprocess.

usage: python prdp_run.py OUTPUT_DIR EPOCHS [--kill-after-epoch N]
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds tiny_models.py
from tiny_models import make_tiny_sd_pipeline  # noqa: E402

from mmalign.trainers.lora import trainable_state  # noqa: E402
from mmalign.trainers.prdp import PRDPConfig, PRDPTrainer  # noqa: E402


def config(output_dir: str, epochs: int) -> PRDPConfig:
    return PRDPConfig(
        pipeline="tiny", reward=["jpeg_incompressibility"], epochs=epochs, prompts_per_epoch=4,
        samples_per_prompt=3, prompts_per_update=2, num_steps=3, guidance_scale=2.0, learning_rate=1e-3,
        beta=0.05, clip_range=0.5, lora={"rank": 2, "alpha": 2}, output_dir=output_dir, report=None,
        prompts={"world": "train", "n": 16, "seed": 0},
    )


class KillAfter(PRDPTrainer):
    """Dies with SIGKILL right after the checkpoint of epoch ``kill_after`` is written."""

    kill_after = -1

    def save_checkpoint(self, epoch: int) -> None:
        super().save_checkpoint(epoch)
        if epoch == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    out, epochs = sys.argv[1], int(sys.argv[2])
    KillAfter.kill_after = int(sys.argv[4]) if "--kill-after-epoch" in sys.argv else -1
    trainer = KillAfter(config(out, epochs), pipeline=make_tiny_sd_pipeline(seed=0), progress=False)
    trainer.train()
    state = {k: v.detach().double().sum().item() for k, v in trainable_state(trainer.raw_unet).items()}
    rank = trainer.accelerator.process_index
    torch.save(dict(trainable_state(trainer.raw_unet)), Path(out) / f"final-rank{rank}.pt")
    (Path(out) / f"done-rank{rank}.json").write_text(json.dumps({"epochs": epochs, "param_sums": state}))
