"""Preference pairs labelled by the gold verifier: a reward-model test set that needs no human labels.

Several samples of one prompt from the world generator are compared by their gold scores; the better one is
the preferred image. ``mmalign eval reward --pairs`` then measures how often a reward (the proxy, an ensemble)
agrees with the truth, which is what reward hacking erodes.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

__all__ = ["write_gold_pairs"]


def write_gold_pairs(
    out_dir: str | Path,
    n_prompts: int = 64,
    samples_per_prompt: int = 4,
    split: str = "heldout",
    seed: int = 0,
    min_gap: float = 0.0,
    ties: bool = False,
    pipeline=None,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    progress: bool = True,
) -> Path:
    """Sample the world generator, save the images, and write ``pairs.jsonl`` labelled by gold.

    Every two samples of a prompt form a pair; the one with the higher gold score is preferred when the scores
    differ by more than ``min_gap``; closer pairs are written as ties when ``ties`` is set, else dropped.
    Rows carry the scene, so the gold reward itself can be evaluated on them (it scores 100%).
    """
    from mmalign.eval.generator import evaluate_generator
    from mmalign.models.ddim import DDIMPolicy
    from mmalign.models.stable_diffusion import StableDiffusionAdapter
    from mmalign.prompts import PromptSource, load_prompts
    from mmalign.world.assets import load_pipeline
    from mmalign.world.gold import GoldReward

    pipe = pipeline if pipeline is not None else load_pipeline()
    adapter = StableDiffusionAdapter(pipe, guidance_scale)
    policy = DDIMPolicy(pipe.scheduler.config, num_steps, 1.0)
    prompts = load_prompts(PromptSource(world=split, n=n_prompts, seed=seed))
    result = evaluate_generator(adapter, policy, prompts, {"gold": GoldReward()}, samples_per_prompt, seed, progress=progress)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(result.batch.to_pil()):
        names.append(f"images/{i:05d}.png")
        image.save(out / names[-1])
    gold = result.scores["gold"]
    rows = []
    for g in range(len(prompts)):
        members = range(g * samples_per_prompt, (g + 1) * samples_per_prompt)
        for a, b in itertools.combinations(members, 2):
            gap = float(gold[a] - gold[b])
            if abs(gap) <= min_gap and not ties:
                continue
            label = "tie" if abs(gap) <= min_gap else "a" if gap > 0 else "b"
            scene = result.batch.metadata[a]["scene"]
            rows.append({"prompt": result.batch.prompts[a], "a": names[a], "b": names[b], "label": label,
                         "gold_a": float(gold[a]), "gold_b": float(gold[b]), "scene": scene})
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
