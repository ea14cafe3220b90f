"""Which trainer buys the most true (gold) improvement per sample on the shapes world (docs/trainers/comparison.md).

Runs the grid of the shipped shapes recipes (PRDP, DDPO, GRPO, DiffusionNFT, reward back-propagation) and one
alternative setting per method, one ``mmalign train`` at a time, each in its own folder under ``--root``: a run
whose ``summary.json`` exists is skipped, a killed one resumes from its checkpoints (``mmalign train`` does). Every
run logs held-out gold ``eval_every`` epochs (the curves); after training, every final model and the base are
evaluated with one common sampler (deterministic DDIM, 10 steps, guidance 5, the same held-out prompts and seeds),
so the methods' paired changes share one baseline. Then the table (markdown + JSON) and the curves PNG are written.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/world_trainer_comparison.py          # the grid, then the table
    python benchmarks/world_trainer_comparison.py --only prdp ddpo                             # some settings only
    python benchmarks/world_trainer_comparison.py --table-only --earlier runs/comparison-earlier  # + earlier run folders
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_EPOCHS = 40  # × 16 prompts × 4 samples = 2,560 samples: the shipped recipes' budget
SAMPLES_PER_EPOCH = 16 * 4
COMMON = {"num_steps": 10, "eta": 0.0, "guidance_scale": 5.0, "split": "heldout", "n": 64, "prompt_seed": 1,
          "samples_per_prompt": 4, "seed": 1234}
REWARDS = ("gold", "preference_proxy", "proxy")
# paired in the table: gold, and the trained reward and the proxy as their cosines (the recipes' scale 1)
COLUMNS = ("gold", "preference_proxy/cosine", "proxy/cosine")


@dataclass(frozen=True)
class Setting:
    """One run of the grid: a shipped recipe, its overrides, and why they were chosen."""

    name: str
    method: str
    recipe: str
    overrides: tuple[str, ...] = ()
    epochs: int = BUDGET_EPOCHS
    lever: str = "shipped"

    def args(self) -> list[str]:
        every = max(1, self.epochs // 4)  # held-out gold at 0 and ~4 points more
        return [f"epochs={self.epochs}", f"eval_every={every}", "eval.max_prompts=16", "eval.samples_per_prompt=2",
                *self.overrides]


SHIPPED = [
    Setting("prdp", "PRDP", "shapes-prdp"),
    Setting("nft", "DiffusionNFT", "shapes-nft"),
    Setting("backprop", "AlignProp", "shapes-backprop"),
    Setting("ddpo", "DDPO", "shapes-ddpo"),
    Setting("grpo", "GRPO", "shapes-grpo"),
]
# One alternative per method, at half budget (screening: the grid must fit ~90 min on one thread).
ALTERNATIVES = [
    Setting("nft-beta0.3", "DiffusionNFT", "shapes-nft", ("beta=0.3",), 20, "β 0.3"),
    Setting("backprop-ref0.3", "AlignProp", "shapes-backprop", ("reference_weight=0.3",), 20, "λ_ref 0.3"),
    Setting("ddpo-lr3e-4", "DDPO", "shapes-ddpo", ("learning_rate=3e-4",), 20, "lr ÷3"),
    Setting("prdp-lr3e-4", "PRDP", "shapes-prdp", ("learning_rate=3e-4",), 20, "lr ÷3"),
    Setting("grpo-lr3e-4", "GRPO", "shapes-grpo", ("learning_rate=3e-4",), 20, "lr ÷3"),
]
# PRDP's claim (stable on a large prompt set where DDPO degrades): the shipped recipes on 10,000 train prompts
# (`prompts: {world: train, n: ...}` takes any n; 640 draws with replacement then rarely repeat a scene).
ALL_PROMPTS = [
    Setting("prdp-10k-prompts", "PRDP", "shapes-prdp", ("prompts.n=10000",), lever="10,000 train prompts"),
    Setting("ddpo-10k-prompts", "DDPO", "shapes-ddpo", ("prompts.n=10000",), lever="10,000 train prompts"),
]
# The order runs go in: the shipped runs without an earlier twin's curves first, the screening, the prompt-set claim,
# then shipped back-propagation (its earlier run logged the same evaluations; see comparison.md).
GRID = [*SHIPPED[:2], *ALTERNATIVES, *SHIPPED[3:], *ALL_PROMPTS, SHIPPED[2]]


def train(setting: Setting, root: Path) -> None:
    """``mmalign train`` of one setting in ``root/name`` unless finished; wall and CPU seconds (this attempt's child
    processes, from getrusage) are added to ``timing.json`` there, so a resumed run's total counts every attempt."""
    from mmalign.files import write_text_atomic

    out = root / setting.name
    if (out / "summary.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).parent / "mmalign"), "train", "--quiet", setting.recipe, f"output_dir={out}",
               *setting.args()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    print(f"[{time.strftime('%H:%M:%S')}] {setting.name}: {' '.join(command[2:])}", flush=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with open(out / "train.log", "a") as log:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.time() - start
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"wall_s": 0.0, "cpu_s": 0.0, "attempts": 0}
    timing["wall_s"] += wall
    timing["cpu_s"] += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    timing["attempts"] += 1
    write_text_atomic(timing_path, json.dumps(timing, indent=2) + "\n")
    print(f"[{time.strftime('%H:%M:%S')}] {setting.name}: exit {code}, {wall:.0f} s", flush=True)
    if code != 0:
        raise SystemExit(f"{setting.name}: mmalign train exited {code}; see {out / 'train.log'}")


def common_eval(target: str, out_path: Path) -> None:
    """Per-sample gold, trained reward and proxy, and per-prompt diversity, of a run folder's exported model (or
    ``world``: the base) under the common sampler ``COMMON``, written to ``out_path`` (skipped if it exists)."""
    if out_path.exists():
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.time()
    subprocess.run([sys.executable, __file__, "--eval-one", target, "--eval-out", str(out_path)], cwd=ROOT, env=env,
                   check=True)
    print(f"[{time.strftime('%H:%M:%S')}] common eval {target}: {time.time() - start:.0f} s", flush=True)


def _eval_one(target: str, out_path: Path) -> None:
    """The in-process half of ``common_eval``."""
    from mmalign.eval.diversity import image_encoder
    from mmalign.eval.generator import evaluate_generator, load_generator
    from mmalign.eval.scoring import build_rewards
    from mmalign.files import write_text_atomic
    from mmalign.prompts import PromptSource, load_prompts

    run, pipeline = (None, target) if target == "world" else (target, None)
    adapter, policy, _ = load_generator(run, pipeline, "cpu", COMMON["num_steps"], COMMON["eta"],
                                        COMMON["guidance_scale"])
    rewards = build_rewards(list(REWARDS), "cpu")
    prompts = load_prompts(PromptSource(world=COMMON["split"], n=COMMON["n"], seed=COMMON["prompt_seed"]))
    result = evaluate_generator(adapter, policy, prompts, rewards, COMMON["samples_per_prompt"], COMMON["seed"],
                                progress=False)
    result.add_diversity(image_encoder(rewards["proxy"]))
    data = {"target": target, "sampler": COMMON,
            "scores": {k: [float(v) for v in values] for k, values in result.scores.items()},
            "diversity": {k: [float(v) for v in values] for k, values in result.diversity.items()}}
    write_text_atomic(out_path, json.dumps(data) + "\n")


def _paired(after: list[float], before: list[float]) -> dict[str, float]:
    """Mean and 95% CI of per-item differences (same prompts and seeds)."""
    import torch

    from mmalign.eval.generator import mean_ci

    if len(after) != len(before):
        raise ValueError(f"paired change: {len(after)} values after against {len(before)} before; expected the same")
    return mean_ci(torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64))


