"""How often a reward agrees with preference labels: the ``mmalign eval reward`` task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from mmalign.eval.preference import PROTOCOLS, PreferenceRecord, ranking_accuracy
from mmalign.eval.scoring import score_batch
from mmalign.media import MediaBatch
from mmalign.rewards import Reward

__all__ = ["records_batch", "reward_accuracy", "format_accuracy"]


def records_batch(records: Sequence[PreferenceRecord]) -> MediaBatch:
    """Every image of every record in one batch, each with its record's prompt and metadata."""
    images, prompts, metadata = [], [], []
    for record in records:
        for path in record.images:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
            prompts.append(record.prompt)
            metadata.append({**record.metadata, "file": Path(path).name})
    return MediaBatch.from_pil(images, prompts, metadata)


def reward_accuracy(
    records: Sequence[PreferenceRecord],
    rewards: Mapping[str, Reward],
    protocols: Sequence[str] = PROTOCOLS,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """``{reward: {protocol: accuracy}}`` over the records' gold ranks; images are scored once per reward."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"protocols: expected some of {list(PROTOCOLS)}, got {unknown}")
    batch = records_batch(records)
    columns = score_batch(rewards, batch, batch_size, progress)
    sizes = [len(r.images) for r in records]
    ranks = [r.ranks for r in records]
    out = {}
    for name in rewards:
        groups = list(torch.split(columns[name], sizes))
        out[name] = {protocol: ranking_accuracy(groups, ranks, protocol) for protocol in protocols}
    return out


def format_accuracy(table: Mapping[str, Mapping[str, float]]) -> str:
    protocols = list(next(iter(table.values())))
    width = max(len("reward"), *(len(n) for n in table))
    lines = [f"{'reward':<{width}}  " + "  ".join(f"{p:>11}" for p in protocols)]
    lines.append("-" * len(lines[0]))
    lines += [f"{n:<{width}}  " + "  ".join(f"{row[p]:>11.4f}" for p in protocols) for n, row in table.items()]
    return "\n".join(lines)
