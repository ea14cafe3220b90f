"""Evaluate a generator: fixed-seed samples on a prompt set, scored by rewards, with confidence intervals."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mmalign.media import MediaBatch
from mmalign.models.adapter import GeneratorAdapter, SamplingPolicy
from mmalign.models.rollout import sample_trajectories, trajectory_log_probs
from mmalign.rewards import Reward

__all__ = ["DEFAULT_SAMPLER", "GeneratorEval", "evaluate_generator", "load_generator", "load_run_pipeline", "mean_ci"]

#: the sampler of ``mmalign eval`` where neither the command nor the run's config sets one
DEFAULT_SAMPLER: dict[str, float | int] = {"num_steps": 20, "eta": 1.0, "guidance_scale": 5.0}


def mean_ci(values: torch.Tensor, z: float = 1.96) -> dict[str, float]:
    """Mean with a normal-approximation 95% interval over the finite values (n ≥ 2)."""
    finite = values[torch.isfinite(values)].double()
    n = finite.numel()
    mean = float(finite.mean()) if n else math.nan
    half = z * float(finite.std()) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


@dataclass
class GeneratorEval:
    """Per-sample scores (``reward`` and ``reward/component``), the images, and a summary per column.

    ``diversity`` holds per-prompt columns (``diversity/vendi`` …, one value per prompt group in the order of
    the sorted ``metadata["group"]`` ids) once ``add_diversity`` has run; ``summary`` covers them too (their
    ``n`` counts prompts, not samples).
    """

    batch: MediaBatch
    scores: dict[str, torch.Tensor]
    diversity: dict[str, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: mean_ci(values) for name, values in {**self.scores, **self.diversity}.items()}

    def add_diversity(self, encoder=None, batch_size: int = 32) -> GeneratorEval:
        """Compute the per-prompt diversity metrics of ``mmalign.eval.diversity`` (the embedding ones with
        ``encoder``, e.g. ``image_encoder(reward)``); returns self."""
        from mmalign.eval.diversity import diversity_scores

        self.diversity = diversity_scores(self.batch, encoder=encoder, batch_size=batch_size)
        return self

    def group_prompts(self) -> list[str]:
        """The prompt of each group, in the order of the ``diversity`` columns."""
        from mmalign.eval.diversity import group_ids

        groups = group_ids(self.batch)
        return [self.batch.prompts[int((groups == g).nonzero()[0])] for g in groups.unique()]


@torch.no_grad()
def evaluate_generator(
    adapter: GeneratorAdapter,
    policy: SamplingPolicy,
    prompts: Sequence[tuple[str, dict[str, Any]]],
    rewards: Mapping[str, Reward],
    samples_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    denoiser: torch.nn.Module | None = None,
    reference: Callable[[], AbstractContextManager[torch.nn.Module]] | None = None,
) -> GeneratorEval:
    """Sample ``samples_per_prompt`` images per prompt with seeds fixed by position, score them with every reward.

    ``denoiser`` replaces the pipeline's (e.g. the reference policy of a LoRA run). With ``reference`` (a context
    giving π_ref's denoiser, e.g. the LoRA-disabled one) and a stochastic policy, the scores also hold
    ``kl_to_reference``: each sample's ``Σ_t log π(x_{t−1}|x_t) − log π_ref(x_{t−1}|x_t)`` along its own
    trajectory, whose mean estimates KL(π‖π_ref) of the sampling chains (in nats; the x-axis of over-optimisation).

    Batch ``k`` draws its noise from ``seed + k``: the same prompts and seed give the same images before and
    after training, so differences are the model's, not the noise's.
    """
    rows = [(text, {**meta, "group": g}) for g, (text, meta) in enumerate(prompts) for _ in range(samples_per_prompt)]
    batches, columns = [], {}
    starts = range(0, len(rows), batch_size)
    for k, start in enumerate(tqdm(starts, desc="evaluating", unit="batch", disable=not progress)):
        chunk = rows[start : start + batch_size]
        generator = torch.Generator().manual_seed(seed + k)
        trajectory = sample_trajectories(
            adapter, policy, [t for t, _ in chunk], [m for _, m in chunk], generator, denoiser=denoiser
        )
        media = trajectory.media()
        batches.append(media)
        if reference is not None and policy.stochastic:
            with reference() as ref:
                ref_log_probs = trajectory_log_probs(adapter, policy, ref, trajectory)
            kl = (trajectory.log_probs - ref_log_probs).sum(1)
            columns.setdefault("kl_to_reference", []).append(kl.float().cpu())
        for name, reward in rewards.items():
            out = reward(media)
            columns.setdefault(name, []).append(out.scores.float().cpu())
            for key, value in out.components.items():
                columns.setdefault(f"{name}/{key}", []).append(value.float().cpu())
    return GeneratorEval(MediaBatch.concat(batches), {k: torch.cat(v) for k, v in columns.items()})


def load_run_pipeline(run_dir: str | Path):
    """The pipeline a training run produced: its base with the exported LoRA, or its saved full pipeline;
    with the run's sampler settings (``num_steps``, ``eta``, ``guidance_scale``)."""
    from mmalign.models.pipelines import load_pipeline

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run: expected a training run folder, got {str(run_dir)!r} which is not a directory")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"run: {str(run_dir)!r} is not a run folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"run: {str(config_path)!r} is not valid JSON ({err}); was the run interrupted?") from None
    if not isinstance(config, dict):
        raise ValueError(f"run: {str(config_path)!r}: expected a JSON object, got {type(config).__name__}")
    if (run_dir / "pipeline" / "model_index.json").is_file():
        pipe = load_pipeline(str(run_dir / "pipeline"))
    elif (run_dir / "lora").is_dir():
        if "pipeline" not in config:
            raise ValueError(f"run: {str(config_path)!r} names no base 'pipeline' for the LoRA in lora/")
        pipe = load_pipeline(config["pipeline"], motion_adapter=config.get("motion_adapter"),
                             scheduler=config.get("scheduler"))
        try:
            pipe.load_lora_weights(str(run_dir / "lora"))
        except OSError as err:
            raise ValueError(f"run: {str(run_dir / 'lora')!r} holds no readable LoRA weights ({err}); has the run "
                             "finished?") from None
    else:
        raise ValueError(f"run: {str(run_dir)!r} has no exported weights (lora/ or pipeline/); has it finished?")
    sampler = {k: config[k] for k in ("num_steps", "eta", "guidance_scale") if k in config}
    return pipe, sampler