def run_row(setting: Setting, run_dir: Path, base: dict, source: str = "this grid") -> dict:
    """One finished run's figures: the report's own-sampler paired gold change and diversity ratio, the common
    sampler's paired changes against the base (gold, the trained reward, the proxy, Vendi), gold gained per
    1,000 samples, timing, and the held-out curve (samples seen → gold mean and 95% CI)."""
    from mmalign.eval.report import read_metrics

    summary = json.loads((run_dir / "summary.json").read_text())
    common = json.loads((run_dir / "common_eval.json").read_text())
    timing_path = run_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    samples = setting.epochs * SAMPLES_PER_EPOCH
    paired = {k: _paired(common["scores"][k], base["scores"][k])
              for k in (*COLUMNS, *(c for c in common["scores"] if c.startswith("gold/")))}
    vendi = "diversity/vendi"
    paired[vendi] = _paired(common["diversity"][vendi], base["diversity"][vendi])
    base_vendi = sum(base["diversity"][vendi]) / len(base["diversity"][vendi])
    curve = []
    for row in read_metrics(run_dir / "metrics.jsonl", "epoch", "eval"):
        mean, std = row.get("eval/gold"), row.get("eval/gold/std")
        half = 1.96 * std / math.sqrt(16 * 2) if std is not None and math.isfinite(std) else None
        curve.append({"samples": row["epoch"] * SAMPLES_PER_EPOCH, "gold": mean, "ci": half,
                      "reward": row.get("eval/reward")})
    own = summary["paired_change"]
    return {
        "name": setting.name, "method": setting.method, "lever": setting.lever, "epochs": setting.epochs,
        "source": source, "run_dir": str(run_dir),
        "samples": samples, "command": f"mmalign train {setting.recipe} {' '.join(setting.args())}",
        "own_sampler": {"gold_before": summary["before"]["gold"]["mean"], "gold": own["gold"],
                        "reward": own["reward"], "diversity_ratio": summary.get("diversity_ratio")},
        "common": paired,
        "common_gold": sum(common["scores"]["gold"]) / len(common["scores"]["gold"]),
        "vendi_ratio": (sum(common["diversity"][vendi]) / len(common["diversity"][vendi])) / base_vendi,
        "gold_per_1k_samples": paired["gold"]["mean"] / samples * 1000,
        "wall_s": timing.get("wall_s"), "cpu_s": timing.get("cpu_s"), "curve": curve,
    }


