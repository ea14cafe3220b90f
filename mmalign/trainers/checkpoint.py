"""Atomic, resumable training checkpoints.

A checkpoint is a folder: ``trainable.safetensors`` (the parameters being trained), ``optimizer.pt`` and
``extra.pt`` (optimiser, EMA and reward-normalisation state dicts: tensors and plain numbers, read back with
``weights_only=True``), and ``state.json`` (counters). It is written to a temporary folder and renamed into
place, and ``latest`` is replaced atomically after it, so a run killed at any instant leaves either the old or
the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmalign.files import write_atomic, write_text_atomic

__all__ = ["Checkpoint", "latest_checkpoint", "save_checkpoint"]


@dataclass
class Checkpoint:
    path: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    extra: dict[str, Any]
    state: dict[str, Any]


def save_checkpoint(
    folder: str | Path,
    name: str,
    trainable: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    extra: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``folder/name`` atomically, point ``folder/latest`` at it, keep the newest ``keep`` checkpoints."""
    folder = Path(folder)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(extra, tmp / "extra.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))

    final = write_atomic(folder / name, write)
    write_text_atomic(folder / "latest", name)
    _prune(folder, keep, protect=name)
    return final


def latest_checkpoint(folder: str | Path) -> Checkpoint | None:
    """The checkpoint ``folder/latest`` points at, or None when the run has none yet."""
    folder = Path(folder)
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    path = folder / pointer.read_text().strip()
    return Checkpoint(
        path=path,
        trainable=load_file(path / "trainable.safetensors"),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        extra=torch.load(path / "extra.pt", weights_only=True),
        state=json.loads((path / "state.json").read_text()),
    )


def _prune(folder: Path, keep: int, protect: str) -> None:
    done = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=os.path.getmtime)
    for old in done[:-keep] if keep > 0 else []:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)

