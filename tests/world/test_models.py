"""The shipped world models: they load offline through the standard loaders, fit the size budget, and the
generator's samples score far above noise under the gold verifier."""

from __future__ import annotations

import pytest
import torch

from mmalign.world import assets
from mmalign.world.captions import prompt_set, vocabulary
from mmalign.world.render import render_batch
from mmalign.world.verify import verify_batch

MB = 1024 * 1024


@pytest.fixture(scope="module")
def pipe():
    return assets.load_pipeline()


@pytest.fixture(scope="module")
def proxy():
    return assets.load_proxy()


def test_plain_diffusers_loads_and_runs_the_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(assets.pipeline_path())
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    images = pipe(["a red circle", "two blue boxes on a white background"], num_inference_steps=4,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_shipped_tokenizers_hold_the_grammar(pipe, proxy):
    _, _, proxy_tokenizer = proxy
    for word in vocabulary():
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    text = "a small red disc on the left on a grey background"
    assert proxy_tokenizer([text])[0].tolist() == pipe.tokenizer(
        text, padding="max_length", max_length=proxy_tokenizer.context_length).input_ids


def test_sizes_fit_the_budget():
    sizes = {name: sum(f.stat().st_size for f in (assets.ASSETS_DIR / name).rglob("*") if f.is_file())
             for name in ("pipeline", "proxy", "preference")}
    assert all(size <= 10 * MB for size in sizes.values()), sizes
    total = sum(f.stat().st_size for f in assets.ASSETS_DIR.rglob("*") if f.is_file())
    assert total <= 30 * MB, total


def test_vae_scaling_factor_whitens_latents(pipe):
    scenes = [p.scene for p in prompt_set("train", 64, 5)]
    images = render_batch(scenes, 32, 1.0, seed=5)
    with torch.no_grad():
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(0))
    assert float((latents * pipe.vae.config.scaling_factor).std()) == pytest.approx(1.0, abs=0.2)


def test_the_vae_is_not_the_limit(pipe):
    """Reconstructions of clean renders keep what the verifier reads (the second edition's 16×16×12 latents:
    ≥ 0.97 of the checks on held-out scenes in the build report; the first edition's 4 channels kept 0.63)."""
    from mmalign.world.build import reconstruction

    for split in ("train", "heldout"):
        result = reconstruction(pipe.vae, [p.scene for p in prompt_set(split, 96, 5)])
        assert result["checks_passed"] >= 0.95, (split, result)


def test_samples_score_far_above_noise(pipe):
    prompts = prompt_set("heldout", 8, 11) + prompt_set("train", 8, 11)
    images = assets.generate(pipe, [p.text for p in prompts], seed=0)
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    gold = torch.tensor([v.score for v in verify_batch(images, [p.scene for p in prompts])])
    gold_noise = torch.tensor([v.score for v in verify_batch(noise, [p.scene for p in prompts])])
    assert gold.mean() > gold_noise.mean() + 0.2, (gold, gold_noise)


def test_proxy_through_open_clip_prefers_true_captions(proxy):
    model, preprocess, tokenizer = proxy
    prompts = prompt_set("train", 16, 21)
    images = render_batch([p.scene for p in prompts], 32, 1.0, seed=21)
    mean = torch.tensor(preprocess.transforms[-1].mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.transforms[-1].std).view(1, 3, 1, 1)
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image((images - mean) / std), dim=-1)
        text = torch.nn.functional.normalize(model.encode_text(tokenizer([p.text for p in prompts])), dim=-1)
    similarity = image @ text.T
    # each render is closer to its own caption than the average caption is (chance would be 50%)
    assert (similarity.diag() > similarity.mean(1)).float().mean() > 0.8
    # the PIL preprocessing open_clip ships gives the same input as normalising the tensor directly
    from PIL import Image

    pil = Image.fromarray((images[0].permute(1, 2, 0) * 255).round().byte().numpy())
    assert torch.allclose(preprocess(pil), ((images[0] - mean[0]) / std[0]), atol=1e-2)
