"""Rebuild the shipped world models from their fixed seeds and measure them against the gold verifier.

``build()`` trains the generator, the proxy, the preference proxy and/or the VLM, each into a temporary folder
beside its target, and swaps it in only once it is complete (an interrupted build never leaves half a model
behind). When the
generator or proxy was built it writes ``build_report.json``: build times, machine load, model sizes, the
generator's gold score per attribute type on train and held-out prompts, and the proxy's agreement with gold
on the generator's images. The VLM's own report (accuracy per question kind, judge AUROC) travels inside its
folder, and so does the preference proxy's (its agreement with gold on held-out prompts beside the proxy's),
so that ``--only vlm`` or ``--only preference`` leaves the generator's and proxy's report as it was. A full build
runs the generator in this process and the proxy, then the VLM, in a second one; the preference proxy, which
is sampled from the generator and fine-tuned from the proxy, is built here once both are done. CPU seconds and
the virtual machine's CPU steal are reported beside wall seconds: on a shared machine they tell what the build costs apart from the
load.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections import defaultdict
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from mmalign.eval.agreement import agreement
from mmalign.eval.best_of_k import variance_components
from mmalign.files import folder_size
from mmalign.world.assets import ASSETS_DIR, SAMPLER, generate, load_pipeline, load_proxy
from mmalign.world.captions import prompt_set
from mmalign.world.generator import IMAGE_SIZE, GeneratorRecipe, build_generator
from mmalign.world.motion_proxy import MotionProxyRecipe, build_motion_proxy
from mmalign.world.preference import PreferenceRecipe, build_preference, build_preference_ensemble
from mmalign.world.proxy import ProxyRecipe, build_proxy, proxy_scores
from mmalign.world.render import render_batch
from mmalign.world.verify import verify_batch
from mmalign.world.video_build import build_video
from mmalign.world.video_generator import VideoGeneratorRecipe
from mmalign.world.vlm import build_vlm

__all__ = ["MODELS", "build", "evaluate", "reconstruction"]

#: Buildable models and the asset folder each is saved to.
MODELS: dict[str, str] = {"generator": "pipeline", "proxy": "proxy", "vlm": "vlm", "preference": "preference",
                          "preference-ensemble": "preference_ensemble", "video-generator": "video_pipeline",
                          "motion-proxy": "motion_proxy"}
#: the models built on the generator (and the proxy, or the video generator): built here, after them, in order
_FROM_BOTH = ("preference", "preference-ensemble", "video-generator", "motion-proxy")
#: members per label set of the preference ensembles (docs/overoptimization.md)
ENSEMBLE_MEMBERS = 3
REPORT = "build_report.json"


def _swap_in(build_fn, target: Path):
    """Run ``build_fn(tmp)`` and replace ``target`` by ``tmp`` once it has succeeded; returns its result."""
    tmp = target.with_name(f".{target.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    result = build_fn(tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return result


def _sibling(target: Path, name: str) -> Path | None:
    """The folder of model ``name`` beside ``target`` when this build's output has one, else None (shipped)."""
    folder = target.parent / MODELS[name]
    return folder if folder.is_dir() else None


def _build_one(name: str, target: Path, recipes: dict, steps: int | None, progress: bool,
               threads: int | None = None) -> tuple:
    """Build model ``name`` into ``target`` (here or in a worker process); returns (result, wall s, CPU s)."""
    if threads is not None:
        torch.set_num_threads(threads)
    builders = {
        "generator": lambda folder: build_generator(folder, recipes["generator"], progress,
                                                    work=target.with_name(f".{target.name}.work")),
        "proxy": lambda folder: build_proxy(folder, recipes["proxy"], progress),
        "vlm": lambda folder: build_vlm(folder, steps, progress=progress),
        "preference": lambda folder: build_preference(
            folder, recipes["preference"], _sibling(target, "generator"), _sibling(target, "proxy"), progress,
            evaluate_prompts=64 if steps is None else 2,
        ),
        "preference-ensemble": lambda folder: build_preference_ensemble(
            folder, recipes["preference"], ENSEMBLE_MEMBERS, _sibling(target, "generator"), _sibling(target, "proxy"),
            progress,
        ),
        "video-generator": lambda folder: build_video(folder, recipes["video"], _sibling(target, "generator"),
                                                      progress, work=target.with_name(f".{target.name}.work"),
                                                      evaluate_prompts=48 if steps is None else 2),
        "motion-proxy": lambda folder: build_motion_proxy(folder, recipes["motion"], progress,
                                                          _sibling(target, "video-generator"),
                                                          evaluate_prompts=48 if steps is None else 2),
    }
    start, cpu = time.perf_counter(), time.process_time()
    result = _swap_in(builders[name], target)
    return result, round(time.perf_counter() - start, 1), round(time.process_time() - cpu, 1)


