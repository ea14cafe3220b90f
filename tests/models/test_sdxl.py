"""The SDXL adapter on a tiny random SDXL pipeline: conditioning against the pipeline's own, rollout and exact
re-scoring, the deterministic limit against the diffusers pipeline, each trainer's step, LoRA export, checkpointing."""

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from tiny_models import make_tiny_sdxl_pipeline

from mmalign.models.pipelines import adapter_for
from mmalign.models.rollout import sample_trajectories, sample_with_grad, trajectory_log_probs
from mmalign.models.sdxl import SDXLAdapter, SDXLEmbeds
from mmalign.trainers.lora import trainable_state

sys.path.insert(0, str(Path(__file__).parents[1] / "trainers"))
from diffusion_run import ALGORITHMS, config  # noqa: E402  (registers the brightness reward)

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def adapter():
    return adapter_for(make_tiny_sdxl_pipeline(seed=0), guidance_scale=2.0)


def test_conditioning_is_the_pipelines(adapter):
    """Two encoders, pooled embeddings and per-sample time ids (16 px, uncropped); the empty negative prompt is
    zeros under force_zeros_for_empty_prompt, and the encoding of "" without it."""
    pipe = adapter.pipeline
    assert isinstance(adapter, SDXLAdapter)
    assert adapter.frozen_modules == [pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
    embeds = adapter.encode_prompts(PROMPTS)
    assert isinstance(embeds, SDXLEmbeds) and embeds.cond.shape == (2, 32, 16 + 24)
    assert embeds.pooled.shape == (2, 12) and torch.equal(embeds.time_ids, torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2))
    assert embeds.uncond.eq(0).all() and embeds.uncond_pooled.eq(0).all()
    one = embeds[1:]
    assert isinstance(one, SDXLEmbeds) and torch.equal(one.pooled, embeds.pooled[1:]) and one.time_ids.shape == (1, 6)

    plain = adapter_for(make_tiny_sdxl_pipeline(seed=0, force_zeros_for_empty_prompt=False)).encode_prompts(PROMPTS)
    empty = pipe.encode_prompt([""] * 2, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(plain.uncond, empty[0], rtol=0, atol=0)
    torch.testing.assert_close(plain.uncond_pooled, empty[2], rtol=0, atol=0)


def test_rescoring_reproduces_the_sampled_log_probs(adapter):
    policy = adapter.make_policy(3, 1.0)
    trajectory = sample_trajectories(adapter, policy, PROMPTS, generator=torch.Generator().manual_seed(0))
    assert trajectory.latents.shape == (2, 4, 4, 8, 8) and trajectory.pixels.shape == (2, 3, 16, 16)
    assert torch.isfinite(trajectory.log_probs).all()
    assert torch.equal(trajectory_log_probs(adapter, policy, adapter.denoiser, trajectory), trajectory.log_probs)
    one = trajectory.select([1])  # the conditioning slices with the trajectory (another batch shape: fp32 rounding)
    torch.testing.assert_close(trajectory_log_probs(adapter, policy, adapter.denoiser, one), trajectory.log_probs[1:],
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("guidance_scale, negative_prompt, force_zeros",
                         [(2.0, "", True), (3.0, "blurry", True), (2.0, "", False), (1.0, "", True)])
def test_deterministic_limit_is_the_diffusers_pipeline(guidance_scale, negative_prompt, force_zeros):
    """η = 0 from the same initial latents lands where StableDiffusionXLPipeline with DDIM at η = 0 does."""
    pipe = make_tiny_sdxl_pipeline(seed=0, force_zeros_for_empty_prompt=force_zeros)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    adapter = adapter_for(pipe, guidance_scale, negative_prompt=negative_prompt)
    policy = adapter.make_policy(3, 0.0)
    trajectory = sample_trajectories(adapter, policy, PROMPTS, generator=torch.Generator().manual_seed(5))
    latents = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(5))
    expected = pipe(PROMPTS, num_inference_steps=3, guidance_scale=guidance_scale, eta=0.0, latents=latents,
                    negative_prompt=[negative_prompt] * 2 if negative_prompt else None, output_type="latent").images
    torch.testing.assert_close(trajectory.latents[:, -1], expected, rtol=1e-5, atol=1e-5)
    assert trajectory.log_probs.isnan().all()


def _trainer(tmp_path, algorithm, epochs=1, **overrides):
    trainer_class, schema, _ = ALGORITHMS[algorithm]
    base = config(str(tmp_path / algorithm), epochs, algorithm).model_dump()
    cfg = schema.model_validate({**base, "reward": ["brightness"], "prompts_per_epoch": 2, "samples_per_prompt": 2,
                                 "prompts_per_update": 2, **overrides})
    return trainer_class(cfg, pipeline=make_tiny_sdxl_pipeline(seed=0), progress=False)


@pytest.mark.parametrize("algorithm, overrides", [
    ("prdp", {}), ("ddpo", {}), ("grpo", {"shared_initial_noise": True}),
    ("backprop", {"gradient_checkpointing": True}), ("backprop", {"method": "direct_align", "grad_steps": 1}),
])
def test_each_trainer_takes_a_step(tmp_path, algorithm, overrides):
    """One epoch of full fine-tuning: the sampled steps re-score exactly (the loop checks it), the loss is
    finite and the UNet moves."""
    trainer = _trainer(tmp_path, algorithm, lora=None, **overrides)
    trainer.setup()
    before = {k: v.detach().clone() for k, v in trainable_state(trainer.loop.raw_denoiser).items()}
    try:
        metrics = trainer.train()
    finally:
        trainer.cleanup()
    assert torch.isfinite(torch.tensor(float(metrics["loss"])))
    after = trainable_state(trainer.loop.raw_denoiser)
    assert any(not torch.equal(before[k], after[k]) for k in before), "no UNet weight changed"


def test_lora_export_loads_in_plain_diffusers(tmp_path):
    """A LoRA run's export, loaded with ``load_lora_weights`` into a fresh SDXL pipeline, gives the trained
    adapter's guided outputs (and not the base model's)."""
    trainer = _trainer(tmp_path, "prdp", learning_rate=1e-2)
    trainer.train()
    exported = trainer.export()
    trainer.cleanup()
    trained = trainer.loop.adapter
    plain = make_tiny_sdxl_pipeline(seed=0)
    base = adapter_for(plain, 2.0)
    x, embeds = torch.randn(2, 4, 8, 8), trained.encode_prompts(PROMPTS)
    with torch.no_grad():
        before = base.model_output(plain.unet, x, 500, embeds)
        plain.load_lora_weights(exported)  # plain diffusers, no mmalign code
        loaded = base.model_output(plain.unet, x, 500, embeds)
        expected = trained.model_output(trainer.loop.raw_denoiser, x, 500, embeds)
    torch.testing.assert_close(loaded, expected)
    assert (before - expected).abs().max() > 1e-4


def test_gradient_checkpointing_keeps_the_gradients():
    """The UNet's own checkpointing and the sampler's give the gradients of the plain graph (fp64)."""
    pipe = make_tiny_sdxl_pipeline(seed=0).to(torch.float64)
    adapter = adapter_for(pipe, 2.0)
    policy = adapter.make_policy(3, 1.0)
    noise = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    unet, grads = adapter.denoiser.train(), []
    for unet_flag, sampler_flag in [(False, False), (True, False), (False, True)]:
        (unet.enable_gradient_checkpointing if unet_flag else unet.disable_gradient_checkpointing)()
        unet.zero_grad(set_to_none=True)
        out = sample_with_grad(adapter, policy, PROMPTS, noise, torch.Generator().manual_seed(1), grad_steps=2,
                               gradient_checkpointing=sampler_flag)
        out.pixels.mul(torch.linspace(-1, 1, out.pixels.numel(), dtype=torch.float64).view_as(out.pixels)).sum().backward()
        grads.append(unet.add_embedding.linear_1.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0], rtol=1e-10, atol=1e-12)
