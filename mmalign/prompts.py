"""Where training and evaluation prompts come from: a split of the shapes world (images or clips), or a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mmalign.config import StrictModel, import_object

__all__ = ["PromptSource", "load_prompts"]

#: the world's prompt splits, reached by import path (generic code never imports the world)
_WORLD_PROMPTS = "mmalign.world.captions:prompt_set"
_WORLD_VIDEO_PROMPTS = "mmalign.world.video:video_prompt_set"


class PromptSource(StrictModel):
    """``world: train`` (or ``heldout``) with ``n`` and ``seed``; ``world_video``: the world's clips of moving
    shapes; or ``file``: ``.txt`` (a prompt per line) or ``.jsonl`` (``{"prompt": ..., **metadata}``; world
    prompt files carry their ``scene``)."""

    world: Literal["train", "heldout"] | None = Field(None, description="split of the shapes world")
    world_video: Literal["train", "heldout"] | None = Field(
        None, description="split of the shapes world's clips ('a red circle moving left'; for video pipelines)"
    )
    file: str | None = Field(None, description="prompt file instead of the world")
    n: int = Field(64, ge=1, description="how many world prompts")
    seed: int = Field(0, description="seed of the world prompts")

    @model_validator(mode="after")
    def _one_source(self) -> PromptSource:
        if [self.file, self.world, self.world_video].count(None) != 2:
            raise ValueError("expected exactly one of `world: train|heldout`, `world_video: train|heldout` or "
                             "`file: path`")
        return self


def load_prompts(source: PromptSource) -> list[tuple[str, dict[str, Any]]]:
    """``(prompt, metadata)`` pairs; world prompts carry ``{"scene": ...}`` (clips also ``"motion"``) so the gold
    verifiers can score them."""
    if source.world_video is not None:
        clips = import_object(_WORLD_VIDEO_PROMPTS)(source.world_video, source.n, source.seed)
        return [(c.text, {"scene": c.scene.to_dict(), "motion": c.motion.to_dict()}) for c in clips]
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