def _cpu_ticks() -> tuple[int, int] | None:
    """(stolen, total) CPU ticks since boot from ``/proc/stat`` (Linux), or None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def _outcome(result):
    """A worker's future or a result computed here, as the result."""
    return result.result() if isinstance(result, Future) else result


def build(
    only: str | None = None,
    out: str | Path | None = None,
    steps: int | None = None,
    evaluate_prompts: int = 96,
    progress: bool = True,
    parallel: bool = True,
    threads: int | None = None,
) -> dict:
    """Build ``only`` one model (a key of ``MODELS``) or all of them into ``out`` (default: the package assets).

    ``steps`` replaces every stage's step count (and renders only as many scenes as those steps use), for
    smoke tests; the shipped models use the recipes' defaults. ``evaluate_prompts`` prompts per split score
    the generator and proxy (0 skips that; the VLM always evaluates itself). Returns the report, which is
    also written to ``out/build_report.json`` when the generator or proxy was built.

    With ``parallel`` and two or more CPUs, a build of several models trains the generator (the longest) in
    this process and the others, one after another, in a worker process, each process on half the CPUs:
    the models are independent, and small CPU models use two processes of one thread far better than one
    process of two threads. ``threads`` sets torch's threads per process (default: the CPUs over the processes).
    """
    if only is not None and only not in MODELS:
        raise ValueError(f"only: expected one of {sorted(MODELS)} or None, got {only!r}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps: expected a positive int or None, got {steps!r}")
    out = Path(out) if out is not None else ASSETS_DIR
    out.mkdir(parents=True, exist_ok=True)
    names = [only] if only else list(MODELS)
    cpus = os.cpu_count() or 1
    processes = 2 if parallel and len(names) > 1 and cpus >= 2 else 1
    if threads or processes > 1:
        torch.set_num_threads(threads or cpus // processes)
    report: dict = {"load_average_start": os.getloadavg(), "processes": processes,
                    "threads": torch.get_num_threads(), "seconds": {}, "cpu_seconds": {}}
    recipes = {"generator": GeneratorRecipe(), "proxy": ProxyRecipe(), "preference": PreferenceRecipe(),
               "video": VideoGeneratorRecipe(), "motion": MotionProxyRecipe()}
    if steps is not None:
        gen, proxy = recipes["generator"], recipes["proxy"]
        recipes["generator"] = replace(gen, vae_steps=steps, unet_steps=steps, warmup=1,
                                       scenes=min(gen.scenes, steps * gen.unet_batch))
        recipes["proxy"] = replace(proxy, steps=steps, scenes=min(proxy.scenes, steps * proxy.batch))
        recipes["preference"] = replace(recipes["preference"], steps=steps, prompts=2, samples_per_prompt=2,
                                        num_inference_steps=2, prompts_per_step=2)
        recipes["video"] = replace(recipes["video"], steps=steps, clips=16, batch=2, warmup=1)
        recipes["motion"] = replace(recipes["motion"], steps=steps, clips=16, batch=4)
    job = (recipes, steps, progress)
    start, ticks = time.perf_counter(), _cpu_ticks()
    pair_names = [n for n in names if n in ("generator", "proxy")]
    with ExitStack() as stack:
        if processes > 1:  # the preference proxy is built from the other two: here, once they are done
            pool = stack.enter_context(ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")))
            results = {n: pool.submit(_build_one, n, out / MODELS[n], *job, report["threads"])
                       for n in names[1:] if n not in _FROM_BOTH}
            results[names[0]] = _build_one(names[0], out / MODELS[names[0]], *job)
        else:
            results = {n: _build_one(n, out / MODELS[n], *job) for n in pair_names}
        for name in pair_names:
            _, report["seconds"][name], report["cpu_seconds"][name] = _outcome(results[name])
        if pair_names:
            report["recipes"] = {n: vars(recipes[n]) for n in ("generator", "proxy")}
            pair = [out / MODELS["generator"], out / MODELS["proxy"]]
            if evaluate_prompts and all(f.is_dir() for f in pair):
                evaluation_start = time.perf_counter()
                report["evaluation"] = evaluate(*pair, evaluate_prompts, progress=progress)
                report["seconds"]["evaluation"] = round(time.perf_counter() - evaluation_start, 1)
            report["seconds"]["generator_proxy_and_evaluation_wall"] = round(time.perf_counter() - start, 1)
        for name in (n for n in _FROM_BOTH if n in names):
            report[name], report["seconds"][name], report["cpu_seconds"][name] = (
                _build_one(name, out / MODELS[name], *job)
            )
        if "vlm" in names:
            outcome = _outcome(results["vlm"]) if "vlm" in results else _build_one("vlm", out / MODELS["vlm"], *job)
            report["vlm"], report["seconds"]["vlm"], report["cpu_seconds"]["vlm"] = outcome
    report["seconds"]["wall"] = round(time.perf_counter() - start, 1)
    report["load_average_end"] = os.getloadavg()
    if ticks is not None and (now := _cpu_ticks()) is not None and now[1] > ticks[1]:
        # on a virtual machine, the share of CPU time the host gave to others: wall time grows by about 1/(1 − it)
        report["cpu_steal_fraction"] = round((now[0] - ticks[0]) / (now[1] - ticks[1]), 3)
    report["sizes_bytes"] = {n: folder_size(out / f) for n, f in MODELS.items() if (out / f).is_dir()}
    if pair_names:
        (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def evaluate(
    pipeline_dir: str | Path,
    proxy_dir: str | Path,
    prompts: int = 96,
    samples_per_prompt: int = 4,
    seed: int = 1000,
    batch: int = 128,
    progress: bool = True,
) -> dict:
    """Gold scores of the generator per split and attribute type, where their spread comes from (between or
    within prompts), the VAE's own ceiling (gold on its reconstructions of clean renders) and the proxy's
    agreement with gold.

    ``prompts`` fresh prompts per split (seeded apart from the training scenes), ``samples_per_prompt``
    images each with the ``SAMPLER`` settings; agreement compares proxy and gold on those same images.
    """
    from tqdm.auto import tqdm

    pipe = load_pipeline(path=str(pipeline_dir))
    model, _, tokenizer = load_proxy(path=str(proxy_dir))
    result: dict = {"sampler": dict(SAMPLER), "prompts_per_split": prompts, "samples_per_prompt": samples_per_prompt,
                    "seconds_64_samples_10_steps": _sampling_seconds(pipe)}
    for split in ("train", "heldout"):
        items = [p for p in prompt_set(split, prompts, seed) for _ in range(samples_per_prompt)]
        texts = [p.text for p in items]
        images = torch.cat([
            generate(pipe, texts[i : i + batch], seed=seed + i)
            for i in tqdm(range(0, len(items), batch), desc=f"sample {split}", disable=not progress)
        ])
        verdicts = verify_batch(images, [p.scene for p in items])
        gold = torch.tensor([v.score for v in verdicts])
        by_type: dict[str, list[bool]] = defaultdict(list)
        for v in verdicts:
            for check, ok in v.checks.items():
                by_type[check.split(".")[-1]].append(ok)
        proxy = proxy_scores(model, tokenizer, images, texts)
        table = gold.view(prompts, samples_per_prompt)
        groups = torch.arange(prompts).repeat_interleave(samples_per_prompt)
        noise = verify_batch(torch.rand(images.shape, generator=torch.Generator().manual_seed(seed)),
                             [p.scene for p in items])
        result[split] = {
            "gold_mean": round(float(gold.mean()), 4),
            "gold_by_attribute": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_type.items())},
            "checks_per_attribute": {k: len(v) for k, v in sorted(by_type.items())},
            "gold_variance": {k: round(v, 4) for k, v in variance_components(table).items()},
            "gold_mean_uniform_noise": round(sum(v.score for v in noise) / len(noise), 4),
            "vae_reconstruction": reconstruction(pipe.vae, [p.scene for p in prompt_set(split, 4 * prompts, seed + 1)]),
            "proxy_vs_gold": {k: round(v, 4) if isinstance(v, float) else v
                              for k, v in agreement(proxy, gold, groups).items()},
        }
    return result


def _sampling_seconds(pipe) -> float:
    """Wall seconds for 64 samples × 10 DDIM steps (guidance on): what every trainer on the world pays per batch."""
    prompts = [p.text for p in prompt_set("train", 64, 7)]
    generate(pipe, prompts[:2], num_inference_steps=2)  # warm-up
    start = time.perf_counter()
    generate(pipe, prompts, num_inference_steps=10)
    return round(time.perf_counter() - start, 2)


@torch.no_grad()
def reconstruction(vae, scenes, batch: int = 256) -> dict:
    """Gold on the VAE's reconstructions (posterior mean, decoded) of clean renders of ``scenes``: the ceiling
    the UNet trains under. ``checks_passed`` is the fraction of all stated checks that still pass."""
    images = render_batch(scenes, IMAGE_SIZE)
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(vae.device, vae.dtype) * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1).float().cpu())
    verdicts = verify_batch(torch.cat(out), scenes)
    passed = [ok for v in verdicts for ok in v.checks.values()]
    return {"renders": len(scenes), "checks_passed": round(sum(passed) / len(passed), 4),
            "gold_mean": round(sum(v.score for v in verdicts) / len(verdicts), 4)}
