"""Score a folder of images with rewards: the ``mmalign score`` task."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from mmalign.config import Recipe, check_device
from mmalign.media import MediaBatch
from mmalign.rewards import Reward, build
from mmalign.rewards.composite import unique_names
from mmalign.rewards.registry import RewardSpecs

__all__ = ["ScoreRecipe", "ScoreResult", "score_batch", "run_score", "summarize", "format_summary"]

class ScoreRecipe(Recipe):
    """Rewards × a folder of images with prompts → a table of scores."""

    task: Literal["score"] = "score"
    images: str = Field(description="folder of images (png, jpg, webp, bmp)")
    prompts: str | None = Field(None, description="prompts file (.txt or .jsonl); default: looked up in the folder")
    rewards: RewardSpecs = Field(min_length=1, description="reward specs; each becomes columns of the table")
    batch_size: int = Field(16, ge=1, description="images per reward call")
    size: int | None = Field(None, ge=1, description="resize images to this square size first")
    on_error: Literal["stop", "skip"] = Field("stop", description="a file that is not a readable image: stop, or skip it")
    device: str = Field("cpu", description="torch device for the rewards")
    out: str = Field("scores.csv", description="output table, .csv or .json")

    @field_validator("out")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if Path(value).suffix not in (".csv", ".json"):
            raise ValueError(f"expected a .csv or .json file, got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device(value)


@dataclass
class ScoreResult:
    """Per-image columns (``reward`` and ``reward/component``) and their summary statistics."""

    batch: MediaBatch
    columns: dict[str, torch.Tensor]
    summary: dict[str, dict[str, float]]

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for i, (prompt, meta) in enumerate(zip(self.batch.prompts, self.batch.metadata)):
            row: dict[str, Any] = {"file": meta.get("file", str(i)), "prompt": prompt}
            row.update({name: float(f"{float(values[i]):.7g}") for name, values in self.columns.items()})
            rows.append(row)
        return rows


def score_batch(
    rewards: Mapping[str, Reward], batch: MediaBatch, batch_size: int = 16, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Run each reward over ``batch`` in chunks; returns ``{name: (B,), name/component: (B,)}`` on the CPU.

    Rewards whose scope is ``set`` see the whole batch at once; the others see chunks of ``batch_size``.
    """
    columns: dict[str, list[torch.Tensor]] = {}
    steps = sum(1 if r.scope == "set" else math.ceil(len(batch) / batch_size) for r in rewards.values())
    with torch.no_grad(), tqdm(total=steps, desc="scoring", unit="batch", disable=not progress) as bar:
        for name, reward in rewards.items():
            chunk = len(batch) if reward.scope == "set" else batch_size
            for start in range(0, len(batch), chunk):
                out = reward(batch[start : start + chunk])
                columns.setdefault(name, []).append(out.scores.float().cpu())
                for key, value in out.components.items():
                    columns.setdefault(f"{name}/{key}", []).append(value.float().cpu())
                if out.uncertainty is not None:
                    columns.setdefault(f"{name}/uncertainty", []).append(out.uncertainty.float().cpu())
                bar.update(1)
    return {name: torch.cat(parts) for name, parts in columns.items()}


def summarize(columns: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Mean, std, min, max over finite values, and how many values were not finite, per column."""
    summary = {}
    for name, values in columns.items():
        finite = values[torch.isfinite(values)].double()
        n = finite.numel()
        summary[name] = {
            "mean": float(finite.mean()) if n else math.nan,
            "std": float(finite.std()) if n > 1 else 0.0 if n else math.nan,
            "min": float(finite.min()) if n else math.nan,
            "max": float(finite.max()) if n else math.nan,
            "non_finite": int(values.numel() - n),
        }
    return summary


def format_summary(summary: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table of a summary, one row per column."""
    width = max(len("column"), *(len(n) for n in summary))
    header = f"{'column':<{width}}  {'mean':>10}  {'std':>10}  {'min':>10}  {'max':>10}  {'non-finite':>10}"
    lines = [header, "-" * len(header)]
    for name, s in summary.items():
        lines.append(
            f"{name:<{width}}  {s['mean']:>10.4g}  {s['std']:>10.4g}  {s['min']:>10.4g}  {s['max']:>10.4g}"
            f"  {s['non_finite']:>10d}"
        )
    return "\n".join(lines)


def build_rewards(specs: Sequence[Any], device: str = "cpu") -> dict[str, Reward]:
    """Named rewards from specs, moved to ``device``; names made unique for the table's columns."""
    check_device(device)
    rewards = [build(spec).to(device) for spec in specs]
    return dict(zip(unique_names(rewards), rewards))


def run_score(recipe: ScoreRecipe, progress: bool = True) -> ScoreResult:
    """Load the folder, score it with every reward, write ``recipe.out`` and return the result."""
    batch = MediaBatch.from_folder(recipe.images, recipe.prompts, size=recipe.size, on_error=recipe.on_error)
    rewards = build_rewards(recipe.rewards, recipe.device)
    columns = score_batch(rewards, batch.to(recipe.device), recipe.batch_size, progress)
    result = ScoreResult(batch, columns, summarize(columns))
    write_result(result, Path(recipe.out))
    return result


def write_result(result: ScoreResult, path: Path) -> None:
    """CSV (one row per image) or JSON (rows and summary), chosen by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = result.rows()
    if path.suffix == ".json":
        path.write_text(json.dumps({"rows": rows, "summary": result.summary}, indent=2) + "\n")
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
