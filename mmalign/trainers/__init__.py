"""Rollouts and alignment algorithms (PRDP; DDPO/GRPO, ReNO, D²-Align and VLM GRPO follow)."""

from __future__ import annotations

import importlib

from mmalign.config import Recipe

__all__ = ["TRAINERS", "trainer_for"]

#: recipe task → "module:Trainer"
TRAINERS: dict[str, str] = {
    "prdp": "mmalign.trainers.prdp:PRDPTrainer",
    "vlm_grpo": "mmalign.trainers.vlm_grpo.recipe:VLMGRPORecipeTrainer",
}


def trainer_for(recipe: Recipe) -> type:
    """The trainer class that runs ``recipe`` (by its ``task``)."""
    if recipe.task not in TRAINERS:
        raise ValueError(f"recipe task: {recipe.task!r} is not a training task; trainable tasks: {sorted(TRAINERS)}")
    module, _, name = TRAINERS[recipe.task].partition(":")
    return getattr(importlib.import_module(module), name)
