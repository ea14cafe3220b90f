"""SD3 and Flux adapters on tiny random pipelines: against the pipelines' own sampling, exact re-scoring, an
independent log-prob, LoRA export through diffusers' loader, gradient checkpointing, and one step of every
diffusion trainer."""

import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import (
    assert_lora_export_reproduces,
    attach_random_lora,
    make_tiny_flux_pipeline,
    make_tiny_sd3_pipeline,
    train_and_check,
)

from mmalign.models.flow_sde import FlowSDEPolicy
from mmalign.models.flux import FluxAdapter
from mmalign.models.pipelines import adapter_for
from mmalign.models.rollout import sample_trajectories, trajectory_log_probs
from mmalign.models.sd3 import SD3Adapter

PROMPTS = ["a red circle", "two blue squares"]
#: name → (builder, pipeline call options of the same guidance the adapter applies at scale 2)
FAMILIES = {
    "sd3": (make_tiny_sd3_pipeline, {"negative_prompt": [""] * 2}),
    "sd3-no-t5": (lambda: make_tiny_sd3_pipeline(t5=False), {"negative_prompt": [""] * 2}),
    "flux-dev": (make_tiny_flux_pipeline, {}),  # guidance embedded: one call per step
    "flux-cfg": (lambda: make_tiny_flux_pipeline(guidance_embeds=False), {"true_cfg_scale": 2.0,
                                                                         "negative_prompt": [""] * 2}),
}


def _adapter(name):
    return adapter_for(FAMILIES[name][0](), 2.0)


def _pipeline_latents(adapter, name, x_T, num_steps):
    """The pipeline's own deterministic sample from ``x_T`` (Flux: packed in, unpacked out)."""
    pipe = adapter.pipeline
    options = dict(guidance_scale=2.0, num_inference_steps=num_steps, output_type="latent", height=16, width=16,
                   **FAMILIES[name][1])
    if isinstance(adapter, SD3Adapter):
        return pipe(PROMPTS, latents=x_T, **options).images
    b, c, h, w = x_T.shape
    packed = pipe(PROMPTS, latents=type(pipe)._pack_latents(x_T, b, c, h, w), **options).images
    return type(pipe)._unpack_latents(packed, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                      pipe.vae_scale_factor)


