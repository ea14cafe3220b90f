"""The preference proxy: its Bradley–Terry loss, that fine-tuning fits given preferences, and its build."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
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


def test_label_flips_hit_a_quarter_of_the_pairs_and_depend_on_the_data_seed_only():
    from mmalign.world.preference import label_flips

    data = Comparisons(torch.zeros(4000, 3, 32, 32), ["a red circle"] * 4000, torch.rand(4000), samples_per_prompt=4)
    recipe = replace(PreferenceRecipe(), label_noise=0.25)
    flips = label_flips(data, recipe)
    assert flips.shape == (1000, 6) and abs(flips.float().mean().item() - 0.25) < 0.02
    assert torch.equal(flips, label_flips(data, replace(recipe, train_seed=99)))  # every member: the same labels
    assert not torch.equal(flips, label_flips(data, replace(recipe, seed=12)))
    assert label_flips(data, PreferenceRecipe()) is None


def test_preference_ensemble_build_and_reward(tmp_path):
    """The build makes clean and noisy members in the proxy's layout; the reward standardises and combines them
    as Ensemble does, here checked against member scores combined by hand."""
    import shutil

    from mmalign import MediaBatch
    from mmalign.rewards import build as build_reward
    from mmalign.world import prompt_set
    from mmalign.world.assets import preference_path, proxy_path
    from mmalign.world.build import build

    report = build("preference-ensemble", tmp_path, steps=1, progress=False)["preference-ensemble"]
    folder = tmp_path / "preference_ensemble"
    assert sorted(report["member_seconds"]) == ["clean-0", "clean-1", "clean-2", "noisy-0", "noisy-1", "noisy-2"]
    assert report["labels"]["noisy"]["label_noise"] == 0.25 and (folder / "noisy-2" / "open_clip_config.json").is_file()
    # two members that differ for sure: the shipped proxy and preference proxy
    members = tmp_path / "members"
    shutil.copytree(proxy_path(), members / "clean-0")
    shutil.copytree(preference_path(), members / "clean-1")
    prompts = prompt_set("train", 6, seed=3)
    batch = MediaBatch(render_batch([p.scene for p in prompts], size=32, seed=3), [p.text for p in prompts])
    raw = torch.stack([build_reward({"name": "preference_proxy", "model": str(members / f"clean-{k}")})(batch).scores
                       for k in range(2)])
    z = (raw - raw.mean(1, keepdim=True)) / raw.std(1, unbiased=False, keepdim=True)
    wco = build_reward({"name": "preference_ensemble", "labels": "clean", "mode": "wco", "folder": str(members)})
    assert torch.allclose(wco(batch).scores, z.min(0).values, atol=1e-5)
    with pytest.raises(ValueError, match=r"members: expected an int from 1 to 2"):
        build_reward({"name": "preference_ensemble", "members": 3, "folder": str(members)})
    with pytest.raises(ValueError, match=r"member: 'noisy-0' is not in .*--only preference-ensemble"):
        build_reward({"name": "preference_ensemble", "labels": "noisy", "folder": str(members)})
