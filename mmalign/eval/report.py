"""The end-of-run report: before/after evaluation, reward curves and image grids, and ``summary.json``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from mmalign.eval.generator import GeneratorEval, mean_ci
from mmalign.eval.grid import mp4_available
from mmalign.files import write_text_atomic

__all__ = [
    "curves_figure", "eval_panels", "eval_rewards", "plot_curves", "read_metrics", "save_grids", "smooth",
    "write_report",
]


def read_metrics(path: str | Path, x: str = "epoch", kind: Literal["train", "eval"] = "train") -> list[dict[str, Any]]:
    """Rows of one kind of a ``metrics.jsonl`` keyed by ``x`` (the last row of an epoch or step wins when a
    resumed run repeated it), in order of ``x``: the training rows, or (``kind="eval"``) the held-out
    evaluations of ``eval_every``, the rows marked ``"eval": true``."""
    rows: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if bool(row.get("eval", False)) == (kind == "eval"):
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
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    path: str | Path,
    x: str = "epoch",
    eval_rows: Sequence[Mapping[str, Any]] = (),
) -> Path | None:
    """``curves_figure`` as a PNG at ``path``; None if nothing to plot."""
    fig = curves_figure(rows, keys, x, eval_rows)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def curves_figure(
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    x: str = "epoch",
    eval_rows: Sequence[Mapping[str, Any]] = (),
):
    """The curves as a matplotlib figure (None if nothing to plot).

    Top row: one panel per training metric against ``x`` (``epoch`` or ``step``), the raw points (± std where
    logged) and a smoothed line through them. Bottom row, when there are ``eval_rows`` (``read_metrics(...,
    kind="eval")``): the held-out evaluations against optimiser steps (``eval_panels``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(f"{k}/mean" in r or k in r for r in rows)]
    panels = eval_panels(eval_rows)
    if not keys and not panels:
        return None
    widths = [getattr(draw, "width", 1) for draw in panels]  # the reward panels carry a legend
    columns = max(len(keys), sum(widths))
    fig = plt.figure(figsize=(4 * columns, 3.2 * (bool(keys) + bool(panels))), layout="constrained")
    grid = fig.add_gridspec(bool(keys) + bool(panels), 1)
    if keys:
        top = grid[0].subgridspec(1, len(keys))
        xs = [r.get(x, i) for i, r in enumerate(rows)]
        for i, key in enumerate(keys):
            ax = fig.add_subplot(top[0, i])
            mean = [_number(r.get(f"{key}/mean", r.get(key))) for r in rows]
            ax.plot(xs, mean, "o", ms=3, alpha=0.4, label="raw")
            ax.plot(xs, smooth(mean), "-", lw=1.5, label="smoothed")
            if any(f"{key}/std" in r for r in rows):
                std = [_number(r.get(f"{key}/std"), 0.0) for r in rows]
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
            ax.set_title(key)
            ax.set_xlabel(X_LABELS.get(x, x))
            ax.grid(alpha=0.3)
            if i == 0:
                ax.legend(fontsize="small")
    if panels:
        bottom = grid[-1].subgridspec(1, len(panels), width_ratios=widths)
        for i, draw in enumerate(panels):
            ax = fig.add_subplot(bottom[0, i])
            draw(ax)
            if not ax.get_xlabel():
                ax.set_xlabel(X_LABELS["step"])
            ax.grid(alpha=0.3)
    return fig


def _number(value: Any, missing: float = float("nan")) -> float:
    """A logged value as a float; ``missing`` for an absent one or a null (TRL logs a reward that scored no
    completion of a step, such as one for grounding questions only, as null)."""
    return missing if value is None else float(value)


#: the eval reward whose peak the eval panel marks, when present (the shapes world's verifier)
GOLD = "gold"


