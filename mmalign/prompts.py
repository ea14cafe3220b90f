"""Where training and evaluation prompts come from: a split of the shapes world, or a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mmalign.config import StrictModel, import_object

__all__ = ["PromptSource", "load_prompts"]

#: the world's prompt splits, reached by import path (generic code never imports the world)
_WORLD_PROMPTS = "mmalign.world.captions:prompt_set"


class PromptSource(StrictModel):
    """``world: train`` (or ``heldout``) with ``n`` and ``seed``; or ``file``: ``.txt`` (a prompt per line) or
    ``.jsonl`` (``{"prompt": ..., **metadata}``; world prompt files carry their ``scene``)."""

    world: Literal["train", "heldout"] | None = Field(None, description="split of the shapes world")
    file: str | None = Field(None, description="prompt file instead of the world")
    n: int = Field(64, ge=1, description="how many world prompts")
    seed: int = Field(0, description="seed of the world prompts")

    @model_validator(mode="after")
    def _one_source(self) -> PromptSource:
        if (self.file is None) == (self.world is None):
            raise ValueError("expected exactly one of `world: train|heldout` or `file: path`")
        return self


def load_prompts(source: PromptSource) -> list[tuple[str, dict[str, Any]]]:
    """``(prompt, metadata)`` pairs; world prompts carry ``{"scene": ...}`` so the gold verifier can score them."""
    if source.file is None:
        prompts = import_object(_WORLD_PROMPTS)(source.world, source.n, source.seed)
        return [(p.text, {"scene": p.scene.to_dict()}) for p in prompts]
    path = Path(source.file)
    if not path.is_file():
        raise ValueError(f"prompts.file: {str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str)]
        if bad:
            raise ValueError(f"prompts.file: lines {bad[:5]} of {path.name} have no string 'prompt'")
        return [(r["prompt"], {k: v for k, v in r.items() if k != "prompt"}) for r in rows]
    return [(line.strip(), {}) for line in path.read_text().splitlines() if line.strip()]