def test_adapter_for_picks_the_family_and_its_parts():
    sd3, flux = _adapter("sd3"), _adapter("flux-dev")
    assert isinstance(sd3, SD3Adapter) and isinstance(flux, FluxAdapter)
    assert sd3.latent_shape == (16, 8, 8) and flux.latent_shape == (16, 8, 8)
    assert len(sd3.frozen_modules) == 4 and len(_adapter("sd3-no-t5").frozen_modules) == 3
    assert len(flux.frozen_modules) == 3  # VAE, CLIP, T5
    assert flux.guidance_embedded and not flux.true_cfg and _adapter("flux-cfg").true_cfg
    assert isinstance(sd3.make_policy(3, 0.7), FlowSDEPolicy)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_ode_limit_is_the_pipelines_own_sample(name):
    """Noise level 0 from the same initial latents gives what ``pipe(..., latents=...)`` gives: bit for bit where
    the pipeline batches as the adapter does; Flux's true CFG runs two calls where the adapter batches one."""
    adapter = _adapter(name)
    policy = adapter.make_policy(3, 0.0)
    trajectory = sample_trajectories(adapter, policy, PROMPTS, generator=torch.Generator().manual_seed(0))
    expected = _pipeline_latents(adapter, name, trajectory.latents[:, 0], 3)
    if name == "flux-cfg":
        torch.testing.assert_close(trajectory.latents[:, -1], expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(trajectory.latents[:, -1], expected)
    assert torch.isnan(trajectory.log_probs).all() and trajectory.pixels.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_rescoring_reproduces_the_stored_log_probs_and_one_step_matches_torch_normal(name):
    adapter = _adapter(name)
    policy = adapter.make_policy(3, 0.7)
    trajectory = sample_trajectories(adapter, policy, PROMPTS, generator=torch.Generator().manual_seed(1))
    assert torch.equal(trajectory_log_probs(adapter, policy, adapter.denoiser, trajectory), trajectory.log_probs)
    index = 1  # independently: the SDE's mean from the velocity in fp64, torch's Normal
    x, following = trajectory.latents[:, index].double(), trajectory.latents[:, index + 1].double()
    with torch.no_grad():
        v = adapter.model_output(adapter.denoiser, trajectory.latents[:, index], trajectory.timesteps[index],
                                 trajectory.embeds).double()
    sigma, next_sigma = float(policy.sigmas[index]), float(policy.sigmas[index + 1])
    s = 0.7 * math.sqrt(sigma / (1 - sigma))
    mean = x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * (next_sigma - sigma)
    normal = torch.distributions.Normal(mean, s * math.sqrt(sigma - next_sigma))
    torch.testing.assert_close(trajectory.log_probs[:, index], normal.log_prob(following).flatten(1).sum(1),
                               rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("name", ["flux-dev", "sd3-dynamic"])
def test_timesteps_follow_the_pipelines_dynamic_shift(name):
    """Flux's sigmas: ``linspace(1, 1/n, n)`` shifted by μ of its 16 packed tokens, as FluxPipeline sets them; an
    SD3 scheduler with dynamic shifting: μ of its 16 patches, as StableDiffusion3Pipeline computes it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    adapter = _adapter("flux-dev" if name == "flux-dev" else "sd3")
    pipe = adapter.pipeline
    if name == "sd3-dynamic":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    seen = []
    pipe(PROMPTS[:1], num_inference_steps=4, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append(float(t)) or {})
    assert seen == adapter.make_policy(4, 0.7).timesteps.tolist()


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_bf16_rollout_keeps_fp32_latents_and_finite_log_probs(name):
    adapter = _adapter(name)
    adapter.pipeline.to(torch.bfloat16)
    policy = adapter.make_policy(2, 0.7)
    trajectory = sample_trajectories(adapter, policy, PROMPTS, generator=torch.Generator().manual_seed(0))
    assert trajectory.latents.dtype == torch.float32 and torch.isfinite(trajectory.log_probs).all()


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_lora_export_loads_with_diffusers_and_reproduces_the_output(name, tmp_path):
    adapter = _adapter(name)
    attach_random_lora(adapter)
    wrapped = {n.split(".")[-2] for n, _ in adapter.denoiser.named_modules() if n.endswith(".lora_A")}
    assert {"to_q", "add_q_proj", "to_add_out"} <= wrapped  # both streams of the MMDiT blocks
    assert_lora_export_reproduces(adapter, _adapter(name), 0.7, tmp_path / "lora")


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    adapter = _adapter(name)
    attach_random_lora(adapter)
    embeds = adapter.encode_prompts(PROMPTS)
    x = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(0))
    t = adapter.make_policy(3, 0.7).timesteps[1]
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    adapter.denoiser.train()
    grads = []
    for flag in (False, True):
        if flag:
            adapter.denoiser.enable_gradient_checkpointing()
        out = adapter.model_output(adapter.denoiser, x, t, embeds)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), params))
    assert adapter.denoiser.is_gradient_checkpointing
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------- trainers, one epoch each
sys.path.insert(0, str(Path(__file__).parents[1] / "trainers"))
from diffusion_run import ALGORITHMS, config  # noqa: E402

BUILDERS = {"sd3": make_tiny_sd3_pipeline, "flux-dev": make_tiny_flux_pipeline}


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("algorithm", ["prdp", "ddpo", "grpo", "backprop"])
def test_every_trainer_runs_a_step(tmp_path, family, algorithm):
    trainer_class = ALGORITHMS[algorithm][0]
    trainer = trainer_class(config(str(tmp_path / "run"), 1, algorithm), pipeline=BUILDERS[family](),
                            progress=False)
    train_and_check(trainer)
    trainer.cleanup()
