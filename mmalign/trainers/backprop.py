"""Direct reward back-propagation: DRaFT-K, AlignProp and Direct-Align on the shared diffusion loop.

The reward is differentiable in the pixels, so the loss is ``−mean_i r(decode(x0_i), c_i)`` in the reward's own
scale, back-propagated into the UNet through the sampler (``method``):

- ``draft`` (DRaFT-K, Clark et al. 2024): each epoch's rollout gives the chain without a graph; the last
  ``grad_steps`` steps are re-run from the stored latent with autograd (fresh step noise), decoded and scored.
- ``alignprop`` (Prabhudesai et al. 2023): the same, with the truncation point drawn once per trajectory,
  uniform over ``1 … grad_steps`` kept steps.
- ``direct_align`` (SRPO's ground-truth-noise prior, Shen et al. 2025): a sample ``x0`` of the current policy
  (the rollout's) is noised with known noise to ``x_t``, ``t`` uniform in ``timestep_range``; ``x̂0`` is recovered
  in one guided model call and its decode is scored. No chain, one UNet call per sample.

An optional penalty ``reference_weight·mean‖out_θ − out_ref‖²`` at every step with a graph keeps the UNet's
output near the reference (the LoRA-disabled UNet, or a frozen copy for full fine-tuning). Samples whose reward
is not finite are left out of the loss, and a step whose loss is not finite is skipped, so NaNs never reach the
optimiser.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch.utils.checkpoint import checkpoint

from mmalign.media import MediaBatch
from mmalign.models.rollout import denoise_in_one_step, sample_with_grad
from mmalign.models.trajectory import Trajectory
from mmalign.rewards.registry import RewardSpecs, resolve
from mmalign.trainers.diffusion import DiffusionConfig, DiffusionTrainer

__all__ = ["BackpropConfig", "BackpropTrainer", "refuse_non_differentiable"]


class BackpropConfig(DiffusionConfig):
    """Direct reward back-propagation on a Stable Diffusion pipeline."""

    task: Literal["backprop"] = "backprop"
    method: Literal["draft", "alignprop", "direct_align"] = Field(
        "draft", description="draft: last grad_steps steps; alignprop: a random truncation per trajectory; "
        "direct_align: one-step x̂0 from a noised sample of the policy"
    )
    grad_steps: int = Field(1, ge=1, description="draft: steps kept with a graph (K); alignprop: the most kept")
    timestep_range: tuple[float, float] = Field(
        (0.2, 0.8), description="direct_align: t is uniform in this range, as fractions of the training timesteps"
    )
    reference_weight: float = Field(0.0, ge=0, description="weight of ‖out_θ − out_ref‖² at every step with a graph")
    decoder_checkpointing: bool = Field(False, description="recompute the VAE decoder in backward (less memory)")
    output_dir: str = "runs/backprop"

    @field_validator("reward")
    @classmethod
    def _differentiable(cls, specs: RewardSpecs) -> RewardSpecs:
        refuse_non_differentiable(specs)
        return specs

    @model_validator(mode="after")
    def _steps_fit(self) -> BackpropConfig:
        if self.method != "direct_align" and self.grad_steps > self.num_steps:
            raise ValueError(f"grad_steps ({self.grad_steps}) cannot exceed num_steps ({self.num_steps})")
        low, high = self.timestep_range
        if not 0 <= low <= high <= 1:
            raise ValueError(f"timestep_range: expected 0 ≤ low ≤ high ≤ 1, got {self.timestep_range}")
        return self


def refuse_non_differentiable(specs) -> None:
    """Raise naming the first reward of ``specs`` that has no pixel gradients. A spec that wraps others (an
    ensemble's ``members``, a wrapper's ``reward``) is as differentiable as they are; the built reward is checked
    again in ``setup``."""
    for spec in specs if isinstance(specs, list) else [specs]:
        if isinstance(spec, list):
            refuse_non_differentiable(spec)
            continue
        spec = {"name": spec} if isinstance(spec, str) else spec
        nested = spec.get("members", spec.get("reward")) if isinstance(spec, dict) else None
        if nested is not None and not isinstance(nested, (int, float)):
            refuse_non_differentiable(nested)
            continue
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and getattr(resolve(name), "differentiable", True) is False:
            raise ValueError(
                f"reward: {name!r} is not differentiable in the pixels, so it cannot be back-propagated; "
                "train it with a black-box method (task prdp, ddpo or diffusion_grpo)"
            )


class BackpropTrainer(DiffusionTrainer):
    """Runs a ``BackpropConfig`` on the shared loop; the algorithm is ``update``."""

    name = "backprop"
    curve_keys = ("loss", "grad_norm")
    needs_reference = False

    def setup(self) -> None:
        super().setup()
        reward = self.loop.reward
        if not reward.differentiable:
            raise ValueError(f"reward: {reward.name!r} is not differentiable in the pixels; use prdp, ddpo or "
                             "diffusion_grpo for a black-box reward")

    def update(self, trajectory: Trajectory, epoch: int) -> dict[str, float]:
        """One optimiser step per ``prompts_per_update`` prompt groups, ``inner_steps`` passes."""
        cfg, loop, acc = self.config, self.loop, self.loop.accelerator
        totals = {"loss": 0.0, "reward_loss": 0.0, "penalty": 0.0, "grad_norm": 0.0}
        updates = skipped = 0
        loop.denoiser.train()
        for k in range(cfg.inner_steps):
            for batch, index in enumerate(loop.minibatches(trajectory, epoch, k)):
                part = trajectory.select(index)
                generator = loop.run.generator(epoch, 1000 * (k + 1) + batch)
                with acc.autocast():
                    pixels, penalty = self.differentiable_sample(part, generator)
                    scores = loop.reward(MediaBatch(pixels, part.prompts, part.metadata)).scores
                    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
                finite = torch.isfinite(scores)
                reward_loss = -scores[finite].mean() if bool(finite.any()) else scores.new_tensor(float("nan"))
                loss = reward_loss + cfg.reference_weight * penalty
                if not bool(torch.isfinite(loss)):
                    loop.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                acc.backward(loss)
                totals["grad_norm"] += loop.optimizer_step()
                totals["loss"] += float(loss.detach())
                totals["reward_loss"] += float(reward_loss.detach())
                totals["penalty"] += float(penalty.detach())
                updates += 1
        loop.denoiser.eval()
        metrics = {key: value / max(updates, 1) for key, value in totals.items()}
        metrics["skipped_steps"] = skipped
        return metrics

    def differentiable_sample(self, part: Trajectory, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels with a graph into the UNet, and the reference penalty (mean squared output difference per kept
        step, summed over steps)."""
        cfg, loop = self.config, self.loop
        on_step = self._reference_penalty(part) if cfg.reference_weight > 0 else None
        if cfg.method == "direct_align":
            x0 = part.latents[:, -1]
            t = loop.adapter.forward_process.sample_timesteps(len(part), *cfg.timestep_range, generator=generator)
            noise = loop.adapter.initial_noise(part.metadata, generator).to(x0)
            x0_hat, x_t, out = denoise_in_one_step(loop.adapter, loop.denoiser, x0, noise, t, part.embeds)
            penalty = on_step(t, x_t, out) if on_step is not None else x0.new_zeros(())
            decode = loop.adapter.decode
            pixels = checkpoint(decode, x0_hat, use_reentrant=False) if cfg.decoder_checkpointing else decode(x0_hat)
            return pixels, penalty
        if cfg.method == "alignprop":
            kept = torch.randint(1, cfg.grad_steps + 1, (len(part),), generator=generator)
        else:
            kept = torch.full((len(part),), cfg.grad_steps)
        start = part.num_steps - int(kept.max())
        out = sample_with_grad(
            loop.adapter, loop.policy, part.prompts, part.latents[:, start], generator, loop.denoiser, kept,
            cfg.gradient_checkpointing, start, part.embeds, on_step, cfg.decoder_checkpointing,
        )
        penalty = out.penalty if isinstance(out.penalty, torch.Tensor) else out.latents.new_zeros(())
        return out.pixels, penalty

    def _reference_penalty(self, part: Trajectory):
        """``on_step(index or t, x, out) = mean‖out_θ − out_ref‖²``: the reference's guided output at the same input,
        without a graph (the LoRA-disabled UNet, or the frozen copy)."""
        loop = self.loop

        def penalty(index_or_t, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            timestep = index_or_t if isinstance(index_or_t, torch.Tensor) else loop.policy.timesteps[index_or_t]
            with torch.no_grad(), loop.reference() as ref:
                target = loop.adapter.model_output(ref, x.detach(), timestep, part.embeds)
            return (out.float() - target.float()).pow(2).mean()

        return penalty
