"""The run: what every trainer does besides its algorithm, as a component it holds (not a base class).

A ``Run`` owns the run folder (``config.json``, ``metrics.jsonl``, ``checkpoints/``), the accelerator and its
trackers, the seeded generators, atomic checkpoints with resume, and ``cleanup``. Trainers built on another
library's loop (VLM GRPO on TRL) use the folder functions ``write_config`` and ``append_metrics`` alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from mmalign.files import write_text_atomic
from mmalign.seeds import derived_seed
from mmalign.trainers.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint
from mmalign.trainers.distributed import destroy_process_group_at_exit

__all__ = ["Run", "append_metrics", "seeded_generator", "write_config"]


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers (``derived_seed``): the same on every process and in every run."""
    return torch.Generator().manual_seed(derived_seed(*keys))


def write_config(run_dir: str | Path, config: BaseModel) -> Path:
    """``config.json``: the validated recipe the run was started with (written atomically)."""
    return write_text_atomic(Path(run_dir) / "config.json", config.model_dump_json(indent=2))


def append_metrics(run_dir: str | Path, row: Mapping[str, Any]) -> None:
    """One row of ``metrics.jsonl``, the log that is always on whatever trackers are configured."""
    with (Path(run_dir) / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps(dict(row)) + "\n")


def _multi_process_without_cuda() -> bool:
    """Several launched processes and no CUDA: accelerate must be told to use gloo on the CPU, or every process
    would train alone as rank 0."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


class Run:
    """Run folder, accelerator, trackers, generators and checkpoints of one training run.

    Args:
        config: the recipe; written to ``config.json`` and given to the trackers.
        output_dir: the run folder; a folder holding a checkpoint is resumed by ``resume``.
        project: the trackers' project name.
    """

    def __init__(
        self,
        config: BaseModel,
        output_dir: str | Path,
        seed: int,
        mixed_precision: str = "no",
        trackers: list[str] | None = None,
        project: str = "mmalign",
        progress: bool = True,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config, self.seed, self.progress = config, seed, progress
        self.run_dir = Path(output_dir)
        self.trackers = list(trackers or [])
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision, log_with=self.trackers or None, project_dir=str(self.run_dir),
            cpu=_multi_process_without_cuda(),
        )
        destroy_process_group_at_exit()  # scripts that never call cleanup() still exit cleanly
        set_seed(seed)
        if self.is_main:
            write_config(self.run_dir, config)
        if self.trackers:
            self.accelerator.init_trackers(project, config=json.loads(config.model_dump_json()))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def generator(self, epoch: int, purpose: int, shared: bool = False) -> torch.Generator:
        """Every random draw comes from ``(seed, epoch, purpose, rank)``, so a resumed run replays it exactly;
        ``shared`` generators are the same on every process (e.g. the epoch's prompt choice)."""
        rank = 0 if shared else self.accelerator.process_index + 1
        return seeded_generator(self.seed, epoch, purpose, rank)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Numbers to the trackers, the whole row to ``metrics.jsonl`` (main process)."""
        if self.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.is_main:
            append_metrics(self.run_dir, metrics)

    def log_images(self, images: Mapping[str, Any], step: int) -> None:
        """PIL images to the trackers that take images (tensorboard, wandb, …); the others are skipped."""
        if not self.trackers or not self.is_main:
            return
        for tracker in self.accelerator.trackers:
            if not hasattr(tracker, "log_images"):
                continue
            if tracker.name == "tensorboard":  # SummaryWriter.add_images wants one array per name
                tracker.log_images({k: np.asarray(v)[None] for k, v in images.items()}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({k: [v] for k, v in images.items()}, step=step)

    def save_checkpoint(
        self, epoch: int, step: int, trainable: dict[str, torch.Tensor], optimizer, extra: dict[str, Any], keep: int
    ) -> None:
        """An atomic checkpoint of epoch ``epoch`` written by the main process (with the GradScaler's state, so fp16
        runs resume bit for bit)."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            scaler = self.accelerator.scaler
            extra = {**extra, "scaler": scaler.state_dict() if scaler is not None else {}}
            state = {"epoch": epoch, "step": step, "config": json.loads(self.config.model_dump_json())}
            save_checkpoint(
                self.run_dir / "checkpoints", f"epoch-{epoch:05d}", trainable, optimizer.state_dict(), extra, state, keep
            )
        self.accelerator.wait_for_everyone()

    def resume(self, trainable: dict[str, torch.Tensor], optimizer) -> Checkpoint | None:
        """Load the latest checkpoint into ``trainable`` and ``optimizer`` (and the GradScaler); None without one.
        The caller restores what else it keeps from ``checkpoint.extra``."""
        checkpoint = latest_checkpoint(self.run_dir / "checkpoints")
        if checkpoint is None:
            return None
        missing = sorted(set(trainable) - set(checkpoint.trainable))
        if missing:
            raise ValueError(f"checkpoint {checkpoint.path}: lacks trained parameters {missing[:3]} (another setup?)")
        with torch.no_grad():
            for name, value in checkpoint.trainable.items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(checkpoint.optimizer)
        if self.accelerator.scaler is not None and checkpoint.extra.get("scaler"):
            self.accelerator.scaler.load_state_dict(checkpoint.extra["scaler"])
        if self.is_main and self.progress:
            print(f"resuming from {checkpoint.path} (epoch {checkpoint.state['epoch'] + 1})")
        return checkpoint

    def cleanup(self) -> None:
        """Close the trackers and let the processes finish together."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
