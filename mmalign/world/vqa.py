"""The shapes world as a VQA dataset: renders of ``questions.question_set`` with gold answers (boxes for grounding).

``world_vqa_dataset`` yields what TRL's ``GRPOTrainer`` expects of a vision-language dataset: a
conversational ``prompt`` (the question as the user turn; TRL puts the image in front of it), an ``image``
column (PIL) or, with ``frames``, a ``video`` column (a list of PIL frames: the scene rendered with fresh
jitter each frame), and the gold data that rewards read from the metadata: ``answer``, ``kind``, for
grounding ``box`` with ``image_size``, and the ``scene`` (JSON) the question is about.
The reward ``world_accuracy`` (``mmalign.world.answer_reward``) grades completions from those columns. VLM GRPO
reaches these rows by import path (a recipe's ``data: world``), as generic code reaches the rest of the world.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmalign.world.questions import IMAGE_SIZE, KINDS, question_set
from mmalign.world.render import render

__all__ = ["world_vqa_dataset", "world_vqa_rows"]


def _pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray((pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def world_vqa_rows(
    n: int,
    split: str = "train",
    seed: int = 0,
    kinds: Sequence[str] | None = None,
    jitter: float = 0.0,
    size: int | None = None,
    frames: int | None = None,
    instruction: str | None = None,
    balanced: bool = False,
) -> list[dict[str, Any]]:
    """Rows of ``world_vqa_dataset`` as plain dicts (see there)."""
    size = IMAGE_SIZE if size is None else size
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size: expected an int of at least 8 pixels, got {size!r}")
    if frames is not None and not (isinstance(frames, int) and frames >= 1):
        raise ValueError(f"frames: expected None (images) or an int >= 1 (video frames), got {frames!r}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter: expected a number in [0, 1], got {jitter!r}")
    kinds = tuple(KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds: expected a non-empty subset of {KINDS}, got {list(kinds)!r}")
    questions = question_set(n, split, seed, kinds=kinds, balanced=balanced)
    rng = np.random.default_rng([seed, 8])
    scale = size / IMAGE_SIZE
    rows = []
    for q in questions:
        text = q.text if instruction is None else f"{q.text} {instruction}"
        row: dict[str, Any] = {
            "prompt": [{"role": "user", "content": text}], "question": q.text, "kind": q.kind,
            "scene": json.dumps(q.scene.to_dict(), sort_keys=True),
        }
        if frames is None:
            row["image"] = _pil(render(q.scene, size, jitter, rng))
        else:
            row["video"] = [_pil(render(q.scene, size, jitter, rng)) for _ in range(frames)]
        if q.box is not None:
            box = [round(v * scale) for v in q.box]
            row |= {"answer": "[{}, {}, {}, {}]".format(*box), "box": box, "image_size": [size, size]}
        else:
            row |= {"answer": q.answer, "box": None, "image_size": [size, size]}
        rows.append(row)
    return rows


def world_vqa_dataset(
    n: int,
    split: str = "train",
    seed: int = 0,
    kinds: Sequence[str] | None = None,
    jitter: float = 0.0,
    size: int | None = None,
    frames: int | None = None,
    instruction: str | None = None,
    balanced: bool = False,
):
    """A ``datasets.Dataset`` of ``n`` world questions of ``split`` (kinds taken in turn; see ``question_set``).

    Args:
        jitter: render jitter (0 to 1) of the images; the gold boxes are those of the un-jittered scene.
        size: render side in pixels (default the world's 32); boxes and box answers are scaled to it.
        frames: render each scene ``frames`` times into a ``video`` column instead of an ``image``.
        instruction: text appended to each question (e.g. the answer format a real model should use).
        balanced: each kind's gold answers taken in turn (see ``question_set``).
    """
    from datasets import Dataset

    return Dataset.from_list(world_vqa_rows(n, split, seed, kinds, jitter, size, frames, instruction, balanced))
