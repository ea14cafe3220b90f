"""Alignment algorithms on shared components: the run (``run``), the diffusion loop (``diffusion``), one file per
algorithm (``prdp``, ``ddpo``, ``diffusion_grpo``) and VLM GRPO (``vlm_grpo``)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from mmalign.config import TASKS, Recipe, import_object

__all__ = ["Trainer", "trainer_for"]


@runtime_checkable
class Trainer(Protocol):
    """What ``mmalign train`` calls, in this order; ``train`` resumes from the run folder's last checkpoint."""

    run_dir: Any

    def setup(self) -> None: ...

    def train(self) -> dict[str, Any]: ...

    def report(self) -> dict[str, Any] | None: ...

    def export(self) -> Any: ...

    def cleanup(self) -> None:
        """Close trackers and process groups (``accelerator.end_training()``)."""


def trainer_for(recipe: Recipe) -> type:
    """The trainer class that runs ``recipe``, from the task table ``mmalign.config.TASKS``."""
    task = TASKS.get(recipe.task)
    if task is None or task.trainer is None:
        trainable = sorted(name for name, t in TASKS.items() if t.trainer)
        raise ValueError(f"recipe task: {recipe.task!r} is not a training task; trainable tasks: {trainable}")
    return import_object(task.trainer)
