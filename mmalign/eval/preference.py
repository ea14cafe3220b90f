"""Pairwise accuracy of a reward against human preferences, under the three published protocols.

The protocols differ only in how ties are treated, which moves reported accuracies by several points, so the
protocol is always named:

- ``hpdv2`` (HPSv2's test): a pair is wrong only when gold and reward strictly disagree (discordant); pairs
  tied in the gold ranks or in the scores count as right. Per prompt, accuracy = 1 − discordant / all pairs,
  averaged over prompts.
- ``pickapic`` (PickScore's test): the reward predicts a tie when ``|s_a − s_b| <= tie_threshold``, else the
  higher score; a pair is right when the prediction equals the label, ties included. The threshold is tuned
  on a validation split (``tune_tie_threshold``). PickScore thresholds the pair's softmax probabilities;
  ``|p_a − p_b| = tanh(|s_a − s_b| / 2)`` for logit scores, so a probability threshold ``t`` is the score
  threshold ``2·atanh(t)``.
- ``imagereward`` (ImageReward's test): pairs tied in gold are left out; tied scores count as wrong; pairs
  are pooled over prompts.

A pair with a non-finite score is wrong under every protocol: a reward that fails loses the pair.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "PROTOCOLS",
    "PreferenceRecord",
    "pairwise_accuracy",
    "ranking_accuracy",
    "read_pairs",
    "tune_tie_threshold",
]

Protocol = Literal["hpdv2", "pickapic", "imagereward"]
PROTOCOLS: tuple[str, ...] = ("hpdv2", "pickapic", "imagereward")
_LABELS = {"a": 1, "b": -1, "tie": 0}
Scores = Sequence[float] | torch.Tensor


@dataclass(frozen=True)
class PreferenceRecord:
    """One row of ``pairs.jsonl``: a prompt, its images and their gold ranks (1 = best, equal = tie)."""

    prompt: str
    images: list[str]
    ranks: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``"a"``, ``"b"`` or ``"tie"`` for a pair."""
        if len(self.images) != 2:
            raise ValueError(f"label: defined for pairs, this record ranks {len(self.images)} images")
        a, b = self.ranks
        return "a" if a < b else "b" if b < a else "tie"


def read_pairs(path: str | Path) -> list[PreferenceRecord]:
    """Read ``pairs.jsonl``: rows ``{prompt, a, b, label}`` or ``{prompt, images, ranks}``.

    ``label`` is ``"a"``, ``"b"`` or ``"tie"``; ``ranks`` give 1 to the best image and equal ranks to ties.
    Other keys (e.g. the scene) become metadata. Relative image paths are resolved against the file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: expected a pairs.jsonl file, got {str(path)!r} which does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: expected a JSON object, got invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{where}: expected an object with a string 'prompt'")
        if "images" in row:
            images, ranks = row.pop("images"), row.pop("ranks", None)
            if not isinstance(ranks, list) or not all(isinstance(r, int) for r in ranks):
                raise ValueError(
                    f"{where}: expected integer 'ranks' (1 = best) next to 'images', got {ranks!r}"
                )
        elif {"a", "b"} <= row.keys():
            label = row.pop("label", None)
            if label not in _LABELS:
                raise ValueError(f"{where}: expected label 'a', 'b' or 'tie', got {label!r}")
            images, ranks = [row.pop("a"), row.pop("b")], {"a": [1, 2], "b": [2, 1], "tie": [1, 1]}[label]
        else:
            raise ValueError(
                f"{where}: expected 'a', 'b' and 'label', or 'images' and 'ranks'; got {sorted(row)}"
            )
        if not isinstance(images, list) or len(images) < 2 or not all(isinstance(i, str) for i in images):
            raise ValueError(f"{where}: expected two or more image paths, got {images!r}")
        if len(ranks) != len(images):
            raise ValueError(f"{where}: expected one rank per image ({len(images)}), got {len(ranks)}")
        prompt = row.pop("prompt")
        records.append(PreferenceRecord(prompt, [str(path.parent / i) for i in images], ranks, row))
    return records


def _vector(values: Scores, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values.detach() if isinstance(values, torch.Tensor) else values)
    if tensor.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of scores, got shape {tuple(tensor.shape)}")
    return tensor.to("cpu", torch.float64)


def _pairs(scores_a: Scores, scores_b: Scores, labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Score differences ``s_a − s_b`` and gold signs (+1 a, −1 b, 0 tie)."""
    a, b = _vector(scores_a, "scores_a"), _vector(scores_b, "scores_b")
    if not len(a) == len(b) == len(labels):
        raise ValueError(
            f"scores_a, scores_b, labels: expected equal lengths, got {len(a)}, {len(b)}, {len(labels)}"
        )
    bad = sorted({str(label) for label in labels if label not in _LABELS})
    if bad:
        raise ValueError(f"labels: expected 'a', 'b' or 'tie', got {bad[:5]}")
    return a - b, torch.tensor([_LABELS[label] for label in labels], dtype=torch.float64)


