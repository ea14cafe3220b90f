import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.config import load_recipe
from mmalign.models.rollout import sample_trajectories
from mmalign.trainers import trainer_for
from mmalign.trainers.diffusion_nft import NFTConfig, NFTTrainer, OldPolicy, optimality_probability
from mmalign.trainers.lora import trainable_state

sys.path.insert(0, str(Path(__file__).parent))
from diffusion_run import assert_two_processes_agree, config  # noqa: E402


def test_optimality_probability_clips_normalised_rewards_and_keeps_nan_out():
    rewards = torch.tensor([1.0, 2.0, 6.0, 3.0, 3.0, 3.0, 0.0, float("nan"), 2.0, float("inf"), 1.0, 2.0])
    out = optimality_probability(rewards, 3, adv_clip_max=1.0).numpy()
    expected = []
    for g in rewards.view(4, 3).double().numpy():
        f = g[np.isfinite(g)]
        z = (g - f.mean()) / (f.std() + 1e-4)
        expected.extend(np.where(np.isfinite(g), 0.5 + 0.5 * np.clip(z, -1, 1), np.nan))
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert out[2] == 1.0 and 0 < out[0] < 0.5  # 6 is > 1 std above its group's mean: clipped to r = 1
    assert np.all(out[3:6] == 0.5)  # a zero-spread group is neither positive nor negative
    assert np.isnan(out[7]) and np.isnan(out[9])  # NaN and Inf rewards get no r
    wide = optimality_probability(rewards, 3, adv_clip_max=5.0, batch_std=torch.tensor(2.0)).numpy()
    np.testing.assert_allclose(wide[:3], 0.5 + 0.5 * np.clip((np.array([1, 2, 6]) - 3) / (5 * (2 + 1e-4)), -1, 1))


def test_old_policy_swaps_without_copying_and_follows_softly():
    live = {"w": torch.nn.Parameter(torch.tensor([1.0, 2.0]))}
    old = OldPolicy(live)
    with torch.no_grad():
        live["w"].add_(2.0)  # θ moves on; θ_old stays
    with old.swapped_in():
        assert live["w"].tolist() == [1.0, 2.0] and not live["w"].requires_grad
    assert live["w"].tolist() == [3.0, 4.0] and live["w"].requires_grad
    old.soft_update(0.25)
    torch.testing.assert_close(old.weights["w"], 0.25 * torch.tensor([1.0, 2.0]) + 0.75 * torch.tensor([3.0, 4.0]))
    restored = OldPolicy({"w": torch.nn.Parameter(torch.zeros(2))})
    restored.load_state_dict(old.state_dict())
    assert torch.equal(restored.weights["w"], old.weights["w"])


