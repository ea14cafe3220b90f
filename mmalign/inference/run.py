"""``mmalign optimize``: ReNO over a prompt set, beside best-of-N at the same number of reward calls, into a run
folder (``summary.json``, ``grid.png``, ``traces.png``, ``traces.safetensors``, the noises and images).

Best-of-N is the honest baseline of any inference-time method: ReNO spends ``iterations`` reward evaluations
per prompt (the initial noise's included), best-of-N spends as many on independent samples, the first of which
is ReNO's initial noise, so the two start from the same image and differ only in how they spend the calls.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from mmalign.config import Recipe, VideoConfig
from mmalign.eval.generator import mean_ci
from mmalign.eval.scoring import build_rewards, score_batch
from mmalign.files import write_text_atomic
from mmalign.media import MediaBatch
from mmalign.models.adapter import GeneratorAdapter
from mmalign.models.pipelines import adapter_for, load_pipeline
from mmalign.models.rollout import sample_with_grad
from mmalign.prompts import PromptSource, load_prompts
from mmalign.rewards import Reward, build
from mmalign.rewards.ensemble import Ensemble
from mmalign.rewards.registry import RewardSpecs
from mmalign.seeds import derived_seed

__all__ = ["ReNORecipe", "best_of_n", "draw_seed", "run_reno"]


class ReNORecipe(Recipe):
    """Noise optimisation (ReNO) of a generator's samples against differentiable rewards, prompt set by set."""

    task: Literal["reno"] = "reno"
    pipeline: str = Field(description="'world' (the shipped shapes pipeline), a hub id or a folder")
    video: VideoConfig | None = Field(None, description="frames and size of a video pipeline's samples")
    prompts: PromptSource = Field(description="the prompts whose samples are optimised")
    reward: RewardSpecs = Field(min_length=1, description="the optimised reward; several are summed with weights")
    report_rewards: RewardSpecs = Field(
        default_factory=list, description="rewards scored on every iterate, the initial, optimised and best-of-N "
        "images, never optimised (gold on the world)")
    num_steps: int = Field(4, ge=1, description="deterministic DDIM steps of the generator (1: one-step models)")
    guidance_scale: float = Field(5.0, ge=1, description="classifier-free guidance (1: off, as for SD-Turbo)")
    iterations: int = Field(50, ge=1, description="reward evaluations per prompt, the initial noise's included")
    lr: float = Field(5.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov)")
    grad_clip: float = Field(0.1, gt=0, description="each prompt's gradient-norm clip")
    regularization: float = Field(0.01, ge=0, description="λ_reg of the chi-norm prior")
    batch_size: int = Field(16, ge=1, description="prompts optimised together")
    seed: int = Field(0, ge=0, description="seed of every prompt's initial noise and of best-of-N's draws")
    best_of_n: bool = Field(True, description="also sample best-of-N with N = iterations, the same reward calls")
    calibration_samples: int = Field(
        64, ge=2, description="samples that set an ensemble's standardisation before it is held fixed")
    gradient_checkpointing: bool = Field(True, description="recompute the UNet and decoder in backward")
    grid_prompts: int = Field(8, ge=0, description="prompts in grid.png")
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    output_dir: str = Field("runs/reno", description="the run folder")


def draw_seed(seed: int, prompt: int, draw: int) -> int:
    """The noise seed of draw ``draw`` of prompt ``prompt`` (draw 0 is ReNO's initial noise; calibration draws
    start at 10⁶): independent of the batch layout."""
    return derived_seed(seed, prompt, draw)


