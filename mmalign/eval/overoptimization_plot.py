"""The over-optimisation figure: gold and each proxy's own score of the best-of-n pick against KL.

The left panel answers "does gold peak and fall while the proxy keeps rising?", the middle one shows the proxy
rising, and the right one (when the curves carry a baseline) gold's paired difference from the group's first
proxy: whether an ensemble beats the single reward on the same samples. Proxies named ``group/name`` are drawn one row per group (e.g. ``clean/uwo`` and ``noisy/uwo``), with one
colour per ``name`` across rows, so that the same objective on two data sets compares at a glance.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mmalign.files import write_atomic

__all__ = ["overoptimization_figure", "plot_overoptimization"]


def _groups(names: list[str], reference: str | None) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in names:
        if name != reference:
            group, _, _ = name.rpartition("/")
            groups.setdefault(group, []).append(name)
    return groups or {"": []}


def overoptimization_figure(result: Mapping, reference: str | None = None, title: str | None = None):
    """The figure of ``overoptimization_curves``' ``result``: a row per proxy group, gold, the proxy's own gain
    and (with baselines) gold's paired difference from the baseline against KL, 95% bands over prompts, a star at
    each gold peak; ``reference`` (e.g. gold picking for itself, the ceiling) is drawn dashed in every gold panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, kl, ns = result["curves"], result["kl"], result["n"]
    groups = _groups(list(curves), reference)
    short = list(dict.fromkeys(name.rpartition("/")[2] for names in groups.values() for name in names))
    colour = {s: f"C{i % 10}" for i, s in enumerate(short)}
    paired = any("versus" in curves[name] for names in groups.values() for name in names)
    columns = 3 if paired else 2
    fig, axes = plt.subplots(len(groups), columns, figsize=(5.6 * columns, 4.3 * len(groups)), squeeze=False,
                             layout="constrained")
    for row, (group, names) in enumerate(groups.items()):
        gold_ax, proxy_ax = axes[row][:2]
        if reference in curves:
            _line(gold_ax, kl, curves[reference]["gold"], "k", f"{reference} (ceiling)", dashed=True)
        for name in names:
            c, label = colour[name.rpartition("/")[2]], name.rpartition("/")[2]
            _line(gold_ax, kl, curves[name]["gold"], c, label)
            peak = curves[name]["peak"]
            gold_ax.plot(peak["kl"], peak["gold"], "*", color=c, ms=13, mec="k", mew=0.6, zorder=5)
            _line(proxy_ax, kl, curves[name]["proxy_gain"], c, label)
        prefix = f"{group}: " if group else ""
        gold_ax.set_title(f"{prefix}gold of the best-of-n pick (★ = peak)")
        gold_ax.set_ylabel("gold (mean over prompts, 95% CI)")
        proxy_ax.set_title(f"{prefix}the picking proxy's own score")
        proxy_ax.set_ylabel("above the prompt's mean (within-prompt SDs)")
        if paired:
            versus_ax = axes[row][2]
            versus_ax.axhline(0, color="grey", lw=0.9)
            for name in names:
                if "versus" in curves[name]:
                    _line(versus_ax, kl, curves[name]["versus"]["gold"], colour[name.rpartition("/")[2]],
                          name.rpartition("/")[2])
            baselines = {curves[n]["versus"]["baseline"].rpartition("/")[2] for n in names if "versus" in curves[n]}
            versus_ax.set_title(f"{prefix}gold − {', '.join(sorted(baselines))}'s gold (paired, same samples)")
            versus_ax.set_ylabel("gold difference (mean, 95% CI)")
        for ax in axes[row]:
            ax.set_xlabel("KL = log n − (n−1)/n  (nats)")
            ax.grid(alpha=0.3)
            top = ax.secondary_xaxis("top")
            top.set_xticks(kl, [f"n={n}" if i == 0 else str(n) for i, n in enumerate(ns)], fontsize="small")
        gold_ax.legend(fontsize="small", loc="best")
    fig.suptitle(title or f"best-of-n over {result['samples']} samples per prompt, {result['prompts']} prompts")
    return fig


def _line(ax, kl, points, colour, label, dashed=False) -> None:
    mean = [p["mean"] for p in points]
    ax.plot(kl, mean, "--" if dashed else "o-", color=colour, ms=3.5, lw=1.3 if dashed else 1.8, label=label)
    ax.fill_between(kl, [p["ci_low"] for p in points], [p["ci_high"] for p in points], color=colour,
                    alpha=0.06 if dashed else 0.1, lw=0)


def plot_overoptimization(result: Mapping, path: str | Path, reference: str | None = None,
                          title: str | None = None) -> Path:
    """``overoptimization_figure`` written atomically as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = overoptimization_figure(result, reference, title)
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
