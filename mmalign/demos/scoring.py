"""What the demos compute, without gradio: sample a generator at shown seeds, score images with every configured
reward (components and uncertainty kept), read the gold verdict of world prompts, compare two images.

Images are rounded to 8 bits before they are scored, so the PNG a user sees is exactly what was judged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmalign.eval.generator import evaluate_generator, load_generator
from mmalign.eval.scoring import score_batch
from mmalign.media import MediaBatch
from mmalign.rewards import Reward
from mmalign.world.captions import scene_from_prompt
from mmalign.world.scenes import Scene
from mmalign.world.verify import GoldResult, verify_batch

__all__ = ["Sampler", "Scored", "compare_pair", "load_sampler", "quantize", "sample", "score_images", "world_scene"]


@dataclass
class Sampler:
    """A generator as the demos use it: its adapter, sampling policy and settings (``load_generator``'s)."""

    adapter: Any
    policy: Any
    settings: dict[str, Any]


def load_sampler(pipeline: str | None = None, run: str | None = None, device: str = "cpu",
                 num_steps: int | None = None, eta: float | None = None,
                 guidance_scale: float | None = None) -> Sampler:
    """A pipeline ('world', a hub id, a folder) or a training run's result, with its sampler settings."""
    return Sampler(*load_generator(run, pipeline, device, num_steps, eta, guidance_scale))


def world_scene(prompt: str) -> tuple[Scene | None, str | None]:
    """``(scene, None)`` for a world-grammar prompt; ``(None, why)`` for any other (gold has nothing to check)."""
    try:
        return scene_from_prompt(prompt), None
    except (ValueError, TypeError) as err:
        return None, str(err)


def quantize(pixels: torch.Tensor) -> torch.Tensor:
    """``pixels`` rounded to the 8-bit values a PNG stores."""
    return (pixels.detach().float().clamp(0, 1) * 255).round() / 255


def sample(sampler: Sampler, prompt: str, n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """``n`` images of ``prompt`` (8-bit values) and their seeds: image ``i`` is drawn alone from seed ``seed + i``
    (``evaluate_generator`` with batches of one), so any image can be drawn again from the seed shown."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt: expected a non-empty text, got {prompt!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of images, got {n!r}")
    result = evaluate_generator(sampler.adapter, sampler.policy, [(prompt, {})], {}, samples_per_prompt=n,
                                seed=int(seed), batch_size=1, progress=False)
    return quantize(result.batch.pixels), [int(seed) + i for i in range(n)]


@dataclass
class Scored:
    """Images with every reward's columns (``name``, ``name/component``, ``name/uncertainty``, each ``(B,)``),
    the gold verdicts when the prompt states a world scene, and why a reward gave no scores (``notes``)."""

    pixels: torch.Tensor
    prompt: str
    seeds: list[int | None]
    columns: dict[str, torch.Tensor] = field(default_factory=dict)
    verdicts: list[GoldResult] | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready row per image: index, seed, every column (None where not finite)."""
        rows = []
        for i, seed in enumerate(self.seeds):
            row: dict[str, Any] = {"image": i, "seed": seed}
            for name, values in self.columns.items():
                value = float(values[i])
                row[name] = round(value, 6) if math.isfinite(value) else None
            rows.append(row)
        return rows


def score_images(rewards: Mapping[str, Reward], pixels: torch.Tensor, prompt: str,
                 seeds: Sequence[int | None] | None = None) -> Scored:
    """Score ``pixels`` ``(B, 3, H, W)`` for ``prompt`` with each reward; a reward that cannot score them (gold
    without a world prompt, say) is noted, not fatal. World prompts also get the gold verdicts."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels: expected a (B, 3, H, W) tensor of images, got {got}")
    seeds = list(seeds) if seeds is not None else [None] * len(pixels)
    if len(seeds) != len(pixels):
        raise ValueError(f"seeds: expected one per image ({len(pixels)}), got {len(seeds)}")
    scene, why = world_scene(prompt)
    metadata = [{"scene": scene} if scene is not None else {} for _ in range(len(pixels))]
    batch = MediaBatch(pixels, [prompt] * len(pixels), metadata)
    scored = Scored(pixels, prompt, seeds)
    for name, reward in rewards.items():
        try:
            scored.columns.update(score_batch({name: reward}, batch, progress=False))
        except ValueError as err:
            scored.notes[name] = str(err)
    if scene is not None:
        scored.verdicts = verify_batch(pixels, [scene] * len(pixels))
    else:
        scored.notes["verdict"] = f"no gold verdict to draw: {why}"
    return scored


def compare_pair(scored: Scored, a: int, b: int) -> list[dict[str, Any]]:
    """Image ``a`` against image ``b`` under every reward column (components included): both scores, ``a − b``
    and which one the column prefers ("a", "b" or "tie")."""
    count = len(scored.pixels)
    for name, index in (("a", a), ("b", b)):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(f"{name}: expected an image index from 0 to {count - 1}, got {index!r}")
    rows = []
    for column, values in scored.columns.items():
        if column.endswith("/uncertainty"):
            continue
        sa, sb = float(values[a]), float(values[b])
        rows.append({"column": column, "a": round(sa, 6), "b": round(sb, 6), "a_minus_b": round(sa - sb, 6),
                     "prefers": "a" if sa > sb else "b" if sb > sa else "tie"})
    return rows