def run_reno(recipe: ReNORecipe, progress: bool = True) -> dict[str, Any]:
    """Optimise every prompt's noise, sample best-of-N beside it, score both with the report rewards and write
    the run folder; returns the summary (also ``summary.json``)."""
    from mmalign.inference.reno import optimize_noise
    from mmalign.inference.report import save_grid, save_traces

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.json", recipe.model_dump_json(indent=2))
    pipe = load_pipeline(recipe.pipeline, getattr(torch, recipe.dtype)).to(recipe.device)
    adapter = adapter_for(pipe, recipe.guidance_scale, **(recipe.video.options() if recipe.video else {}))
    prompts = load_prompts(recipe.prompts)
    texts, metadata = [t for t, _ in prompts], [{**m, "group": i} for i, (_, m) in enumerate(prompts)]
    reward = build(recipe.reward if len(recipe.reward) > 1 else recipe.reward[0]).to(recipe.device)
    report = build_rewards(recipe.report_rewards, recipe.device)
    calibrate(reward, adapter, texts, metadata, recipe)

    start = time.perf_counter()
    results, report_traces = [], {name: [] for name in report}
    batches = range(0, len(texts), recipe.batch_size)
    for first in tqdm(batches, desc="prompt batches", unit="batch", disable=not progress):
        rows = slice(first, first + recipe.batch_size)
        traced: dict[str, list[torch.Tensor]] = {name: [] for name in report}

        def score_iterate(state, rows=rows, traced=traced) -> bool:
            batch = MediaBatch(torch.nan_to_num(state.pixels.float(), 0.5), texts[rows], metadata[rows])
            for name, values in _score(report, batch, len(batch)).items():
                traced[name].append(values)
            return False

        results.append(optimize_noise(
            adapter, texts[rows], reward, metadata=metadata[rows],
            seeds=[draw_seed(recipe.seed, i, 0) for i in range(len(texts))[rows]], num_steps=recipe.num_steps,
            iterations=recipe.iterations, lr=recipe.lr, momentum=recipe.momentum, grad_clip=recipe.grad_clip,
            regularization=recipe.regularization, gradient_checkpointing=recipe.gradient_checkpointing,
            callback=score_iterate if report else None, progress=progress,
        ))
        for name in report:
            report_traces[name].append(torch.stack(traced[name]))
    seconds = time.perf_counter() - start

    images = {"initial": torch.cat([r.initial_pixels for r in results]), "reno": torch.cat([r.best_pixels for r in results])}
    scores = {"initial": {"reward": torch.cat([r.initial_scores for r in results])},
              "reno": {"reward": torch.cat([r.best_scores for r in results])}}
    bon_seconds = None
    if recipe.best_of_n:
        bon_start = time.perf_counter()
        images["best_of_n"], scores["best_of_n"] = {}, {}
        images["best_of_n"], scores["best_of_n"]["reward"], _ = best_of_n(
            adapter, texts, metadata, reward, recipe, progress)
        bon_seconds = time.perf_counter() - bon_start
    for tag, pixels in images.items():
        scores[tag].update(_score(report, MediaBatch(pixels, texts, metadata), recipe.batch_size))

    trace = {key: torch.cat([r.trace[key] for r in results], 1) for key in ("reward", "noise_norm")}
    trace.update({name: torch.cat(parts, 1) for name, parts in report_traces.items()})
    summary = _summary(recipe, results, scores, seconds, bon_seconds, texts)
    _save_outputs(out, results, images, trace)
    summary["grid"] = save_grid(images, scores, texts, out / "grid.png", recipe.grid_prompts) if recipe.grid_prompts else None
    summary["traces"] = save_traces(trace, out / "traces.png", list(report))
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


@torch.no_grad()
def best_of_n(adapter: GeneratorAdapter, texts: list[str], metadata: list[dict], reward: Reward,
              recipe: ReNORecipe, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt's best of ``recipe.iterations`` samples by ``reward`` (draw 0 is ReNO's initial noise):
    ``(pixels (B, 3, H, W), scores (B,), index of the chosen draw (B,))``; non-finite scores are never chosen."""
    policy = adapter.make_policy(recipe.num_steps, 0.0)
    pairs = [(i, j) for i in range(len(texts)) for j in range(recipe.iterations)]
    chunk = recipe.batch_size * max(1, min(recipe.iterations, 8))
    best_scores = torch.full((len(texts),), -math.inf)
    best_index = torch.zeros(len(texts), dtype=torch.long)
    best_pixels: torch.Tensor | None = None
    for start in tqdm(range(0, len(pairs), chunk), desc="best-of-N", unit="batch", disable=not progress):
        part = pairs[start : start + chunk]
        batch, drawn = _draws(adapter, policy, texts, metadata, [i for i, _ in part],
                              [draw_seed(recipe.seed, i, j) for i, j in part])
        values = reward(batch).scores.float().cpu()
        values = torch.where(drawn & torch.isfinite(values), values, -math.inf)
        pixels = batch.pixels.cpu()
        if best_pixels is None:
            best_pixels = torch.zeros(len(texts), *pixels.shape[1:])
        for k, (i, j) in enumerate(part):
            if j == 0 or values[k] > best_scores[i]:
                best_scores[i], best_index[i], best_pixels[i] = values[k], j, pixels[k]
    return best_pixels, torch.where(torch.isinf(best_scores), math.nan, best_scores), best_index


def calibrate(reward: Reward, adapter: GeneratorAdapter, texts: list[str], metadata: list[dict],
              recipe: ReNORecipe) -> None:
    """Set the standardisation of every ensemble inside ``reward`` from ``calibration_samples`` samples of the
    generator (draws apart from ReNO's and best-of-N's), then hold it: each prompt's score then depends on its
    own sample only."""
    ensembles = [m for m in reward.modules() if isinstance(m, Ensemble) and m.standardize]
    if not ensembles:
        return
    policy = adapter.make_policy(recipe.num_steps, 0.0)
    rows = [k % len(texts) for k in range(recipe.calibration_samples)]
    chunk = recipe.batch_size * 4
    with torch.no_grad():
        for start in range(0, len(rows), chunk):
            part = range(start, min(start + chunk, len(rows)))
            reward(_draws(adapter, policy, texts, metadata, [rows[k] for k in part],
                          [draw_seed(recipe.seed, rows[k], 10**6 + k) for k in part])[0])
    for ensemble in ensembles:
        ensemble.hold_statistics()


def _draws(adapter, policy, texts, metadata, rows: list[int], seeds: list[int]) -> tuple[MediaBatch, torch.Tensor]:
    """Deterministic samples of prompts ``rows`` from the noises of ``seeds``, as a batch (non-finite pixels
    replaced by grey) and the ``(n,)`` mask of samples drawn finite."""
    from mmalign.inference.reno import seeded_noise

    noise = seeded_noise(adapter, seeds, [metadata[i] for i in rows])
    pixels = sample_with_grad(adapter, policy, [texts[i] for i in rows], noise).pixels.float()
    drawn = torch.isfinite(pixels.flatten(1)).all(1).cpu()
    return MediaBatch(torch.nan_to_num(pixels, 0.5), [texts[i] for i in rows], [metadata[i] for i in rows]), drawn


def _score(rewards: dict[str, Reward], batch: MediaBatch, batch_size: int) -> dict[str, torch.Tensor]:
    """Each reward's scores (``score_batch`` without the components)."""
    columns = score_batch(rewards, batch, batch_size, progress=False)
    return {name: columns[name] for name in rewards}


