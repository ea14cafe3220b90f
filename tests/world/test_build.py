"""The build scripts: tokenizer files, a few training steps of each model into a temporary folder, and the
results loaded back through the ecosystem's own loaders."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from mmalign.world.build import MODELS
from mmalign.world.captions import prompt_set, vocabulary
from mmalign.world.generator import MAX_TOKENS, GeneratorRecipe, build_generator
from mmalign.world.proxy import ProxyRecipe, build_proxy
from mmalign.world.tokenizer import EOS, build_vocab, load_tokenizer, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tok"), vocabulary(), MAX_TOKENS)


def test_every_grammar_word_is_one_token(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    for word in vocabulary():
        assert tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids) == [word + "</w>"]
    assert vocab[EOS] == len(vocab) - 1  # CLIP's layout: EOS last, so argmax pooling finds it
    caption = prompt_set("train", 1, 3)[0].text
    ids = tok(caption).input_ids
    assert ids == [tok.bos_token_id, *(vocab[w + "</w>"] for w in caption.split()), tok.eos_token_id]


def test_unknown_text_falls_back_to_bytes(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokens = tok.convert_ids_to_tokens(tok("zebra, 42!", add_special_tokens=False).input_ids)
    assert "".join(tokens).replace("</w>", "") == "zebra,42!"
    assert EOS not in tokens  # nothing became unknown


def test_vocab_is_deterministic_and_order_free():
    words = vocabulary()
    shuffled = words[:]
    random.Random(0).shuffle(shuffled)
    assert build_vocab(words) == build_vocab(shuffled)


def test_generator_build_runs_and_loads(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    recipe = GeneratorRecipe(scenes=64, vae_steps=2, vae_batch=8, unet_steps=2, unet_batch=8, warmup=1)
    folder = build_generator(tmp_path / "pipe", recipe, progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32 and pipe.unet.config.in_channels == recipe.latent_channels  # stored fp16
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the latents, not SD's constant
    out = pipe("a red circle", num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_an_interrupted_generator_build_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Killed after a UNet checkpoint, the build continues from the work folder and ends where an uninterrupted
    one does, bit for bit; the work folder is gone once the pipeline is saved."""
    from safetensors.torch import load_file

    import mmalign.world.generator as generator

    recipe = GeneratorRecipe(scenes=32, vae_steps=3, vae_batch=4, unet_steps=5, unet_batch=4, warmup=1,
                             checkpoint_every=2)
    whole = build_generator(tmp_path / "whole", recipe, progress=False, work=tmp_path / "work-whole")
    assert not (tmp_path / "work-whole").exists()

    save = generator._Resumable.maybe_save

    def save_then_die(self, step, total):
        save(self, step, total)
        if self.path.name == "unet.pt" and step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(generator._Resumable, "maybe_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_generator(tmp_path / "resumed", recipe, progress=False, work=tmp_path / "work")
    assert (tmp_path / "work" / "vae" / "config.json").is_file() and (tmp_path / "work" / "unet.pt").is_file()
    monkeypatch.setattr(generator._Resumable, "maybe_save", save)
    resumed = build_generator(tmp_path / "resumed", recipe, progress=False, work=tmp_path / "work")
    for part in ("unet", "text_encoder", "vae"):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        a, b = (load_file(folder / part / name) for folder in (whole, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    configs = [json.loads((folder / "vae" / "config.json").read_text()) for folder in (whole, resumed)]
    assert configs[0] == configs[1] and "_name_or_path" not in configs[1]  # no work-folder path in what ships


def test_a_work_folder_of_another_recipe_is_not_resumed(tmp_path):
    recipe = GeneratorRecipe(scenes=16, vae_steps=1, vae_batch=4, unet_steps=1, unet_batch=4, warmup=1)
    work = tmp_path / "work"
    (work / "vae").mkdir(parents=True)
    (work / "vae" / "config.json").write_text("{}")  # would fail to load if it were trusted
    (work / "recipe.json").write_text('{"seed": 99}')
    build_generator(tmp_path / "pipe", recipe, progress=False, work=work)
    assert not work.exists()


def test_proxy_build_runs_and_loads(tmp_path):
    import open_clip

    folder = build_proxy(tmp_path / "proxy", ProxyRecipe(scenes=32, steps=2, batch=16), progress=False)
    name = f"local-dir:{folder}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokens = open_clip.get_tokenizer(name)(["a red circle", "two blue boxes"])
    assert tokens.shape == (2, MAX_TOKENS)
    features = model.encode_text(tokens)
    assert features.shape == (2, 64) and torch.isfinite(features).all()


def test_build_swaps_in_and_reports(tmp_path):
    from mmalign.world.build import build

    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "stale.txt").write_text("old build")
    report = build("proxy", tmp_path, steps=1, evaluate_prompts=0, progress=False)
    assert not (tmp_path / "proxy" / "stale.txt").exists()
    assert (tmp_path / "proxy" / "open_clip_model.safetensors").is_file()
    assert report["processes"] == 1 and set(report["cpu_seconds"]) == {"proxy"}
    assert report["seconds"]["proxy"] <= report["seconds"]["wall"] and report["sizes_bytes"]["proxy"] > 0
    assert json.loads((tmp_path / "build_report.json").read_text())["recipes"]["proxy"]["steps"] == 1
    with pytest.raises(ValueError, match="only"):
        build("vae", tmp_path)


def test_vlm_build_swaps_in_and_leaves_the_report_alone(tmp_path, monkeypatch):
    import mmalign.world.build as build_module

    def fake_build_vlm(folder, steps, progress):  # the real build is tested in test_vlm.py
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        return {"steps": steps}

    monkeypatch.setattr(build_module, "build_vlm", fake_build_vlm)
    (tmp_path / "vlm").mkdir()
    (tmp_path / "vlm" / "stale.txt").write_text("old build")
    (tmp_path / "build_report.json").write_text('{"seconds": {"generator": 1.0}}')
    report = build_module.build("vlm", tmp_path, steps=3, progress=False)
    assert sorted(p.name for p in (tmp_path / "vlm").iterdir()) == ["config.json"]
    assert report["vlm"] == {"steps": 3} and set(report["seconds"]) == {"vlm", "wall"}
    assert (tmp_path / "build_report.json").read_text() == '{"seconds": {"generator": 1.0}}'


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a parallel build needs two CPUs")
def test_parallel_build_matches_a_build_here(tmp_path):
    """All three models in two processes: the worker's proxy is the one a one-thread build here makes."""
    from safetensors.torch import load_file

    from mmalign.world.build import build

    report = build(None, tmp_path / "parallel", steps=1, evaluate_prompts=0, progress=False)
    assert report["processes"] == 2 and report["threads"] == 1
    assert 0 <= report.get("cpu_steal_fraction", 0) <= 1
    assert set(report["cpu_seconds"]) == set(MODELS) and all(v > 0 for v in report["cpu_seconds"].values())
    assert all((tmp_path / "parallel" / folder).is_dir() for folder in MODELS.values())
    build("proxy", tmp_path / "here", steps=1, evaluate_prompts=0, progress=False, threads=1)
    weights = [load_file(tmp_path / d / "proxy" / "open_clip_model.safetensors") for d in ("parallel", "here")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