def _ci(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]"


def markdown_table(rows: list[dict], base_gold: float) -> str:
    """The comparison table: one line per finished run, the common sampler's paired changes first."""
    lines = [
        f"Common sampler (deterministic DDIM, {COMMON['num_steps']} steps, guidance {COMMON['guidance_scale']:g}, "
        f"{COMMON['n']} held-out prompts × {COMMON['samples_per_prompt']} samples, seed {COMMON['seed']}); "
        f"base gold {base_gold:.3f}. Paired change against the base, mean [95% CI].",
        "",
        "| run | setting | source | samples | gold | gold per 1k samples | trained reward | proxy | Vendi ratio | "
        "own-sampler gold (report) | wall min | CPU min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        minutes = lambda s: f"{s / 60:.1f}" if s is not None else "–"  # noqa: E731
        lines.append(
            f"| {r['method']} (`{r['name']}`) | {r['lever']} | {r['source']} | {r['samples']:,} | {_ci(r['common']['gold'])} | "
            f"{r['gold_per_1k_samples']:+.4f} | {_ci(r['common']['preference_proxy/cosine'])} | {_ci(r['common']['proxy/cosine'])} | "
            f"{r['vendi_ratio']:.2f} | {_ci(r['own_sampler']['gold'])} from {r['own_sampler']['gold_before']:.3f} | "
            f"{minutes(r['wall_s'])} | {minutes(r['cpu_s'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], path: Path) -> None:
    """Held-out gold and trained reward against samples seen, as the change from the run's own epoch-0 evaluation
    (the base under the run's sampler, so NFT's η = 0 and the others' η = 1 start at zero alike), one line per run
    with a curve; the shipped runs' gold points carry the 95% CI of each mean (unpaired: the metrics keep means and
    stds; drawn for those only, to stay readable); atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmalign.files import write_atomic

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    colours = {}
    for r in rows:
        colour = colours.setdefault(r["method"], f"C{len(colours)}")
        if not r["curve"] or r["curve"][0]["samples"] != 0:
            continue
        style = (":" if r["source"] != "this grid" else "-" if r["lever"] == "shipped"
                 else "-." if "prompts" in r["lever"] else "--")
        label = f"{r['method']} ({r['lever']}{', ' + r['source'] if r['source'] != 'this grid' else ''})"
        xs = [p["samples"] for p in r["curve"]]
        for ax, key in zip(axes, ("gold", "reward")):
            ys = [p[key] - r["curve"][0][key] for p in r["curve"]]
            ax.plot(xs, ys, style, color=colour, marker="o", markersize=3, label=label)
        if style == "-" and all(p["ci"] is not None for p in r["curve"]):
            shift = 12 * (len(colours) - 1)  # points apart, so the bars of one x do not hide each other
            axes[0].errorbar([x + shift for x in xs[1:]], [p["gold"] - r["curve"][0]["gold"] for p in r["curve"][1:]],
                             yerr=[p["ci"] for p in r["curve"][1:]], fmt="none", ecolor=colour, alpha=0.5,
                             capsize=2, linewidth=0.8)
    axes[0].set(xlabel="training samples seen", ylabel="held-out gold − its epoch-0 value",
                title="gold (never trained on); bars: 95% CI of each mean, 16 prompts × 2")
    axes[1].set(xlabel="training samples seen", ylabel="held-out preference_proxy − its epoch-0 value",
                title="trained reward (cosine), same evaluations")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.axhline(0, color="k", linewidth=0.6)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Shapes world: held-out evaluation during training, each run's own sampler, fixed prompts and seeds",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_table(root: Path, settings: list[Setting], png: Path, earlier: Path | None = None) -> list[dict]:
    """Common-sampler evaluations where missing, then ``root/comparison.{md,json}`` and the curves PNG (atomic)
    from every finished run of ``settings`` in ``root`` and, labelled "earlier run", in ``earlier`` (run folders
    of the same settings made before, e.g. by the trainer pages); returns the rows."""
    from mmalign.files import write_text_atomic

    common_eval("world", root / "base_common_eval.json")
    base = json.loads((root / "base_common_eval.json").read_text())
    rows = []
    for folder, source in ((root, "this grid"), (earlier, "earlier run")):
        for setting in settings if folder is not None else []:
            run_dir = folder / setting.name
            if not (run_dir / "summary.json").exists():
                print(f"{run_dir}: not finished, left out of the table")
                continue
            common_eval(str(run_dir), run_dir / "common_eval.json")
            rows.append(run_row(setting, run_dir, base, source))
    base_gold = sum(base["scores"]["gold"]) / len(base["scores"]["gold"])
    table = markdown_table(rows, base_gold)
    write_text_atomic(root / "comparison.md", table)
    write_text_atomic(root / "comparison.json", json.dumps({"common_sampler": COMMON, "base_gold": base_gold,
                                                           "runs": rows}, indent=2) + "\n")
    if rows:
        plot_curves(rows, png)
    print(table)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/comparison", help="folder of the grid's run folders")
    parser.add_argument("--only", nargs="*", help="setting names to run (default: the whole grid)")
    parser.add_argument("--table-only", action="store_true", help="no training: the table from what finished")
    parser.add_argument("--png", default="docs/images/comparison-curves.png", help="the curves figure")
    parser.add_argument("--earlier", help="a folder of earlier run folders named as the grid's, added to the table")
    parser.add_argument("--eval-one", help=argparse.SUPPRESS)
    parser.add_argument("--eval-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.eval_one:
        _eval_one(args.eval_one, Path(args.eval_out))
        return 0
    root = Path(args.root)
    settings = [s for s in GRID if not args.only or s.name in args.only]
    if not args.table_only:
        root.mkdir(parents=True, exist_ok=True)
        for setting in settings:
            train(setting, root)
            common_eval(str(root / setting.name), root / setting.name / "common_eval.json")
        # the table in a fresh process: its code may be newer than this long-running driver's
        return subprocess.run([sys.executable, __file__, "--root", str(root), "--table-only", "--png", args.png],
                              cwd=ROOT).returncode
    write_table(root, settings, Path(args.png), Path(args.earlier) if args.earlier else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