def pairwise_accuracy(
    scores_a: Scores,
    scores_b: Scores,
    labels: Sequence[str],
    protocol: Protocol = "pickapic",
    tie_threshold: float = 0.0,
) -> float:
    """Fraction of pairs the reward gets right under ``protocol`` (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if tie_threshold != 0 and protocol != "pickapic":
        raise ValueError(
            f"tie_threshold: only the pickapic protocol predicts ties, got {tie_threshold} for {protocol}"
        )
    if not tie_threshold >= 0:
        raise ValueError(f"tie_threshold: expected a number >= 0, got {tie_threshold!r}")
    diff, gold = _pairs(scores_a, scores_b, labels)
    if len(diff) == 0:
        raise ValueError("labels: expected at least one pair, got none")
    finite = torch.isfinite(diff)
    if protocol == "hpdv2":
        correct = finite & (gold * diff.sign() >= 0)
    elif protocol == "pickapic":
        predicted = torch.where(diff.abs() <= tie_threshold, 0.0, diff.sign())
        correct = finite & (predicted == gold)
    else:
        kept = gold != 0
        if not bool(kept.any()):
            raise ValueError("labels: the imagereward protocol leaves out gold ties, and every pair is a tie")
        correct = (finite & (diff.sign() == gold))[kept]
    return float(correct.double().mean())


def ranking_accuracy(
    scores: Sequence[Scores],
    ranks: Sequence[Sequence[int]],
    protocol: Protocol = "hpdv2",
    tie_threshold: float = 0.0,
) -> float:
    """Accuracy over every pair within each prompt's group of ranked images (ranks: 1 = best, equal = tie).

    ``hpdv2`` averages the per-prompt accuracies; the other protocols pool the pairs of all prompts. A pair
    of images is a group of two, so ``read_pairs`` records of both kinds go through this one function.
    """
    if len(scores) != len(ranks):
        raise ValueError(
            f"scores, ranks: expected one group each per prompt, got {len(scores)} and {len(ranks)}"
        )
    groups = []
    for g, (group_scores, group_ranks) in enumerate(zip(scores, ranks)):
        values = _vector(group_scores, f"scores[{g}]")
        if len(values) != len(group_ranks):
            raise ValueError(
                f"ranks[{g}]: expected one rank per score ({len(values)}), got {len(group_ranks)}"
            )
        i, j = torch.triu_indices(len(values), len(values), offset=1)
        labels = [
            "a" if group_ranks[p] < group_ranks[q] else "b" if group_ranks[p] > group_ranks[q] else "tie"
            for p, q in zip(i.tolist(), j.tolist())
        ]
        if labels:
            groups.append((values[i], values[j], labels))
    if not groups:
        raise ValueError("scores: expected at least one group with two or more images, got none")
    if protocol == "hpdv2":
        return sum(pairwise_accuracy(a, b, labels, protocol) for a, b, labels in groups) / len(groups)
    return pairwise_accuracy(
        torch.cat([a for a, _, _ in groups]),
        torch.cat([b for _, b, _ in groups]),
        [label for _, _, labels in groups for label in labels],
        protocol,
        tie_threshold,
    )


def tune_tie_threshold(scores_a: Scores, scores_b: Scores, labels: Sequence[str]) -> float:
    """The ``tie_threshold`` that maximises ``pickapic`` accuracy on these (validation) pairs; smallest if several.

    Accuracy only changes at the pairs' ``|s_a − s_b|``, so those and 0 are the candidates.
    """
    diff, gold = _pairs(scores_a, scores_b, labels)
    gap, finite = diff.abs(), torch.isfinite(diff)
    candidates = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), gap[finite]]))  # sorted
    tie_gaps = gap[finite & (gold == 0)].sort().values
    right_gaps = gap[finite & (gold != 0) & (diff.sign() == gold)].sort().values
    ties_right = torch.searchsorted(tie_gaps, candidates, right=True)  # tie labels with |Δ| <= t
    orders_right = len(right_gaps) - torch.searchsorted(right_gaps, candidates, right=True)  # |Δ| > t
    return float(candidates[torch.argmax(ties_right + orders_right)])
