"""Text-to-video adapters (ModelScope's UNet3D, AnimateDiff's motion UNet on SD, Wan's flow transformer) on tiny
random pipelines: the deterministic limit against each diffusers pipeline's own sample and decode, exact re-scoring,
an independent log-prob, video rewards on the rollouts, LoRA export through diffusers' loaders (full fine-tuning
for UNet3D, which has no peft integration), and PRDP, GRPO, DiffusionNFT and reward back-propagation on videos."""

import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import (
    assert_lora_export_reproduces,
    attach_random_lora,
    make_tiny_animatediff_pipeline,
    make_tiny_text_to_video_pipeline,
    make_tiny_wan_pipeline,
    train_and_check,
)

from mmalign.eval.generator import load_generator
from mmalign.media import MediaBatch
from mmalign.models.ddim import DDIMPolicy
from mmalign.models.flow_sde import FlowSDEPolicy
from mmalign.models.pipelines import adapter_for, load_pipeline
from mmalign.models.rollout import sample_trajectories, sample_with_grad, trajectory_log_probs
from mmalign.models.video import MOTION_DIRECTIONS
from mmalign.models.video_unet import AnimateDiffAdapter, VideoUNetAdapter
from mmalign.models.wan import WanAdapter
from mmalign.rewards import build
from mmalign.trainers.lora import LoRAConfig, attach_lora

sys.path.insert(0, str(Path(__file__).parents[1] / "trainers"))
from diffusion_run import ALGORITHMS  # noqa: E402  (registers the brightness reward)

PROMPTS = ["a red circle", "two blue squares"]
#: family → (tiny pipeline builder, video options: frames and size of the samples)
FAMILIES = {
    "text-to-video": (make_tiny_text_to_video_pipeline, {"num_frames": 4}),
    "animatediff": (make_tiny_animatediff_pipeline, {"num_frames": 4}),
    "wan": (make_tiny_wan_pipeline, {"num_frames": 5, "height": 32, "width": 32}),
}
ETA = {"text-to-video": 1.0, "animatediff": 1.0, "wan": 0.7}


def _adapter(family, guidance_scale=2.0):
    builder, video = FAMILIES[family]
    return adapter_for(builder(), guidance_scale, **video)


@pytest.fixture(scope="module")
def adapters():
    return {family: _adapter(family) for family in FAMILIES}


def test_adapter_for_picks_the_family_sizes_and_policy(adapters):
    t2v, animatediff, wan = adapters["text-to-video"], adapters["animatediff"], adapters["wan"]
    assert type(t2v) is VideoUNetAdapter and isinstance(animatediff, AnimateDiffAdapter) and isinstance(wan, WanAdapter)
    assert t2v.latent_shape == animatediff.latent_shape == (4, 4, 8, 8)  # one latent frame per frame, 16 px frames
    assert wan.latent_shape == (4, 2, 4, 4)  # 5 frames → 1 + 4/4 latent frames; 32 px → 4
    assert isinstance(t2v.make_policy(3, 1.0), DDIMPolicy) and isinstance(wan.make_policy(3, 0.7), FlowSDEPolicy)
    assert len(animatediff.frozen_modules) == 3 and len(wan.frozen_modules) == 2  # VAE, CLIP, motion adapter; VAE, UMT5
    with pytest.raises(ValueError, match="num_frames: expected 1 \\+ a multiple of 4"):
        adapter_for(wan.pipeline, 2.0, num_frames=6, height=32, width=32)
    with pytest.raises(ValueError, match="height: expected a multiple of 16"):
        adapter_for(wan.pipeline, 2.0, num_frames=5, height=40, width=32)
    from tiny_models import make_tiny_sd_pipeline

    with pytest.raises(ValueError, match="num_frames: StableDiffusionAdapter .* takes no such option"):
        adapter_for(make_tiny_sd_pipeline(), 2.0, num_frames=4)


