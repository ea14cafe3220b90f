"""``mmalign eval overoptimization``: sample a generator once, then best-of-n curves of every proxy, judged by gold.

N samples per prompt are drawn once and scored by the gold reward and every proxy; the curves of
``mmalign.eval.overoptimization`` then cost nothing more per n. An ensemble proxy (``Ensemble``, mean / UWO /
WCO) has its members scored one by one and combined afterwards with statistics of *all* the samples, so its
scores do not depend on how the samples fell into batches (its running statistics would otherwise change from
batch to batch). Writes ``overoptimization.json`` (the curves, the recipe), ``overoptimization.csv`` (a row per
proxy and n), ``scores.csv`` (every sample's scores) and ``overoptimization.png``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from mmalign.config import Recipe, check_device
from mmalign.eval.best_of_k import within_prompt_agreement
from mmalign.eval.generator import evaluate_generator, load_generator
from mmalign.eval.overoptimization import overoptimization_curves
from mmalign.eval.overoptimization_plot import plot_overoptimization
from mmalign.files import write_text_atomic
from mmalign.prompts import PromptSource, load_prompts
from mmalign.rewards import Reward, build
from mmalign.rewards.ensemble import Ensemble

__all__ = ["ORACLE", "OverOptimizationRecipe", "run_overoptimization", "format_curves"]

#: the name of gold picking for itself in the outputs: the ceiling of best-of-n at each n
ORACLE = "gold picks"


class OverOptimizationRecipe(Recipe):
    """A generator, prompts, proxies and a gold reward → best-of-n curves against KL."""

    task: Literal["overoptimization"] = "overoptimization"
    pipeline: str | None = Field(None, description="'world', a hub id or a pipeline folder")
    run: str | None = Field(None, description="a training run folder instead of a pipeline")
    prompts: PromptSource = Field(description="world split or prompt file")
    samples_per_prompt: int = Field(64, ge=2, description="N: samples per prompt, the largest n")
    proxies: dict[str, str | dict[str, Any] | list[dict[str, Any]]] = Field(
        min_length=1, description="label → reward spec; 'group/name' labels are drawn one row per group")
    gold: str | dict[str, Any] = Field(description="the reward treated as the truth")
    num_steps: int | None = Field(None, ge=1, description="sampler steps (default: the run's, else 20)")
    eta: float | None = Field(None, ge=0, description="DDIM η (default: the run's, else 1)")
    guidance_scale: float | None = Field(None, description="CFG scale (default: the run's, else 5)")
    seed: int = Field(0, description="noise seed (batch k draws from seed + k)")
    batch_size: int = Field(64, ge=1, description="images per sampling batch")
    device: str = Field("cpu", description="torch device")
    out: str = Field("outputs/overoptimization", description="output folder")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device(value)

    @field_validator("proxies")
    @classmethod
    def _labels(cls, value: dict) -> dict:
        if ORACLE in value:
            raise ValueError(f"{ORACLE!r} is the name of gold's own pick; label the proxy otherwise")
        return value

    @model_validator(mode="after")
    def _one_generator(self) -> OverOptimizationRecipe:
        if (self.run is None) == (self.pipeline is None):
            raise ValueError("give exactly one of --run RUN_FOLDER or --pipeline NAME_OR_PATH (in a recipe: run or "
                             "pipeline)")
        return self


def _scorers(proxies: dict[str, Reward]) -> dict[str, Reward]:
    """What is scored per sample: each plain proxy, and each ensemble's members (``label/#k``)."""
    scorers = {}
    for label, reward in proxies.items():
        if isinstance(reward, Ensemble):
            scorers.update({f"{label}/#{k}": member for k, member in enumerate(reward.members)})
        else:
            scorers[label] = reward
    return scorers


def _proxy_scores(proxies: dict[str, Reward], columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each proxy's ``(samples,)`` scores; an ensemble's from its members' columns, standardised (when it
    standardises) by the statistics of all of them."""
    scores = {}
    for label, reward in proxies.items():
        if isinstance(reward, Ensemble):
            raw = torch.stack([columns[f"{label}/#{k}"] for k in range(len(reward.members))])
            if reward.standardize:
                reward.update_statistics(raw)
            scores[label] = reward.combine(raw)[0]
        else:
            scores[label] = columns[label]
    return scores


def _baselines(labels: list[str]) -> dict[str, str]:
    """Each proxy's baseline for paired differences: the first proxy of its ``group/`` (e.g. ``clean/single``)."""
    first: dict[str, str] = {}
    for label in labels:
        first.setdefault(label.rpartition("/")[0], label)
    return {label: first[label.rpartition("/")[0]] for label in labels if label != first[label.rpartition("/")[0]]}


def _agreement(proxies: dict[str, Reward], tables: dict[str, torch.Tensor], columns: dict[str, torch.Tensor],
               gold: torch.Tensor) -> dict:
    """Each proxy's within-prompt agreement with gold (``within_prompt_agreement``); for an ensemble also each
    member's, and how alike its members rank (the mean correlation of their prompt-centred scores, pairwise)."""
    agreement = {}
    for label, reward in proxies.items():
        agreement[label] = within_prompt_agreement(tables[label], gold)
        if isinstance(reward, Ensemble):
            members = [columns[f"{label}/#{k}"].view(gold.shape) for k in range(len(reward.members))]
            agreement[label]["members"] = [within_prompt_agreement(m, gold) for m in members]
            pairs = [within_prompt_agreement(a, b)["correlation"] for i, a in enumerate(members) for b in members[i + 1:]]
            agreement[label]["member_correlation"] = sum(pairs) / len(pairs) if pairs else None
    return agreement


