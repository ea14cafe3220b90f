"""The preference proxy: its Bradley–Terry loss, that fine-tuning fits given preferences, and its build."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from mmalign.world import render_batch, sample_scenes
from mmalign.world.assets import load_proxy
from mmalign.world.captions import caption
from mmalign.world.preference import (
    Comparisons,
    PreferenceRecipe,
    train_preference,
)
from mmalign.world.proxy import proxy_scores
from mmalign.world.scenes import COLOURS


def _pairwise_accuracy(model, tokenizer, data: Comparisons) -> float:
    scores = proxy_scores(model, tokenizer, data.images, data.texts).view(-1, 2)
    gold = data.gold.view(-1, 2)
    return float(((scores[:, 0] > scores[:, 1]) == (gold[:, 0] > gold[:, 1])).float().mean())


def _other_colour(colour: str) -> str:
    names = list(COLOURS)
    return names[(names.index(colour) + 3) % len(names)]


def test_fine_tuning_learns_preferences_the_proxy_does_not_hold():
    """Each prompt's render with a colour swapped is labelled the better one: the shipped proxy ranks the true
    render higher; a few hundred Bradley–Terry steps must turn most of those rankings round."""
    scenes = [s for s in sample_scenes(40, split="train", seed=5) if len(s.objects) == 1][:24]
    recoloured = [replace(s, objects=(replace(s.objects[0], colour=_other_colour(s.objects[0].colour)),))
                  for s in scenes]
    clean, swapped = render_batch(scenes, size=32, seed=5), render_batch(recoloured, size=32, seed=5)
    images = torch.stack([clean, swapped], 1).flatten(0, 1)
    texts = [caption(s, rng=i) for i, s in enumerate(scenes) for _ in range(2)]
    data = Comparisons(images, texts, torch.tensor([0.0, 1.0]).repeat(len(scenes)), samples_per_prompt=2)
    model, _, tokenizer = load_proxy()
    before = _pairwise_accuracy(model, tokenizer, data)
    recipe = replace(PreferenceRecipe(), steps=60, prompts_per_step=8, lr=1e-3)
    train_preference(model, tokenizer, data, recipe, progress=False)
    after = _pairwise_accuracy(model, tokenizer, data)
    assert before < 0.3 and after > 0.8, (before, after)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_preference_build_swaps_in_loads_and_reports(tmp_path):
    import open_clip

    from mmalign.rewards import build as build_reward
    from mmalign.world.build import build

    report = build("preference", tmp_path, steps=1, progress=False)
    folder = tmp_path / "preference"
    assert json.loads((folder / "build_report.json").read_text()) == json.loads(json.dumps(report["preference"]))
    assert report["preference"]["comparisons"] == 4 and "heldout" in report["preference"]
    assert set(report["preference"]["heldout"]["best_of_k"]) == {"gold", "proxy", "preference"}
    assert not (tmp_path / "build_report.json").exists()  # the generator's and proxy's report is not touched
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert model.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(["a red circle"])).shape == (1, 64)
    reward = build_reward({"name": "preference_proxy", "model": str(folder), "scale": 1.0})
    from mmalign import MediaBatch

    scores = reward(MediaBatch(torch.rand(2, 3, 32, 32), ["a red circle", "two blue boxes"])).scores
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores.abs().max() <= 1
