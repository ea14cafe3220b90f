"""The end-of-run report: before/after evaluation, reward curves and image grids, and ``summary.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmalign.eval.generator import GeneratorEval, mean_ci

__all__ = ["plot_curves", "read_metrics", "save_grids", "smooth", "write_report"]


def read_metrics(path: str | Path, x: str = "epoch") -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` keyed by ``x`` (the last row of an epoch or step wins when a resumed run
    repeated it), in order of ``x``."""
    rows: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row.get(x, len(rows))] = row
    return [rows[k] for k in sorted(rows)]


def smooth(values: Sequence[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's debiased exponential moving average (NaNs skipped): the trend through noisy points."""
    out, average, norm = [], 0.0, 0.0
    for value in values:
        if value == value:  # not NaN
            average, norm = weight * average + (1 - weight) * value, weight * norm + (1 - weight)
        out.append(average / norm if norm else float("nan"))
    return out


#: what each x key counts, for the axis label
X_LABELS = {"epoch": "epoch (one rollout + update)", "step": "optimiser step"}


def plot_curves(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], path: str | Path, x: str = "epoch"
) -> Path | None:
    """One panel per metric against ``x`` (``epoch`` or ``step``): the raw points (± std where logged) and a
    smoothed line through them, as a PNG; None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(f"{k}/mean" in r or k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    xs = [r.get(x, i) for i, r in enumerate(rows)]
    for ax, key in zip(axes[0], keys):
        mean = [float(r.get(f"{key}/mean", r.get(key, float("nan")))) for r in rows]
        ax.plot(xs, mean, "o", ms=3, alpha=0.4, label="raw")
        ax.plot(xs, smooth(mean), "-", lw=1.5, label="smoothed")
        if any(f"{key}/std" in r for r in rows):
            std = [r.get(f"{key}/std", 0.0) for r in rows]
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
        ax.set_title(key)
        ax.set_xlabel(X_LABELS.get(x, x))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def save_grids(
    before: GeneratorEval, after: GeneratorEval, path: str | Path, label_key: str | None = None, limit: int = 8
) -> Path:
    """Before (top row) and after (bottom row) for the same prompts and seeds, with the score under each image."""
    from mmalign.eval.grid import image_grid

    n = min(limit, len(before.batch))
    images = torch.cat([before.batch.pixels[:n], after.batch.pixels[:n]])
    labels = []
    for tag, run in (("before", before), ("after", after)):
        for i in range(n):
            score = f"\n{label_key} {float(run.scores[label_key][i]):.2f}" if label_key in run.scores else ""
            labels.append(f"{tag}: {run.batch.prompts[i]}{score}")
    image_grid(images, labels, columns=n).save(path)
    return Path(path)


def write_report(
    run_dir: str | Path,
    before: GeneratorEval,
    after: GeneratorEval,
    curve_keys: Sequence[str],
    extra: Mapping[str, Any] | None = None,
    limit: int = 8,
    x: str = "epoch",
) -> dict[str, Any]:
    """``summary.json`` (before/after mean and 95% CI per reward, and the change), ``curves.png`` and ``grid.png``.

    ``before`` and ``after`` score the same prompts with the same seeds (or the same questions), so
    ``paired_change`` gives the mean and 95% CI of the per-sample differences: far narrower than the two
    separate intervals, and the one to read when asking whether training moved a score. The grid shows the
    first ``limit`` samples (none for 0); the curves run against ``x`` (``epoch`` or ``step``).

    When both carry per-prompt diversity (``GeneratorEval.add_diversity``), its columns join ``before``,
    ``after``, ``change`` and ``paired_change`` (paired over prompts; ``n`` counts prompts), the per-prompt
    values go to ``diversity_per_prompt`` and ``diversity_ratio`` is after/before of the mean Vendi score.
    """
    run_dir = Path(run_dir)
    summary: dict[str, Any] = {"before": before.summary(), "after": after.summary(), **(extra or {})}
    summary["change"] = {
        k: summary["after"][k]["mean"] - summary["before"][k]["mean"] for k in summary["before"] if k in summary["after"]
    }
    columns_before, columns_after = {**before.scores, **before.diversity}, {**after.scores, **after.diversity}
    summary["paired_change"] = {
        k: mean_ci(columns_after[k] - columns_before[k]) for k in columns_before
        if k in columns_after and columns_after[k].shape == columns_before[k].shape
    }
    if before.diversity and after.diversity:
        summary.update(_diversity_summary(before, after, summary))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        curves = plot_curves(read_metrics(metrics, x), curve_keys, run_dir / "curves.png", x)
        summary["curves"] = curves.name if curves else None
    label = next((k for k in ("gold", *before.scores) if k in before.scores), None)
    summary["grid"] = save_grids(before, after, run_dir / "grid.png", label, limit).name if limit else None
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

def _diversity_summary(before: GeneratorEval, after: GeneratorEval, summary: Mapping[str, Any]) -> dict[str, Any]:
    """``diversity_ratio`` (after/before of the mean Vendi score; None without embeddings) and the per-prompt
    values."""
    vendi = "diversity/vendi"
    ratio = None
    if vendi in summary["before"] and vendi in summary["after"] and summary["before"][vendi]["mean"] > 0:
        ratio = summary["after"][vendi]["mean"] / summary["before"][vendi]["mean"]
    per_prompt = {"prompts": before.group_prompts()}
    for tag, run in (("before", before), ("after", after)):
        per_prompt[tag] = {k: [round(float(v), 6) for v in values] for k, values in run.diversity.items()}
    return {"diversity_ratio": ratio, "diversity_per_prompt": per_prompt}
