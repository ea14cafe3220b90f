"""VLM GRPO on TRL: mmalign rewards as TRL reward functions, UWO/WCO ensembles, DAPO dynamic sampling, video
inputs, explicit reference models and the ``vlm_grpo`` recipe (the world's VQA rows are ``mmalign.world.vqa``).

One job per module: ``rewards`` (the adapter), ``sampling`` (which groups carry signal), ``trainer``
(``VLMGRPOTrainer``, a small ``trl.GRPOTrainer`` subclass), ``evaluate`` (greedy answers, scored), ``recipe``
(YAML schema and the ``mmalign train`` runner). TRL is imported only by the modules that need it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "RewardFunction",
    "VLMGRPOConfig",
    "VLMGRPORecipeTrainer",
    "VLMGRPOTrainer",
    "ensemble_function",
    "evaluate_rows",
    "reward_functions",
    "signal_groups",
]

_WHERE = {
    "RewardFunction": "rewards",
    "ensemble_function": "rewards",
    "reward_functions": "rewards",
    "signal_groups": "sampling",
    "VLMGRPOTrainer": "trainer",
    "evaluate_rows": "evaluate",
    "VLMGRPOConfig": "recipe",
    "VLMGRPORecipeTrainer": "recipe",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
