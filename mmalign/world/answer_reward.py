"""The world's VQA answer accuracy as a reward (``world_accuracy``): rule-graded against gold metadata; and the
IoU of grounding answers alone (``world_iou``), the graded signal that accuracy's IoU ≥ 0.5 threshold hides.

Completions are graded exactly as ``mmalign.world.questions.score`` grades the world VLM's answers, reading the
gold ``answer``, ``kind`` and grounding ``box`` that ``world_vqa_rows`` put in each row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmalign.rewards.rules import RuleReward, answer_matches, box_iou, extract_answer, parse_box, rescale_box

__all__ = ["WorldAnswerAccuracy", "WorldBoxIoU"]


class WorldAnswerAccuracy(RuleReward):
    """1 when a completion answers its world question: grounding by IoU ≥ 0.5 with ``box``, counts as numbers,
    everything else by normalised text; as ``mmalign.world.questions.score``.

    Reads ``answer``, ``kind`` and for grounding ``box`` (with ``processor_size`` and ``image_size`` when the
    model saw a resized image) from the metadata. Component ``iou``: the IoU of grounding answers (NaN for
    other kinds).
    """

    name = "world_accuracy"

    def __init__(self, iou_threshold: float = 0.5) -> None:
        super().__init__()
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold: expected a number in (0, 1], got {iou_threshold!r}")
        self.iou_threshold = float(iou_threshold)

    def score_one(self, completion: str, meta: Mapping[str, Any]) -> dict[str, float]:
        answer = extract_answer(completion)
        if _is_grounding(meta):
            iou = _grounding_iou(answer, meta)
            return {"score": float(iou >= self.iou_threshold), "iou": iou}
        if "answer" not in meta:
            raise ValueError(f"answer: expected the gold 'answer' in the sample's metadata, found keys {sorted(meta)}")
        mode = "numeric" if meta.get("kind") == "count" else "normalized"
        return {"score": float(answer_matches(answer, meta["answer"], mode)), "iou": float("nan")}


def _is_grounding(meta: Mapping[str, Any]) -> bool:
    kind = meta.get("kind")
    return kind == "grounding" or (kind is None and meta.get("box") is not None)


def _grounding_iou(answer: str | None, meta: Mapping[str, Any]) -> float:
    """IoU of the answer's box (0 when it holds none) with the gold ``box``, in the rendered image's pixels."""
    gold = meta.get("box")
    if gold is None:
        raise ValueError(f"box: expected the gold box of a grounding question, found keys {sorted(meta)}")
    box = None if answer is None else parse_box(answer)
    if box is not None and meta.get("processor_size") is not None:
        box = rescale_box(box, meta["processor_size"], meta["image_size"])
    return 0.0 if box is None else box_iou(box, tuple(float(v) for v in gold))


class WorldBoxIoU(RuleReward):
    """The IoU of a grounding answer's box with the gold ``box`` (0 for no box); NaN for every other kind, so a
    trainer leaves this reward out there (TRL: ``None``) and it adds a graded signal on grounding alone."""

    name = "world_iou"

    def score_one(self, completion: str, meta: Mapping[str, Any]) -> dict[str, float]:
        return {"score": _grounding_iou(extract_answer(completion), meta) if _is_grounding(meta) else float("nan")}