def _summary(recipe, results, scores, seconds, bon_seconds, texts) -> dict[str, Any]:
    names = list(scores["initial"])
    summary: dict[str, Any] = {
        "prompts": len(texts), "iterations": recipe.iterations, "seconds": round(seconds, 2),
        "seconds_per_prompt": round(seconds / len(texts), 3),
        "best_of_n_seconds": None if bon_seconds is None else round(bon_seconds, 2),
        "rewards": {name: {tag: mean_ci(table[name]) for tag, table in scores.items()} for name in names},
        "paired_change": {}, "fraction_rose": {}, "fraction_fell": {},
    }
    for name in names:
        initial, reno = scores["initial"][name], scores["reno"][name]
        change = {"reno": mean_ci(reno - initial)}
        if "best_of_n" in scores:
            change["best_of_n"] = mean_ci(scores["best_of_n"][name] - initial)
            change["reno_minus_best_of_n"] = mean_ci(reno - scores["best_of_n"][name])
        summary["paired_change"][name] = change
        summary["fraction_rose"][name] = float((reno > initial).double().mean())
        summary["fraction_fell"][name] = float((reno < initial).double().mean())
    best_iteration = torch.cat([r.best_iteration for r in results]).double()
    summary["best_iteration"] = {"mean": float(best_iteration.mean()), "median": float(best_iteration.median())}
    summary["stopped"] = [{"prompt": text, "reason": reason}
                          for r in results for text, reason in zip(r.prompts, r.stopped) if reason]
    summary["per_prompt"] = [
        {"prompt": text, "best_iteration": int(best_iteration[i]),
         **{f"{name}/{tag}": round(float(scores[tag][name][i]), 5) for name in names for tag in scores}}
        for i, text in enumerate(texts)
    ]
    return summary


def _save_outputs(out: Path, results, images: dict[str, torch.Tensor], trace: dict[str, torch.Tensor]) -> None:
    """``noise.safetensors`` (each prompt's initial and best noise: sample them again with the same sampler),
    ``traces.safetensors`` (every trace, ``(iterations, prompts)``) and the images as PNGs (videos as GIFs) under
    ``images/``."""
    from diffusers.utils import export_to_gif
    from safetensors.torch import save_file
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import save_image

    save_file({"initial": torch.cat([r.initial_noise for r in results]).contiguous(),
               "best": torch.cat([r.best_noise for r in results]).contiguous()}, out / "noise.safetensors")
    save_file({k: v.contiguous() for k, v in trace.items()}, out / "traces.safetensors")
    folder = out / "images"
    folder.mkdir(exist_ok=True)
    for tag, pixels in images.items():
        for i, image in enumerate(pixels):
            if image.ndim == 4:  # a video (T, 3, H, W)
                export_to_gif([to_pil_image(frame) for frame in image.clamp(0, 1)], str(folder / f"{i:04d}_{tag}.gif"), fps=5)
            else:
                save_image(image, folder / f"{i:04d}_{tag}.png")