def _pipeline_video(adapter, family, x_T, num_steps, output_type):
    options = dict(guidance_scale=adapter.guidance_scale, num_inference_steps=num_steps, output_type=output_type,
                   negative_prompt=[""] * len(PROMPTS), **FAMILIES[family][1])
    return adapter.pipeline(PROMPTS, latents=x_T.clone(), **options).frames


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_deterministic_limit_is_the_pipelines_own_video(adapters, family):
    """η / noise level 0 from the same initial latents lands on ``pipe(..., latents=...)``'s latents, and the decoded
    ``(B, T, 3, H, W)`` frames on its ``output_type="pt"`` video (Wan: both guidance halves in one call where the
    pipeline makes two; DDIM in fp64 coefficients: equal up to fp32 rounding)."""
    adapter = adapters[family]
    trajectory = sample_trajectories(adapter, adapter.make_policy(3, 0.0), PROMPTS,
                                     generator=torch.Generator().manual_seed(0))
    x_T = trajectory.latents[:, 0]
    torch.testing.assert_close(trajectory.latents[:, -1], _pipeline_video(adapter, family, x_T, 3, "latent"),
                               rtol=1e-5, atol=1e-5)
    frames = _pipeline_video(adapter, family, x_T, 3, "pt")
    assert trajectory.pixels.shape == frames.shape == (2, *((5, 3, 32, 32) if family == "wan" else (4, 3, 16, 16)))
    torch.testing.assert_close(trajectory.pixels, frames, rtol=1e-5, atol=1e-5)
    assert torch.isnan(trajectory.log_probs).all() and trajectory.media().is_video