def load_generator(run: str | Path | None = None, pipeline: str | None = None, device: str = "cpu",
                   num_steps: int | None = None, eta: float | None = None, guidance_scale: float | None = None,
                   num_frames: int | None = None):
    """``(adapter, policy, settings)`` of a training run's result or a pipeline ('world', a hub id, a folder),
    on ``device``: each sampler setting given, else the run's, else ``DEFAULT_SAMPLER``'s. ``num_frames`` (video
    pipelines only) overrides the run's frame count, else the pipeline's default; a run's travelling noise
    (``video.noise_speed``) is kept. ``settings`` holds them and the
    ``pipeline`` name (the run's base for a run)."""
    from mmalign.models.pipelines import adapter_for, load_pipeline

    if (run is None) == (pipeline is None):
        raise ValueError("give exactly one of --run RUN_FOLDER or --pipeline NAME_OR_PATH (in a recipe: run or pipeline)")
    video: dict[str, int | float] = {}
    if run is not None:
        pipe, sampler = load_run_pipeline(run)
        run_config = json.loads((Path(run) / "config.json").read_text())
        name = run_config.get("pipeline")
        video = {k: v for k, v in (run_config.get("video") or {}).items() if v is not None}  # frames, noise
    else:
        pipe, sampler, name = load_pipeline(pipeline), {}, pipeline
    if num_frames is not None:
        video["num_frames"] = num_frames
    given = {"num_steps": num_steps, "eta": eta, "guidance_scale": guidance_scale}
    settings = {k: v if v is not None else sampler.get(k, DEFAULT_SAMPLER[k]) for k, v in given.items()}
    adapter = adapter_for(pipe.to(device), settings["guidance_scale"], **video)
    return adapter, adapter.make_policy(settings["num_steps"], settings["eta"]), {"pipeline": name, **settings}