def _perturbed_trainer(tmp_path, factory, prediction_type, **overrides):
    """A LoRA trainer set up on the tiny pipeline with θ_old ≠ θ ≠ π_ref: the adapters' B is moved once, θ_old
    follows it, and B is moved again. Returns the trainer and θ_old's LoRA values."""
    cfg = config(str(tmp_path / "run"), 1, "nft").model_copy(update=overrides)
    pipeline = factory(seed=0) if prediction_type is None else factory(seed=0, prediction_type=prediction_type)
    trainer = NFTTrainer(cfg, pipeline=pipeline, progress=False)
    trainer.setup()
    params = trainable_state(trainer.loop.raw_denoiser)

    def move():
        with torch.no_grad():
            for name, p in params.items():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.05)

    move()
    trainer.old.soft_update(0.0)
    old = {name: p.detach().clone() for name, p in params.items()}
    move()
    return trainer, old


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("weighting", ["adaptive", "none"])
def test_loss_matches_the_formula_written_out(tmp_path, tiny_sd_factory, prediction_type, weighting):
    """The loss of a minibatch against the DDPM noising, targets, x̂0 and the NFT objective written out here, with
    the UNet called directly on the conditional embeddings (CFG-free, though the rollouts use guidance 2)."""
    beta, clip, ref_weight = 0.3, 5.0, 0.2
    trainer, old_weights = _perturbed_trainer(tmp_path, tiny_sd_factory, prediction_type, beta=beta,
                                              adv_clip_max=clip, weighting=weighting, reference_weight=ref_weight)
    loop = trainer.loop
    part = loop.rollout(0).select(torch.arange(5))
    unet, cond = loop.raw_denoiser, part.embeds.cond
    generator = torch.Generator().manual_seed(3)
    x0 = part.latents[:, -1].double()
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([901, 601, 301, 1, 451])
    r = torch.tensor([1.0, 0.0, 0.7, 0.2, 0.5])
    valid = torch.tensor([True, True, True, True, False])

    loss, parts = trainer.loss(part, eps.float(), t, r, valid)
    loss.backward()  # before the weights are swapped below
    grads = [p.grad for p in trainable_state(loop.raw_denoiser).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)

    a = torch.as_tensor(loop.adapter.pipeline.scheduler.alphas_cumprod, dtype=torch.float64)[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    def run(weights=None):
        params = trainable_state(unet)
        live = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            if weights is not None:
                for n, p in params.items():
                    p.copy_(weights[n])
            out = unet(x_t.float(), t, encoder_hidden_states=cond).sample.double()
            for n, p in params.items():
                p.copy_(live[n])
        return out

    v_theta, v_old = run(), run(old_weights)
    unet.disable_adapters()
    v_ref = run()
    unet.enable_adapters()

    def x0_of(u):
        if prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * u) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * u

    def branch(u):
        if weighting == "none":
            return (u - v).pow(2).mean((1, 2, 3))
        e = x0_of(u) - x0
        return e.pow(2).mean((1, 2, 3)) / e.abs().mean((1, 2, 3))

    positive = (1 - beta) * v_old + beta * v_theta
    negative = (1 + beta) * v_old - beta * v_theta
    r64 = r.double()
    per_sample = clip / beta * (r64 * branch(positive) + (1 - r64) * branch(negative))
    per_sample = per_sample + ref_weight * (v_theta - v_ref).pow(2).mean((1, 2, 3))
    expected = per_sample[valid].mean()
    torch.testing.assert_close(loss.double(), expected, rtol=2e-4, atol=0)
    torch.testing.assert_close(parts["loss"].double(), per_sample[valid], rtol=2e-4, atol=0)
    assert float((v_theta - v_old).abs().max()) > 1e-3 and float((v_old - v_ref).abs().max()) > 1e-3


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_flow_matching_transformers_train_on_the_velocity(tmp_path, family):
    """On SD3 (true CFG) and Flux-dev (guidance embedded) from flow-ODE rollouts: the loss against rectified-flow
    noising ``(1−σ)·x0 + σ·ε``, the velocity target ``ε − x0`` and ``x̂0 = x_t − σ·u`` written out here, with the
    model's unguided output (SD3's CFG batch dropped; Flux's embedded guidance is the model's own input)."""
    from tiny_models import make_tiny_flux_pipeline, make_tiny_sd3_pipeline

    factory = make_tiny_sd3_pipeline if family == "sd3" else make_tiny_flux_pipeline
    trainer, old_weights = _perturbed_trainer(tmp_path, factory, None, beta=0.5, reference_weight=0.0)
    loop, adapter = trainer.loop, trainer.loop.adapter
    part = loop.rollout(0).select(torch.arange(3))
    x0 = part.latents[:, -1].double()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([900.0, 500.0, 100.0])
    r, valid = torch.tensor([0.9, 0.1, 0.5]), torch.ones(3, dtype=torch.bool)

    loss, _ = trainer.loss(part, eps.float(), t, r, valid)

    sigma = (t.double() / 1000).view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * eps
    params = trainable_state(loop.raw_denoiser)
    live = {n: p.detach().clone() for n, p in params.items()}
    scale, adapter.guidance_scale = adapter.guidance_scale, adapter.guidance_scale if family == "flux-dev" else 1.0
    with torch.no_grad():
        v_theta = adapter.model_output(loop.raw_denoiser, x_t.float(), t, part.embeds).double()
        for n, p in params.items():
            p.copy_(old_weights[n])
        v_old = adapter.model_output(loop.raw_denoiser, x_t.float(), t, part.embeds).double()
        for n, p in params.items():
            p.copy_(live[n])
    adapter.guidance_scale = scale

    def branch(u):
        e = x_t - sigma * u - x0
        return e.pow(2).mean((1, 2, 3)) / e.abs().mean((1, 2, 3))

    r64 = r.double()
    terms = r64 * branch(0.5 * v_old + 0.5 * v_theta) + (1 - r64) * branch(1.5 * v_old - 0.5 * v_theta)
    torch.testing.assert_close(loss.double(), (5.0 / 0.5 * terms).mean(), rtol=2e-4, atol=0)
    assert float((v_theta - v_old).abs().max()) > 1e-4