def _independent_step_log_prob(adapter, policy, trajectory, index, eta):
    """The step's log-density from the model output in fp64 and ``torch.distributions.Normal``."""
    x, following = trajectory.latents[:, index].double(), trajectory.latents[:, index + 1].double()
    with torch.no_grad():
        out = adapter.model_output(adapter.denoiser, trajectory.latents[:, index], trajectory.timesteps[index],
                                   trajectory.embeds).double()
    if isinstance(policy, FlowSDEPolicy):
        sigma, next_sigma = float(policy.sigmas[index]), float(policy.sigmas[index + 1])
        s = eta * math.sqrt(sigma / (1 - (next_sigma if sigma == 1 else sigma)))  # σ = 1: the next σ below
        mean = x + (out + s**2 / (2 * sigma) * (x + (1 - sigma) * out)) * (next_sigma - sigma)
        std = s * math.sqrt(sigma - next_sigma)
    else:  # DDIM-η on ε: ᾱ of this timestep and of the previous one (the final ᾱ past the first)
        alphas = policy.scheduler.alphas_cumprod.double()
        t = int(trajectory.timesteps[index])
        a = alphas[t]
        previous = t - policy.scheduler.config.num_train_timesteps // policy.num_steps
        a_prev = alphas[previous] if previous >= 0 else policy.scheduler.final_alpha_cumprod.double()
        x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
        std = float(eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt())
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * out
    return torch.distributions.Normal(mean, std).log_prob(following).flatten(1).sum(1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rescoring_reproduces_the_log_probs_and_a_step_matches_torch_normal(adapters, family):
    adapter, eta = adapters[family], ETA[family]
    policy = adapter.make_policy(3, eta)
    trajectory = sample_trajectories(adapter, policy, PROMPTS, generator=torch.Generator().manual_seed(1))
    assert trajectory.latents.shape == (2, 4, *adapter.latent_shape) and torch.isfinite(trajectory.log_probs).all()
    assert torch.equal(trajectory_log_probs(adapter, policy, adapter.denoiser, trajectory), trajectory.log_probs)
    for index in (0, 2):
        torch.testing.assert_close(trajectory.log_probs[:, index],
                                   _independent_step_log_prob(adapter, policy, trajectory, index, eta),
                                   rtol=1e-6, atol=1e-3)


def test_video_rewards_score_the_rollouts(adapters):
    """``frame_aggregate`` of an image reward is that reward on every frame averaged over time; ``flicker`` is minus
    the mean absolute difference of consecutive frames."""
    adapter = adapters["animatediff"]
    trajectory = sample_trajectories(adapter, adapter.make_policy(2, 1.0), PROMPTS,
                                     generator=torch.Generator().manual_seed(2))
    video = trajectory.pixels
    per_frame = build("jpeg_incompressibility")(MediaBatch(video.flatten(0, 1), [p for p in PROMPTS for _ in range(4)]))
    aggregate = build({"name": "frame_aggregate", "reward": "jpeg_incompressibility"})(trajectory.media())
    torch.testing.assert_close(aggregate.scores, per_frame.scores.view(2, 4).mean(1))
    flicker = build("flicker")(trajectory.media()).scores
    torch.testing.assert_close(flicker, -(video[:, 1:] - video[:, :-1]).abs().flatten(1).mean(1))


def test_wan_follows_a_unipc_flow_schedule():
    """The published Wan pipelines ship UniPC with ``flow_shift``: the SDE runs on the sigmas it sets and gives the
    transformer the (integer) timesteps the pipeline gives it."""
    from diffusers import UniPCMultistepScheduler

    adapter = _adapter("wan")
    pipe = adapter.pipeline
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    policy = adapter.make_policy(4, 0.7)
    seen = []
    pipe(PROMPTS[:1], num_inference_steps=4, output_type="latent", **FAMILIES["wan"][1],
         callback_on_step_end=lambda p, i, t, kw: seen.append(t.item()) or {})
    assert seen == policy.timesteps.tolist()
    torch.testing.assert_close(policy.sigmas, pipe.scheduler.sigmas.float())
    assert policy.sigmas[0] < 1 and policy.sigmas[-1] == 0 and torch.isfinite(torch.tensor(policy.stds)).all()


@pytest.mark.parametrize("family", ["animatediff", "wan"])
def test_lora_export_loads_with_diffusers_and_reproduces_the_output(family, tmp_path):
    adapter = _adapter(family)
    attach_random_lora(adapter)
    wrapped = {n for n, _ in adapter.denoiser.named_modules() if n.endswith(".lora_A")}
    if family == "animatediff":  # spatial attention and the motion modules' temporal attention
        assert any("motion_modules" in n for n in wrapped) and any(".attentions." in n for n in wrapped)
    else:  # self- and cross-attention of every block
        assert {n.split(".")[2] for n in wrapped} == {"attn1", "attn2"}
    assert_lora_export_reproduces(adapter, _adapter(family), ETA[family], tmp_path / "lora")


def test_unet3d_refuses_lora_with_a_clear_error():
    adapter = _adapter("text-to-video")
    with pytest.raises(ValueError, match="lora: UNet3DConditionModel has no peft integration .* lora: null"):
        attach_lora(adapter.denoiser, LoRAConfig(rank=2), adapter.lora_targets)


def test_gradients_reach_the_denoiser_through_video_decoding():
    """``sample_with_grad`` on 5-D latents (per-sample truncation) and the Wan VAE: a pixel loss has LoRA gradients."""
    adapter = _adapter("wan")
    attach_random_lora(adapter)
    policy = adapter.make_policy(3, 0.7)
    noise = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(0))
    out = sample_with_grad(adapter, policy, PROMPTS, noise, torch.Generator().manual_seed(1),
                           grad_steps=torch.tensor([1, 2]))
    assert out.pixels.shape == (2, 5, 3, 32, 32)
    out.pixels.mean().backward()
    grads = [p.grad for n, p in adapter.denoiser.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------- trainers, one epoch each
#: a video reward per algorithm: the black-box ones per frame, back-propagation a differentiable one
VIDEO_REWARD = {"name": "frame_aggregate", "reward": "jpeg_incompressibility"}
DIFFERENTIABLE_VIDEO_REWARD = {"name": "frame_aggregate", "reward": "brightness"}
COMMON = dict(prompts={"world": "train", "n": 16, "seed": 0}, prompts_per_epoch=2, samples_per_prompt=2,
              prompts_per_update=1, num_steps=3, guidance_scale=2.0, learning_rate=1e-3, lora={"rank": 2, "alpha": 2})
REPORT = {"prompts": {"world": "train", "n": 2, "seed": 0}, "samples_per_prompt": 2, "rewards": [], "grid_prompts": 2}


def _trainer(algorithm, family, out, epochs=1, report=False, **overrides):
    trainer_class, schema, own = ALGORITHMS[algorithm]
    reward = DIFFERENTIABLE_VIDEO_REWARD if algorithm == "backprop" else VIDEO_REWARD
    fields = {**COMMON, **own, "reward": [reward], "eta": ETA[family], "video": FAMILIES[family][1], **overrides}
    config = schema(**fields, pipeline="tiny", epochs=epochs, output_dir=str(out), report=REPORT if report else None)
    return trainer_class(config, pipeline=FAMILIES[family][0](), progress=False)


@pytest.mark.parametrize("algorithm, family", [("prdp", "animatediff"), ("grpo", "wan"), ("nft", "wan"),
                                               ("backprop", "animatediff")])
def test_each_trainer_trains_an_epoch_on_videos(tmp_path, tiny_open_clip_dir, algorithm, family):
    """GRPO's reward is subject consistency (a tiny CLIP's frame embeddings), the others' per-frame rewards."""
    consistency = {"name": "temporal_consistency", "model": str(tiny_open_clip_dir), "pretrained": None}
    trainer = _trainer(algorithm, family, tmp_path / "run", **({"reward": [consistency]} if algorithm == "grpo" else {}))
    train_and_check(trainer)
    trainer.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("algorithm", ["prdp", "grpo", "nft", "backprop"])
def test_every_trainer_on_every_video_family(tmp_path, algorithm, family):
    lora = {} if family != "text-to-video" else {"lora": None, "learning_rate": 1e-5}
    trainer = _trainer(algorithm, family, tmp_path / "run", **lora)
    train_and_check(trainer)
    trainer.cleanup()


def test_back_propagating_a_video_reward_raises_it(tmp_path):
    """Three AlignProp epochs on the mean brightness of AnimateDiff's frames: the same seeds give brighter videos."""
    trainer = _trainer("backprop", "animatediff", tmp_path / "run", epochs=3, learning_rate=2e-2,
                       method="draft", grad_steps=1)
    trainer.setup()
    loop = trainer.loop

    def brightness():
        sample = sample_trajectories(loop.adapter, loop.policy, PROMPTS, generator=torch.Generator().manual_seed(7),
                                     denoiser=loop.raw_denoiser)
        return float(sample.pixels.mean())

    start = brightness()
    trainer.train()
    assert brightness() > start + 1e-3
    trainer.cleanup()


@pytest.mark.parametrize("algorithm, overrides", [("nft", {}), ("backprop", {"method": "direct_align"})])
def test_trainers_noise_clean_samples_with_the_noise_sampling_starts_from(tmp_path, algorithm, overrides):
    """With travelling initial noise, the forward-process noise of NFT's loss and of Direct-Align travels too,
    along each sample's stated motion: training sees the noise statistics that sampling starts from."""
    clips = {"world_video": "train", "n": 8, "seed": 0}
    trainer = _trainer(algorithm, "animatediff", tmp_path / "run", video={"num_frames": 4, "noise_speed": 1.0},
                       prompts=clips, **overrides)
    trainer.setup()
    adapter, draws = trainer.loop.adapter, []
    prior = adapter.initial_noise

    def spied(metadata, generator=None):
        noise = prior(metadata, generator)
        draws.append((trainer.loop.denoiser.training, [m["motion"]["direction"] for m in metadata], noise))
        return noise

    adapter.initial_noise = spied
    trainer.train()
    trainer.cleanup()
    in_training = [(directions, noise) for training, directions, noise in draws if training]
    assert in_training and any(not training for training, _, _ in draws)  # the loss's noise and the rollouts'
    for directions, noise in in_training:
        for clip, direction in zip(noise, directions):
            dx, dy = MOTION_DIRECTIONS[direction]
            # frame 1's noise is frame 0's moved one latent pixel along the stated direction
            moved = clip[:, 1, max(dy, 0): clip.shape[-2] + min(dy, 0), max(dx, 0): clip.shape[-1] + min(dx, 0)]
            seen = clip[:, 0, max(-dy, 0): clip.shape[-2] + min(-dy, 0), max(-dx, 0): clip.shape[-1] + min(-dx, 0)]
            assert torch.equal(moved, seen)


def test_a_full_fine_tune_of_unet3d_reports_videos_and_exports_the_pipeline(tmp_path):
    """PRDP without LoRA on the UNet3D family: the report's grid shows filmstrips and its diversity reads all frames;
    the exported pipeline loads back as a TextToVideoSDPipeline that samples what the trained UNet samples."""
    from PIL import Image

    trainer = _trainer("prdp", "text-to-video", tmp_path / "run", report=True, lora=None, learning_rate=1e-4)
    train_and_check(trainer)
    summary = trainer.report()
    out = trainer.export()
    loop = trainer.loop
    x = torch.randn((2, *loop.adapter.latent_shape), generator=torch.Generator().manual_seed(3))
    embeds = loop.adapter.encode_prompts(PROMPTS)
    t = loop.policy.timesteps[1]
    with torch.no_grad():
        trained = loop.adapter.model_output(loop.raw_denoiser, x, t, embeds)
    trainer.cleanup()
    assert summary["grid"] == "grid.png" and "diversity/brightness" in summary["before"]
    assert Image.open(tmp_path / "run" / "grid.png").width > 2 * 4 * 16 * 4  # two 4-frame strips at 4×
    assert out.name == "pipeline"
    reloaded = adapter_for(load_pipeline(str(out)), 2.0, num_frames=4)
    assert type(reloaded) is VideoUNetAdapter
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model_output(reloaded.denoiser, x, t, embeds), trained)