def eval_rewards(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The rewards of evaluation rows (``eval/<name>`` with an ``eval/<name>/std``): the trained one first."""
    names = []
    for row in rows:
        for key in row:
            if key.startswith("eval/") and key.endswith("/std") and key[5:-4] not in names:
                names.append(key[5:-4])
    return sorted(names, key=lambda n: (n != "reward", n != GOLD))


def eval_panels(rows: Sequence[Mapping[str, Any]]) -> list:
    """Panel drawers (``draw(ax)``) for the evaluation rows of ``eval_every``, each against optimiser steps:

    - the rewards: each one's change from the first evaluation (the base policy) in units of its per-sample
      standard deviation there, so the trained reward and gold share an axis and "gold turns while the trained
      reward climbs" shows as lines parting; the legend gives each reward's raw first → last mean, and a dotted
      line marks the step where gold peaked (or the first eval reward beside the trained one, without gold);
    - the same against ``eval/kl_to_reference`` (KL to π_ref in nats), when logged: Gao et al.'s
      over-optimisation plot for a training run (gold against KL, beside the trained reward);
    - ``eval/distance_to_reference`` (pixel RMS from π_ref's samples of the same seeds);
    - ``eval/diversity/vendi``, when logged.
    """
    rows = [r for r in rows if "step" in r]
    names = eval_rewards(rows)
    if not rows or not names:
        return []
    steps = [r["step"] for r in rows]

    def values(key: str) -> list[float]:
        return [float(r.get(key, float("nan"))) for r in rows]

    def rewards(ax, xs: list[float] = steps, xlabel: str | None = None) -> None:
        marked = next((n for n in names if n == GOLD), next((n for n in names if n != "reward"), None))
        others = iter(f"C{i}" for i in (1, 2, 4, 5, 6, 7, 8, 9) * len(names))
        for name in names:
            raw = values(f"eval/{name}")
            base, spread = raw[0], float(rows[0].get(f"eval/{name}/std", float("nan")))
            scale = spread if spread == spread and spread > 0 else 1.0
            label = f"{name} (trained)" if name == "reward" else name
            label += f": {raw[0]:.3g} → {raw[-1]:.3g}"
            if name == "reward":
                style = {"lw": 2.4, "color": "C0"}
            elif name == marked:
                style = {"lw": 2.0, "color": "C3"}
            else:
                style = {"lw": 1.2, "alpha": 0.8, "color": next(others)}
            ax.plot(xs, [(v - base) / scale for v in raw], "o-", ms=3.5, label=label, **style)
        if marked is not None:
            raw = values(f"eval/{marked}")
            finite = [(v, x) for v, x in zip(raw, xs) if v == v]
            if finite:
                best, peak = max(finite, key=lambda pair: pair[0])
                where = f"step {peak}" if xlabel is None else f"{peak:.3g} nats"
                ax.axvline(peak, color="C3", ls=":", lw=1.2, label=f"{marked} peak: {where} ({best:.3g})")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title("held-out eval: trained reward vs gold" if marked == GOLD else "held-out eval: rewards")
        ax.set_ylabel("change from base (base per-sample SDs)")
        if xlabel is not None:
            ax.set_xlabel(xlabel)
        ax.legend(fontsize="small", loc="best")

    def against_kl(ax) -> None:
        rewards(ax, values("eval/kl_to_reference"), "KL(π‖π_ref) of the sampling chains (nats)")
        ax.set_title(ax.get_title() + ", against KL")

    def single(key: str, title: str, ylabel: str):
        def draw(ax) -> None:
            ax.plot(steps, values(key), "o-", ms=3.5, color="C2")
            ax.set_title(title)
            ax.set_ylabel(ylabel)

        return draw

    rewards.width = against_kl.width = 2
    panels = [rewards]
    if any(_number(r.get("eval/kl_to_reference")) == _number(r.get("eval/kl_to_reference")) for r in rows):
        panels.append(against_kl)
    if any("eval/distance_to_reference" in r for r in rows):
        panels.append(single("eval/distance_to_reference", "held-out: distance to reference", "pixel RMS vs π_ref"))
    if any("eval/diversity/vendi" in r for r in rows):
        panels.append(single("eval/diversity/vendi", "held-out: diversity (Vendi)", "mean over prompts"))
    return panels


def save_grids(
    before: GeneratorEval, after: GeneratorEval, path: str | Path, label_key: str | None = None, limit: int = 8
) -> Path:
    """Before (top row) and after (bottom row) for the same prompts and seeds, with the score under each image:
    the first sample of each of the first ``limit`` prompts (``metadata["group"]``), or the first ``limit``
    samples when the samples carry no group. Videos are shown as strips of frames, one clip a row with before on
    the left, and also played in ``grid.gif`` beside ``path`` (the same grid, one GIF frame per video frame) and in
    ``grid.mp4`` where ``mmalign[video]`` is installed."""
    from mmalign.eval.grid import image_grid, save_video_grid

    first_of_group: dict[object, int] = {}
    for i, meta in enumerate(before.batch.metadata):
        first_of_group.setdefault(meta.get("group", i), i)
    picked = list(first_of_group.values())[:limit]
    index = torch.tensor(picked, dtype=torch.long)
    images = torch.cat([before.batch.pixels[index], after.batch.pixels[index]])
    labels = []
    for tag, run in (("before", before), ("after", after)):
        for i in picked:
            score = f"\n{label_key} {float(run.scores[label_key][i]):.2f}" if label_key in run.scores else ""
            labels.append(f"{tag}: {run.batch.prompts[i]}{score}")
    if images.ndim == 5:  # a strip is four frames wide: one clip a row, before beside after
        order = torch.arange(len(images)).view(2, -1).T.flatten()
        images, labels = images[order], [labels[i] for i in order.tolist()]
        save_video_grid(images, Path(path).with_suffix(".gif"), labels, columns=2)
        if mp4_available():
            save_video_grid(images, Path(path).with_suffix(".mp4"), labels, columns=2)
    image_grid(images, labels, columns=2 if images.ndim == 5 else len(picked)).save(path)
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
    first sample of each of the first ``limit`` prompts (none for 0), videos as strips of frames and also played
    in ``grid.gif`` (``summary["grid_video"]``) and, with ``mmalign[video]``, ``grid.mp4`` (``summary["grid_mp4"]``,
    else None); the curves run against ``x`` (``epoch`` or ``step``).

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
        curves = plot_curves(read_metrics(metrics, x), curve_keys, run_dir / "curves.png", x,
                             eval_rows=read_metrics(metrics, "step", "eval"))
        summary["curves"] = curves.name if curves else None
    label = next((k for k in ("gold", "gold_video", *before.scores) if k in before.scores), None)
    summary["grid"] = save_grids(before, after, run_dir / "grid.png", label, limit).name if limit else None
    if limit and before.batch.pixels.ndim == 5:
        summary["grid_video"] = "grid.gif"
        summary["grid_mp4"] = "grid.mp4" if mp4_available() else None
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")  # last: it marks the report done
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