def run_overoptimization(recipe: OverOptimizationRecipe, progress: bool = True) -> dict:
    """Sample, score, compute the curves, write the outputs into ``recipe.out``; returns the JSON summary."""
    adapter, policy, sampler = load_generator(recipe.run, recipe.pipeline, recipe.device, recipe.num_steps,
                                              recipe.eta, recipe.guidance_scale)
    prompts = load_prompts(recipe.prompts)
    gold = build(recipe.gold).to(recipe.device)
    proxies = {label: build(spec).to(recipe.device) for label, spec in recipe.proxies.items()}
    scorers = {ORACLE: gold, **_scorers(proxies)}
    evaluation = evaluate_generator(adapter, policy, prompts, scorers, recipe.samples_per_prompt, recipe.seed,
                                    recipe.batch_size, progress)
    shape = (len(prompts), recipe.samples_per_prompt)
    scores = _proxy_scores(proxies, evaluation.scores)
    tables = {label: values.view(shape) for label, values in scores.items()}
    gold_table = evaluation.scores[ORACLE].view(shape)
    result = overoptimization_curves({**tables, ORACLE: gold_table}, gold_table, baselines=_baselines(list(tables)))
    result["agreement"] = _agreement(proxies, tables, evaluation.scores, gold_table)
    result.update(recipe=recipe.model_dump(), sampler=sampler, prompt_texts=[text for text, _ in prompts])
    out = Path(recipe.out)
    write_text_atomic(out / "overoptimization.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "overoptimization.csv", _curves_csv(result))
    write_text_atomic(out / "scores.csv", _scores_csv(prompts, recipe.samples_per_prompt, gold_table, tables))
    plot_overoptimization(result, out / "overoptimization.png", reference=ORACLE,
                          title=f"best-of-n on {len(prompts)} prompts × {recipe.samples_per_prompt} samples "
                                f"({sampler['num_steps']} steps, η {sampler['eta']:g}, guidance "
                                f"{sampler['guidance_scale']:g})")
    return result


def _curves_csv(result: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    keys, stats = ("gold", "proxy", "proxy_gain"), ("mean", "ci_low", "ci_high")
    writer.writerow(["proxy", "n", "kl", *(f"{k}_{s}" for k in keys for s in stats), "prompts", "baseline",
                     *(f"gold_minus_baseline_{s}" for s in stats)])
    for name, curve in result["curves"].items():
        versus = curve.get("versus")
        for i, (n, kl) in enumerate(zip(result["n"], result["kl"])):
            cells = [curve[k][i][s] for k in keys for s in stats]
            paired = [versus["baseline"], *(versus["gold"][i][s] for s in stats)] if versus else [""] * 4
            writer.writerow([name, n, kl, *cells, curve["gold"][i]["n"], *paired])
    return buffer.getvalue()


def _scores_csv(prompts, samples: int, gold: torch.Tensor, tables: dict[str, torch.Tensor]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["prompt_index", "sample", "prompt", "gold", *tables])
    for p, (text, _) in enumerate(prompts):
        for s in range(samples):
            writer.writerow([p, s, text, float(gold[p, s]), *(float(t[p, s]) for t in tables.values())])
    return buffer.getvalue()


def format_curves(result: dict) -> str:
    """The table the command prints: each proxy's gold of the pick at every n, its peak, gain and fall."""
    ns = result["n"]
    width = max(12, *map(len, result["curves"]))
    lines = ["gold of the best-of-n pick (mean over prompts)", "n".ljust(width) + "".join(f"{n:>8}" for n in ns),
             "KL (nats)".ljust(width) + "".join(f"{kl:>8.2f}" for kl in result["kl"])]
    for name, curve in result["curves"].items():
        lines.append(name.ljust(width) + "".join(f"{p['mean']:>8.3f}" for p in curve["gold"]))
    lines.append("")
    for name, curve in result["curves"].items():
        gain, fall, peak = curve["gain"], curve["fall"], curve["peak"]
        line = (f"{name}: peak at n={peak['n']} ({peak['gold']:.3f}); gold(N) − gold(1) {_ci(gain)}; "
                f"gold(N) − gold(peak) {_ci(fall)}")
        if "versus" in curve:
            line += f"; gold(N) − {curve['versus']['baseline']}'s {_ci(curve['versus']['gold'][-1])}"
        lines.append(line)
    for name, agreement in result.get("agreement", {}).items():
        line = (f"{name}: within-prompt pairwise accuracy with gold {agreement['pairwise_accuracy']:.3f} "
                f"({agreement['pairs']} pairs)")
        if "members" in agreement:
            members = ", ".join(f"{m['pairwise_accuracy']:.3f}" for m in agreement["members"])
            line += f"; members {members}, their mutual correlation {agreement['member_correlation']:.3f}"
        lines.append(line)
    return "\n".join(lines)


def _ci(stats: dict) -> str:
    return f"{stats['mean']:+.3f} [{stats['ci_low']:+.3f}, {stats['ci_high']:+.3f}]"