def test_a_recipe_with_a_motion_adapter_loads_animatediff_on_an_sd_base(tmp_path):
    """``pipeline`` an SD 1.x folder, ``motion_adapter`` a MotionAdapter folder and ``scheduler`` overrides (offline,
    as the AnimateDiff recipe reads its hub ids): the loop trains an AnimateDiff pipeline with linear betas."""
    from diffusers import AnimateDiffPipeline
    from tiny_models import make_tiny_motion_adapter, make_tiny_sd_pipeline

    make_tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    make_tiny_motion_adapter().save_pretrained(tmp_path / "motion")
    pipe = load_pipeline(str(tmp_path / "sd"), motion_adapter=str(tmp_path / "motion"),
                         scheduler={"beta_schedule": "linear"})
    assert isinstance(pipe, AnimateDiffPipeline) and pipe.scheduler.config.beta_schedule == "linear"
    with pytest.raises(ValueError, match="motion_adapter: expected a MotionAdapter folder or a hub id"):
        load_pipeline(str(tmp_path / "sd"), motion_adapter=str(tmp_path / "missing"))

    trainer_class, schema, own = ALGORITHMS["grpo"]
    config = schema(**{**COMMON, **own}, reward=[VIDEO_REWARD], pipeline=str(tmp_path / "sd"),
                    motion_adapter=str(tmp_path / "motion"), scheduler={"beta_schedule": "linear"},
                    video={"num_frames": 3}, output_dir=str(tmp_path / "run"), epochs=1)
    trainer = trainer_class(config, progress=False)
    trainer.setup()
    adapter = trainer.loop.adapter
    assert isinstance(adapter, AnimateDiffAdapter) and adapter.latent_shape == (4, 3, 8, 8)
    assert trainer.loop.policy.scheduler.config.beta_schedule == "linear"
    trainer.train()
    trainer.export()
    x = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(0))
    embeds, t = adapter.encode_prompts(PROMPTS), trainer.loop.policy.timesteps[1]
    with torch.no_grad(), trainer.loop.reference() as reference:
        base = adapter.model_output(reference, x, t, embeds)
    with torch.no_grad():
        trained = adapter.model_output(trainer.loop.raw_denoiser, x, t, embeds)
    trainer.cleanup()
    assert (trained - base).abs().max() > 1e-4  # the LoRA moved, so loading it is seen

    # the run's result: base, motion adapter, scheduler, frames and LoRA, as mmalign eval reads it
    loaded, policy, settings = load_generator(run=str(tmp_path / "run"))
    assert isinstance(loaded, AnimateDiffAdapter) and loaded.latent_shape == (4, 3, 8, 8)
    assert loaded.pipeline.scheduler.config.beta_schedule == "linear" and settings["num_steps"] == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded.model_output(loaded.denoiser, x, t, embeds), trained, rtol=1e-5, atol=1e-5)


def test_grids_show_videos_as_filmstrips_and_large_frames_at_their_size():
    from mmalign.eval.grid import MAX_ENLARGED, filmstrips, image_grid

    videos = torch.arange(9.0).view(1, 9, 1, 1, 1).expand(2, 9, 3, 2, 2) / 8
    strip = filmstrips(videos)
    assert strip.shape == (2, 3, 2, 8)  # four frames side by side
    assert strip[0, 0, 0, ::2].mul(8).tolist() == [0, 3, 5, 8]  # the first and last frames, evenly spaced between
    assert image_grid(videos, columns=2).size == (2 * (8 * 4 + 4) + 4, 2 * 4 + 3 * 4)  # enlarged 4×, padded
    large = image_grid(torch.rand(1, 3, 2 * MAX_ENLARGED, 8), columns=1)
    assert large.size == (8 + 2 * 4, 2 * MAX_ENLARGED + 3 * 4)  # not enlarged
