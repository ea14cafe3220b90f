"""The figures of a noise-optimisation run: the initial / optimised / best-of-N grid and the traces plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["returned_so_far", "save_grid", "save_traces", "traces_figure"]

#: row order and labels of the grid
ROWS = {"initial": "initial", "reno": "ReNO", "best_of_n": "best-of-N"}


def save_grid(images: Mapping[str, torch.Tensor], scores: Mapping[str, Mapping[str, torch.Tensor]],
              prompts: Sequence[str], path: str | Path, limit: int = 8) -> str:
    """One row per method (initial, ReNO, best-of-N) for the first ``limit`` prompts, each image labelled with
    the optimised reward and the first report reward (gold on the world). Videos are strips of frames, one
    prompt a row with the methods side by side, and also played in ``grid.gif`` beside ``path``."""
    from mmalign.eval.grid import image_grid, save_video_grid

    count = min(limit, len(prompts))
    names = list(next(iter(scores.values())))[:2]
    tags = [t for t in ROWS if t in images]
    video = next(iter(images.values())).ndim == 5
    cells = [(tag, i) for i in range(count) for tag in tags] if video else [(tag, i) for tag in tags for i in range(count)]
    tiles = torch.stack([images[tag][i] for tag, i in cells])
    labels = [f"{ROWS[tag]}: {prompts[i]}\n" + ", ".join(f"{name} {float(scores[tag][name][i]):.3g}" for name in names)
              for tag, i in cells]
    columns = len(tags) if video else count
    if video:
        save_video_grid(tiles, Path(path).with_suffix(".gif"), labels, columns=columns)
    image_grid(tiles, labels, columns=columns).save(path)
    return Path(path).name


def returned_so_far(reward: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``(T, B)``: ``other`` at the iterate a run stopped after ``t`` iterations would return, the best by
    ``reward`` so far (NaN rewards never chosen): how a second score evolves along what the optimiser returns."""
    safe = torch.nan_to_num(reward, nan=-torch.inf)
    best = torch.cummax(safe, 0).indices
    return other.gather(0, best)


def traces_figure(trace: Mapping[str, torch.Tensor], report: Sequence[str] = ()):
    """Panels against iterations, means over prompts with a 95% band: the optimised reward (the current iterate
    and the best so far), each report reward at the iterate that would be returned, and ``‖z‖/√d``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["reward", *report, "noise_norm"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), layout="constrained", squeeze=False)
    steps = torch.arange(trace["reward"].shape[0])
    for ax, key in zip(axes[0], panels):
        if key == "reward":
            _band(ax, steps, trace["reward"], "current iterate", "C0")
            _band(ax, steps, returned_so_far(trace["reward"], trace["reward"]), "best so far (returned)", "C3")
            ax.set_title("optimised reward")
        elif key == "noise_norm":
            _band(ax, steps, trace["noise_norm"], "‖z‖/√d", "C2")
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.set_title("noise norm (1: the Gaussian's shell)")
        else:
            _band(ax, steps, trace[key], "current iterate", "C1")
            _band(ax, steps, returned_so_far(trace["reward"], trace[key]), "at the returned iterate", "C3")
            ax.set_title(f"{key} (report reward)")
        ax.set_xlabel("iteration (reward evaluations − 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def save_traces(trace: Mapping[str, torch.Tensor], path: str | Path, report: Sequence[str] = ()) -> str:
    import matplotlib.pyplot as plt

    fig = traces_figure(trace, report)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path).name


def _band(ax, steps, values: torch.Tensor, label: str, color: str) -> None:
    finite = torch.isfinite(values)
    count = finite.sum(1).clamp_min(1).double()
    safe = torch.where(finite, values, 0.0).double()
    mean = safe.sum(1) / count
    std = (torch.where(finite, values.double() - mean[:, None], 0.0).pow(2).sum(1) / (count - 1).clamp_min(1)).sqrt()
    half = 1.96 * std / count.sqrt()
    ax.plot(steps, mean, "-", color=color, lw=1.6, label=label)
    ax.fill_between(steps, mean - half, mean + half, color=color, alpha=0.15)
