"""Rule rewards for VLM completions (VLM-R1 style): answer accuracy, box IoU, strict format, length.

Each reward reads ``batch.completions[i]`` and its gold data from ``batch.metadata[i]``; the work is done by
pure functions over strings, so TRL reward functions and tests can call them directly. A malformed completion
(empty, missing tags, unparsable, ``NaN``, an inverted or empty box) scores 0, never raises and never yields
NaN; malformed *gold* data is a dataset bug and raises a ``ValueError`` naming the sample and key.

The answer is the text of the last ``<answer>…</answer>`` pair. Without one, ``require_tags=False`` (the
default) reads the whole completion as the answer, minus complete ``<think>…</think>`` blocks and stray tags,
so accuracy and format stay separate signals; ``require_tags=True`` scores such completions 0.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from mmalign.media import MediaBatch
from mmalign.rewards.base import Reward, RewardOutput

__all__ = [
    "RuleReward",
    "AnswerAccuracy",
    "BoxIoU",
    "StrictFormat",
    "LengthPenalty",
    "extract_answer",
    "normalize_text",
    "parse_number",
    "choice_index",
    "answer_matches",
    "parse_box",
    "rescale_box",
    "box_iou",
    "format_ok",
    "completion_length",
    "length_penalty",
]

Box = tuple[float, float, float, float]
AccuracyMode = Literal["exact", "normalized", "numeric", "choice"]
LengthUnit = Literal["words", "chars"]
_MODES = ("exact", "normalized", "numeric", "choice")

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S)
_TAG = re.compile(r"</?(?:think|answer)>")
_STRICT = {
    True: re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.S),
    False: re.compile(r"\s*<answer>(.*?)</answer>\s*", re.S),
}
# No thousands separators here: "[10,200,30,40]" is four numbers. parse_number drops "1,000"-style commas first.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_BRACKETED_BOX = re.compile(r"\[\s*" + r"\s*,\s*".join([f"({_NUMBER.pattern})"] * 4) + r"\s*\]")
_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
)
_NUMBER_WORDS = {word: float(i) for i, word in enumerate(_WORDS.split())}
_NUMBER_OR_WORD = re.compile(rf"{_NUMBER.pattern}|(?<![\w-])(?:{'|'.join(_NUMBER_WORDS)})(?![\w-])", re.I)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_BARE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:]?")
_LETTER_THEN_TEXT = re.compile(r"(?:\(([A-Za-z])\)|([A-Z])[.:)])\s")


# --------------------------------------------------------------------------------------------- answers
def extract_answer(completion: str, require_tags: bool = False) -> str | None:
    """The answer text of a completion (see the module docstring); None when there is none."""
    found = _ANSWER.findall(completion)
    if found:
        answer = found[-1]
    elif require_tags:
        return None
    else:
        answer = _TAG.sub(" ", _THINK_BLOCK.sub(" ", completion))
    return answer.strip() or None


def normalize_text(text: str) -> str:
    """Lower case, punctuation to spaces, articles (a, an, the) dropped, whitespace collapsed."""
    text = "".join(
        " " if ch in string.punctuation or unicodedata.category(ch).startswith("P") else ch
        for ch in text.lower()
    )
    return " ".join(_ARTICLES.sub(" ", text).split())


def parse_number(text: str) -> float | None:
    """The last number in ``text``: digits ("3", "-2.5", "1,000", "1e3") or a word from zero to twenty.

    Returns None when there is none or it is not finite ("NaN" and "inf" are not numbers here).
    """
    found = _NUMBER_OR_WORD.findall(_THOUSANDS.sub("", text))
    if not found:
        return None
    last = found[-1].lower()
    value = _NUMBER_WORDS[last] if last in _NUMBER_WORDS else float(last)
    return value if math.isfinite(value) else None


def choice_index(text: str, choices: Sequence[str]) -> int | None:
    """Index of the option ``text`` picks: a letter ("B", "(b)", "B.", "B) red") or an option's text.

    A bare letter may be lower case; a letter followed by text needs brackets or punctuation ("(B) red",
    "B. red") so that "A red circle" is read as text. Text matches an option after ``normalize_text``.
    """
    text = text.strip()
    match = _BARE_LETTER.fullmatch(text) or _LETTER_THEN_TEXT.match(text)
    if match:
        index = ord(next(g for g in match.groups() if g).upper()) - ord("A")
        return index if index < len(choices) else None
    wanted = normalize_text(text)
    return next((i for i, choice in enumerate(choices) if normalize_text(choice) == wanted), None)


def answer_matches(
    answer: str | None,
    gold: Any,
    mode: AccuracyMode = "normalized",
    choices: Sequence[str] | None = None,
    tolerance: float = 0.0,
) -> bool:
    """Whether ``answer`` matches ``gold``; a list of golds matches if any one does.

    exact: equal after stripping; normalized: equal after ``normalize_text``; numeric: ``parse_number`` of
    both within ``tolerance`` (absolute); choice: the same option of ``choices`` (gold: a 0-based index, a
    letter or the option's text). Gold is checked whatever the answer, so a dataset bug surfaces at once.
    """
    golds = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    if mode == "exact":
        wanted = {str(g).strip() for g in golds}
        return answer is not None and answer in wanted
    if mode == "normalized":
        wanted = {normalize_text(str(g)) for g in golds}
        return answer is not None and normalize_text(answer) in wanted
    if mode == "numeric":
        numbers = [_gold_number(g) for g in golds]
        value = None if answer is None else parse_number(answer)
        return value is not None and any(abs(value - n) <= tolerance for n in numbers)
    if mode == "choice":
        if not choices:
            raise ValueError(
                f"choices: expected a non-empty list of options for mode 'choice', got {choices!r}"
            )
        indices = {_gold_choice(g, choices) for g in golds}
        return answer is not None and choice_index(answer, choices) in indices
    raise ValueError(f"mode: expected one of {', '.join(_MODES)}, got {mode!r}")


def _gold_number(gold: Any) -> float:
    value = float(gold) if isinstance(gold, (int, float)) and not isinstance(gold, bool) else None
    if value is None and isinstance(gold, str):
        value = parse_number(gold)
    if value is None or not math.isfinite(value):
        raise ValueError(f"answer: expected a finite number or a string holding one, got {gold!r}")
    return value


def _gold_choice(gold: Any, choices: Sequence[str]) -> int:
    index = gold if isinstance(gold, int) and not isinstance(gold, bool) else None
    if index is None and isinstance(gold, str):
        index = choice_index(gold, choices)
    if index is None or not 0 <= index < len(choices):
        raise ValueError(
            f"answer: expected an option of {list(choices)} (index, letter or text), got {gold!r}"
        )
    return index


# ----------------------------------------------------------------------------------------------- boxes
def parse_box(text: str) -> Box | None:
    """``(x1, y1, x2, y2)`` from the first bracketed list of four numbers, else from exactly four numbers."""
    match = _BRACKETED_BOX.search(text)
    numbers = match.groups() if match else _NUMBER.findall(text)
    if len(numbers) != 4:
        return None
    box = tuple(float(n) for n in numbers)
    return box if all(math.isfinite(v) for v in box) else None


def rescale_box(box: Box, processor_size: Sequence[float], image_size: Sequence[float]) -> Box:
    """A box in the pixels the model saw (``processor_size``, (w, h)) in the original image's pixels."""
    (fw, fh), (tw, th) = _size(processor_size, "processor_size"), _size(image_size, "image_size")
    x1, y1, x2, y2 = box
    return (x1 * tw / fw, y1 * th / fh, x2 * tw / fw, y2 * th / fh)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union; 0 when either box is inverted, empty or not finite."""
    if not all(math.isfinite(v) for v in (*a, *b)) or _area(a) <= 0 or _area(b) <= 0:
        return 0.0
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    return inter / (_area(a) + _area(b) - inter)


def _area(box: Box) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def _size(size: Any, key: str) -> tuple[float, float]:
    ok = isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, (int, float)) for v in size)
    if not ok or not all(math.isfinite(v) and v > 0 for v in size):
        raise ValueError(f"{key}: expected (width, height) with positive numbers, got {size!r}")
    return float(size[0]), float(size[1])


def _gold_box(box: Any) -> Box:
    ok = isinstance(box, Sequence) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
    if not ok or not all(math.isfinite(v) for v in box) or _area(box) <= 0:
        raise ValueError(f"box: expected [x1, y1, x2, y2] with x1 < x2 and y1 < y2, got {box!r}")
    return tuple(float(v) for v in box)


# --------------------------------------------------------------------------------------- format, length
def format_ok(completion: str, think: bool = True) -> bool:
    """``<think>…</think><answer>…</answer>`` (or ``<answer>…</answer>`` alone when ``think`` is False).

    Exactly one of each tag pair, in that order, each with non-blank content and no nested tags, nothing
    but whitespace around them.
    """
    match = _STRICT[bool(think)].fullmatch(completion)
    return bool(match) and all(part.strip() and not _TAG.search(part) for part in match.groups())


def completion_length(completion: str, unit: LengthUnit = "words") -> int:
    """Whitespace-separated words (a tokenizer-free stand-in for tokens) or characters."""
    return len(completion.split()) if unit == "words" else len(completion)


def length_penalty(length: int, target: int, limit: int) -> float:
    """0 up to ``target``, then linearly down to −1 at ``limit``, −1 beyond (DAPO's overlong shaping)."""
    return -min(max(length - target, 0) / (limit - target), 1.0)


# --------------------------------------------------------------------------------------------- rewards
class RuleReward(Reward):
    """Loops over completions; ``score_one`` returns ``{"score": …, other components…}`` for one sample."""

    scope = "sample"
    differentiable = False

    def score_one(self, completion: str, meta: Mapping[str, Any]) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, batch: MediaBatch) -> RewardOutput:
        if batch.completions is None:
            raise ValueError(
                f"completions: {self.name} scores VLM text, expected batch.completions, got None"
            )
        rows = []
        for i, (completion, meta) in enumerate(zip(batch.completions, batch.metadata)):
            try:
                rows.append(self.score_one(completion, meta))
            except ValueError as err:
                raise ValueError(f"metadata[{i}]: {err}") from err
        columns = {
            k: torch.tensor([r[k] for r in rows], dtype=torch.float32, device=batch.device) for k in rows[0]
        }
        return RewardOutput(columns.pop("score"), columns)


def _gold(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(
            f"{key}: expected the gold {key!r} in the sample's metadata, found keys {sorted(meta)}"
        )
    return meta[key]


class AnswerAccuracy(RuleReward):
    """1 when the completion's answer matches ``metadata["answer"]``, else 0 (exact, normalized, numeric, choice)."""

    name = "answer_accuracy"

    def __init__(
        self, mode: AccuracyMode = "normalized", tolerance: float = 0.0, require_tags: bool = False
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {', '.join(_MODES)}, got {mode!r}")
        if not tolerance >= 0:
            raise ValueError(f"tolerance: expected a number >= 0, got {tolerance!r}")
        self.mode, self.tolerance, self.require_tags = mode, float(tolerance), require_tags

    def score_one(self, completion: str, meta: Mapping[str, Any]) -> dict[str, float]:
        choices = _gold(meta, "choices") if self.mode == "choice" else None
        answer = extract_answer(completion, self.require_tags)
        return {
            "score": float(answer_matches(answer, _gold(meta, "answer"), self.mode, choices, self.tolerance))
        }


class BoxIoU(RuleReward):
    """IoU of the answer's box with ``metadata["box"]``, rescaled from ``processor_size`` to ``image_size``.

    With ``threshold`` the score is 1 when IoU ≥ threshold, else 0, and the IoU is kept as component ``iou``.
    Without ``processor_size`` in the metadata the answer's box is taken to be in original pixels already.
    """

    name = "box_iou"

    def __init__(self, threshold: float | None = None, require_tags: bool = False) -> None:
        super().__init__()
        if threshold is not None and not 0 < threshold <= 1:
            raise ValueError(f"threshold: expected a number in (0, 1] or None, got {threshold!r}")
        self.threshold, self.require_tags = threshold, require_tags

    def score_one(self, completion: str, meta: Mapping[str, Any]) -> dict[str, float]:
        gold = _gold_box(_gold(meta, "box"))
        answer = extract_answer(completion, self.require_tags)
        box = None if answer is None else parse_box(answer)
        if box is not None and "processor_size" in meta:
            box = rescale_box(box, meta["processor_size"], _gold(meta, "image_size"))
        iou = 0.0 if box is None else box_iou(box, gold)
        if self.threshold is None:
            return {"score": iou}
        return {"score": float(iou >= self.threshold), "iou": iou}


class StrictFormat(RuleReward):
    """1 for ``<think>…</think><answer>…</answer>`` exactly (``think=False``: ``<answer>…</answer>``), else 0."""

    name = "format"

    def __init__(self, think: bool = True) -> None:
        super().__init__()
        self.think = bool(think)

    def score_one(self, completion: str, meta: Mapping[str, Any]) -> dict[str, float]:
        return {"score": float(format_ok(completion, self.think))}


class LengthPenalty(RuleReward):
    """0 up to ``target`` words (or characters), linearly down to −1 at ``limit`` (default 2·target)."""

    name = "length_penalty"

    def __init__(self, target: int, limit: int | None = None, unit: LengthUnit = "words") -> None:
        super().__init__()
        limit = 2 * target if limit is None else limit
        if not (isinstance(target, int) and isinstance(limit, int) and 0 <= target < limit):
            raise ValueError(
                f"target, limit: expected integers with 0 <= target < limit, got {target!r}, {limit!r}"
            )
        if unit not in ("words", "chars"):
            raise ValueError(f"unit: expected 'words' or 'chars', got {unit!r}")
        self.target, self.limit, self.unit = target, limit, unit

    def score_one(self, completion: str, meta: Mapping[str, Any]) -> dict[str, float]:
        length = completion_length(completion, self.unit)
        return {"score": length_penalty(length, self.target, self.limit), "length": float(length)}
