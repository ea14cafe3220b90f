"""Building the world's video generator: train it (``video_generator``), watch gold as it trains, measure it.

``build_video`` is what ``mmalign world build --only video-generator`` runs: the motion adapter and new word
embeddings trained on the image pipeline (the one the build just made, else the shipped one), gold of a few
clips every ``MONITOR_EVERY`` steps, then ``evaluate_video_generator`` on fresh train and held-out clips; its
``build_report.json`` travels inside the folder, so this build leaves the other models' reports alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmalign.files import folder_size, write_text_atomic
from mmalign.models.video import travelling_noise
from mmalign.world.assets import load_pipeline, pipeline_path
from mmalign.world.generator import IMAGE_SIZE
from mmalign.world.video import (
    DIRECTIONS,
    MOTION_KINDS,
    render_videos,
    stated_direction,
    verify_videos,
    video_prompt_set,
)
from mmalign.world.video_generator import VideoGeneratorRecipe, assemble_video_pipeline, build_video_generator

__all__ = ["MONITOR_EVERY", "VIDEO_SAMPLER", "build_video", "evaluate_video_generator", "sample_videos"]

#: steps between the gold checks of a build
MONITOR_EVERY = 250
#: sampler settings of the reported gold scores (DDIM on the image pipeline's scheduler)
VIDEO_SAMPLER: dict[str, int | float] = {"frames": 8, "num_inference_steps": 20, "guidance_scale": 5.0}


@torch.no_grad()
def sample_videos(pipe, prompts, seed: int = 0, frames: int = 8, num_inference_steps: int = 20,
                  guidance_scale: float = 5.0, batch: int = 16, noise_speed: float | None = None) -> torch.Tensor:
    """``(B, frames, 3, H, W)`` clips in [0, 1], one per prompt; batch ``k`` draws its noise from ``seed + k``:
    independent in every frame, or with ``noise_speed`` (latent pixels per frame) travelling along each
    caption's motion (``mmalign.models.video.travelling_noise``)."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    out = []
    for k, start in enumerate(range(0, len(prompts), batch)):
        chunk, generator = list(prompts[start : start + batch]), torch.Generator().manual_seed(seed + k)
        latents = None
        if noise_speed is not None:
            size = pipe.unet.config.sample_size
            shape = (pipe.unet.config.in_channels, frames, size, size)
            directions = [DIRECTIONS[stated_direction(p, "prompts")] for p in chunk]
            latents = travelling_noise(directions, shape, generator, noise_speed).to(pipe.device, pipe.unet.dtype)
        result = pipe(chunk, num_frames=frames, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=generator, latents=latents, output_type="pt")
        out.append(result.frames.float().clamp(0, 1).cpu())
    return torch.cat(out)


def evaluate_video_generator(pipe, prompts: int = 48, samples_per_prompt: int = 1, seed: int = 1000,
                             frames: int = 8, num_inference_steps: int = 20, guidance_scale: float = 5.0,
                             splits=("train", "heldout"), noise_speed: float | None = None) -> dict:
    """Gold (``gold_video``) of the pipeline's clips per split and kind of attribute, beside the same clips
    judged against shuffled captions (what matching the prompt is worth) and jittered renders (the ceiling).
    ``motion_if_stated`` is the clips' motion pass rate had every caption stated that one direction: motion's
    chance level, for a generator whose clips move but not where they are told. ``noise_speed``: as in
    ``sample_videos``; ``flicker`` is the mean absolute difference of consecutive frames."""
    result: dict = {"prompts_per_split": prompts, "samples_per_prompt": samples_per_prompt, "frames": frames,
                    "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                    "noise_speed": noise_speed}
    for split in splits:
        clips = [c for c in video_prompt_set(split, prompts, seed) for _ in range(samples_per_prompt)]
        videos = sample_videos(pipe, [c.text for c in clips], seed, frames, num_inference_steps, guidance_scale,
                               noise_speed=noise_speed)
        scenes, motions = [c.scene for c in clips], [c.motion for c in clips]
        verdicts = verify_videos(videos, scenes, motions)
        shift = samples_per_prompt  # the next prompt's caption
        shuffled = verify_videos(videos, scenes[shift:] + scenes[:shift], motions[shift:] + motions[:shift])
        by_kind = {}
        for kind in MOTION_KINDS:
            values = [v for r in verdicts for name, v in r.checks.items() if name.split(".")[-1] == kind]
            if values:
                by_kind[kind] = round(sum(values) / len(values), 4)
        moved = {}
        for direction in DIRECTIONS:
            told = verify_videos(videos, scenes, [replace(m, direction=direction) for m in motions])
            passed = [v for r in told for name, v in r.checks.items() if name.endswith(".motion")]
            moved[direction] = round(sum(passed) / len(passed), 4)
        renders = verify_videos(render_videos(clips, frames, IMAGE_SIZE, 1.0, seed), scenes, motions)
        result[split] = {
            "gold_mean": round(sum(r.score for r in verdicts) / len(verdicts), 4),
            "gold_by_kind": by_kind,
            "gold_shuffled_captions": round(sum(r.score for r in shuffled) / len(shuffled), 4),
            "motion_if_stated": moved,
            "flicker": round((videos[:, 1:] - videos[:, :-1]).abs().mean().item(), 4),
            "gold_renders": round(sum(r.score for r in renders) / len(renders), 4),
        }
    return result


def build_video(folder: str | Path, recipe: VideoGeneratorRecipe, base: str | Path | None = None,
                progress: bool = True, work: str | Path | None = None, evaluate_prompts: int = 48) -> dict:
    """Train the video generator on the image pipeline in ``base`` (None: the shipped one), save it in ``folder``
    with its ``build_report.json`` (recipe, the gold checks during training, the final evaluation, seconds,
    size) and return the report. ``work`` keeps the resumable checkpoint."""
    base = Path(base) if base is not None else Path(pipeline_path())
    start = time.perf_counter()
    monitor_rows: list[dict] = []
    history = Path(work) / "monitor.jsonl" if work is not None else None
    if history is not None and history.is_file():  # rows of an interrupted build
        monitor_rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]

    def monitor(step: int, pipe) -> None:
        row = {"step": step, **evaluate_video_generator(pipe, prompts=8, num_inference_steps=10)}
        monitor_rows[:] = [r for r in monitor_rows if r["step"] < step] + [row]
        if progress:
            print(f"step {step}: gold train {row['train']['gold_mean']:.3f} (motion "
                  f"{row['train']['gold_by_kind'].get('motion', float('nan')):.2f}), held-out "
                  f"{row['heldout']['gold_mean']:.3f} (motion {row['heldout']['gold_by_kind'].get('motion', float('nan')):.2f})")
        if history is not None:
            with history.open("a") as f:
                f.write(json.dumps(row) + "\n")

    image_pipe = load_pipeline(path=str(base))
    build_video_generator(folder, image_pipe, "../pipeline", recipe, progress, work, monitor, MONITOR_EVERY)
    seconds = round(time.perf_counter() - start, 1)
    report: dict = {"recipe": recipe.__dict__, "base": str(base), "train_seconds": seconds, "monitor": monitor_rows}
    if evaluate_prompts:
        pipe = assemble_video_pipeline(folder, base)
        evaluation_start = time.perf_counter()
        report["evaluation"] = evaluate_video_generator(pipe, evaluate_prompts, **VIDEO_SAMPLER)
        report["evaluation_seconds"] = round(time.perf_counter() - evaluation_start, 1)
    report["size_bytes"] = folder_size(folder)
    write_text_atomic(Path(folder) / "build_report.json", json.dumps(report, indent=2) + "\n")
    return report