def test_rollouts_sample_the_old_policy_with_any_solver(tmp_path, tiny_sd_factory):
    """With θ ≠ θ_old the epoch's samples are θ_old's (the same seeds sampled with θ_old's weights), at η = 0
    (deterministic DDIM: no log-probs) as at η = 1; the loop's log-prob check is off for this trainer."""
    for eta in (0.0, 1.0):
        trainer, old_weights = _perturbed_trainer(tmp_path / str(eta), tiny_sd_factory, "epsilon", eta=eta)
        loop = trainer.loop
        trajectory = loop.rollout(0)
        assert torch.isnan(trajectory.log_probs).all() == (eta == 0)
        texts, metadata = trajectory.prompts, trajectory.metadata
        params = trainable_state(loop.raw_denoiser)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(old_weights[name])
            expected = sample_trajectories(loop.adapter, loop.policy, texts, metadata, loop.run.generator(0, 0),
                                           denoiser=loop.raw_denoiser)
        assert torch.equal(trajectory.pixels, expected.pixels)
        trainer.cleanup()


def test_a_few_epochs_train_and_move_the_old_policy(tmp_path, tiny_sd_factory):
    cfg = config(str(tmp_path / "run"), 2, "nft")
    trainer = NFTTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
    metrics = trainer.train()
    for key in ("loss", "old_deviation", "reference_penalty", "grad_norm", "optimality_spread", "reward/mean"):
        assert math.isfinite(metrics[key]), key
    assert metrics["old_decay"] == min(cfg.old_decay_rate * metrics["step"], cfg.old_decay_max)
    assert metrics["trained_terms"] == 12 * math.ceil(cfg.timestep_fraction * cfg.num_steps)
    live = trainable_state(trainer.loop.raw_denoiser)
    assert any(not torch.equal(trainer.old.weights[name], p) for name, p in live.items())  # η > 0: θ_old lags
    trainer.cleanup()


def test_recipe_and_task_table():
    recipe = load_recipe("shapes-nft")
    assert isinstance(recipe, NFTConfig) and trainer_for(recipe) is NFTTrainer
    prdp = load_recipe("shapes-prdp")
    for key in ("reward", "epochs", "prompts_per_epoch", "samples_per_prompt", "num_steps", "report"):
        assert getattr(recipe, key) == getattr(prdp, key), key
    with pytest.raises(ValueError, match="timestep_range"):
        NFTConfig(**{**recipe.model_dump(), "timestep_range": (0.8, 0.2)})


def test_training_raises_the_reward(tmp_path, tiny_sd_factory):
    from brightness import brightness_run

    before, after = brightness_run(NFTTrainer, "nft", tmp_path, tiny_sd_factory, learning_rate=3e-3, beta=0.1,
                                   reference_weight=0.0, timestep_fraction=1.0, old_decay_rate=0.001)
    assert after["ci_low"] > before["ci_high"], (before, after)


@pytest.mark.slow
def test_two_processes_keep_identical_weights(tmp_path):
    assert_two_processes_agree(tmp_path, "nft")
