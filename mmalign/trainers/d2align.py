"""D²-Align: Directional Decoupling Alignment (Chen et al., CVPR 2026) on the direct back-propagation trainer.

Stage 1, generator frozen: sample the base generator on ``correction_prompts`` training prompts ×
``samples_per_prompt``, embed the samples with the reward's image encoder once, and learn a correction ``b`` in the
reward's text space (``mmalign.rewards.direction.learn_correction``: minimise the samples' score against
``normalize(e_c + b)`` on the sphere ``‖b‖ = correction_radius``, so that ``b`` points away from the direction
the generator's samples score high along whatever the prompt). ``b`` is saved to the run folder as
``correction.safetensors``; a resumed run loads it instead of learning it again.

Stage 2, ``b`` frozen: the ``BackpropTrainer`` with the reward replaced by ``DirectionCorrected(reward, b, ω)``,
by default with ``method: direct_align`` (the paper's ground-truth-noise prior). The argument for the sign of ``b``
is in docs/trainers/d2align.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mmalign.models.rollout import sample_trajectories
from mmalign.rewards.clip import frame_embeddings
from mmalign.rewards.direction import (
    DirectionCorrected,
    learn_correction,
    load_correction,
    require_clip_type,
    save_correction,
)
from mmalign.trainers.backprop import BackpropConfig, BackpropTrainer

__all__ = ["CORRECTION_FILE", "D2AlignConfig", "D2AlignTrainer"]

#: the correction's file in the run folder
CORRECTION_FILE = "correction.safetensors"
#: the run generators' purposes of stage 1 (prompt choice, sampling noise, initial direction)
_PROMPTS, _NOISE, _INIT = 100, 101, 102
Method = BackpropConfig.model_fields["method"].annotation


class D2AlignConfig(BackpropConfig):
    """D²-Align: a learned text-space correction of a CLIP-type reward (stage 1), then direct back-propagation of
    the corrected reward (stage 2)."""

    task: Literal["d2align"] = "d2align"
    method: Method = Field(
        "direct_align", description="stage 2's back-propagation (direct_align: the paper's ground-truth-noise "
        "prior; draft; alignprop)"
    )
    omega: float = Field(
        1.5, gt=0.5, allow_inf_nan=False,
        description="ω of ẽ = normalize(e₋ + ω·(e₊ − e₋)); above 0.5 the reward moves towards b (away from the bias)",
    )
    correction: str | None = Field(
        None, description="a correction file (save_correction) to use; null = learn it in stage 1"
    )
    correction_steps: int = Field(2000, ge=0, description="stage 1: Adam steps on b")
    correction_lr: float = Field(1e-2, gt=0, description="stage 1: Adam's learning rate on b's direction")
    correction_radius: float = Field(0.1, gt=0, description="stage 1: ‖b‖ (b is kept on this sphere)")
    correction_prompts: int = Field(
        64, ge=1, description="stage 1: training prompts sampled (× samples_per_prompt samples embedded)"
    )
    output_dir: str = "runs/d2align"


class D2AlignTrainer(BackpropTrainer):
    """Runs a ``D2AlignConfig``: stage 1 in ``setup`` (or the saved correction), stage 2 is the parent's update."""

    name = "D2-Align"

    @property
    def correction_path(self) -> Path:
        """Where the run keeps its correction: ``correction.safetensors`` in the run folder."""
        return self.loop.run_dir / CORRECTION_FILE

    def setup(self) -> None:
        super().setup()
        cfg, loop = self.config, self.loop
        reward = loop.reward
        if isinstance(reward, DirectionCorrected):
            raise ValueError(
                "reward: d2align corrects the reward itself; give the plain CLIP-type reward (e.g. preference_proxy), "
                "or train a fixed direction_corrected reward with task backprop"
            )
        require_clip_type(reward)  # before stage 1 samples anything
        path = self.correction_path
        fresh = not path.is_file()
        if not fresh:  # a resumed run keeps the correction it was trained with
            b, info = load_correction(path)
            if cfg.correction is not None and not torch.equal(load_correction(cfg.correction)[0], b):
                raise ValueError(f"correction: {cfg.correction} differs from the one this run was started with ({path})")
        elif cfg.correction is not None:
            b, info = load_correction(cfg.correction)
            info = {**info, "source": str(cfg.correction)}
        else:
            b, info = self.learn_correction()
        if info.get("reward") not in (None, reward.name):
            raise ValueError(f"correction: learned for reward {info['reward']!r}, not {reward.name!r}")
        if fresh and loop.run.is_main:
            save_correction(path, b, info)
        loop.accelerator.wait_for_everyone()
        self.correction_info = info
        loop.reward = DirectionCorrected(reward, b.to(loop.run.device), cfg.omega)

    @torch.no_grad()
    def stage_one_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit image embeddings ``(N, T, D)`` of the frozen base generator's samples on ``correction_prompts``
        training prompts and their prompts' text embeddings ``(N, D)``, gathered over the processes."""
        cfg, loop, acc = self.config, self.loop, self.loop.accelerator
        if cfg.correction_prompts % acc.num_processes:
            raise ValueError(f"correction_prompts: {cfg.correction_prompts} does not split over "
                             f"{acc.num_processes} processes")
        n, shared = len(loop.prompts), loop.run.generator(0, _PROMPTS, shared=True)
        picks = (torch.randperm(n, generator=shared)[: cfg.correction_prompts] if cfg.correction_prompts <= n
                 else torch.randint(n, (cfg.correction_prompts,), generator=shared))
        mine = picks.tolist()[acc.process_index :: acc.num_processes]
        backbone = loop.reward.backbone
        generator = loop.run.generator(0, _NOISE)
        chunk = max(1, cfg.prompts_per_update)
        images, texts = [], []
        loop.denoiser.eval()
        for start in range(0, len(mine), chunk):
            prompts, metadata = [], []
            for index in mine[start : start + chunk]:
                text, meta = loop.prompts[index]
                prompts += [text] * cfg.samples_per_prompt
                metadata += [dict(meta) for _ in range(cfg.samples_per_prompt)]
            with acc.autocast(), loop.reference() as base:
                trajectory = sample_trajectories(loop.adapter, loop.policy, prompts, metadata, generator, denoiser=base)
            media = trajectory.media()
            image = frame_embeddings(backbone, media)
            images.append(image.float())
            texts.append(backbone.encode_text(media.prompts).float().to(image.device))
        return acc.gather(torch.cat(images)), acc.gather(torch.cat(texts))

    def learn_correction(self) -> tuple[torch.Tensor, dict[str, str]]:
        """Stage 1: ``b`` and the file metadata recording how it was learned."""
        cfg, loop = self.config, self.loop
        image, text = self.stage_one_embeddings()
        init = torch.randn(text.shape[-1], generator=loop.run.generator(0, _INIT, shared=True))
        fit = learn_correction(image, text, cfg.correction_steps, cfg.correction_lr, cfg.correction_radius,
                               init=init.to(text.device))
        b = fit.correction
        if loop.accelerator.num_processes > 1:  # the same inputs on every process; make the result identical too
            from accelerate.utils import broadcast

            b = broadcast(b.contiguous(), from_process=0)
        mode = F.normalize(image.mean((0, 1)), dim=0)
        info = {
            "reward": loop.reward.name, "omega": cfg.omega, "steps": cfg.correction_steps, "lr": cfg.correction_lr,
            "radius": cfg.correction_radius, "samples": image.shape[0], "objective_before": fit.objective_before,
            "objective_after": fit.objective_after,
            "cos_with_mean_image": float(F.cosine_similarity(b.to(mode), mode, dim=0)),
            "moved_from_init": float(1 - F.cosine_similarity(b.to(fit.initial), fit.initial, dim=0)),
        }
        if loop.run.is_main and loop.progress:
            print(f"D2-Align stage 1: mean shifted cosine {fit.objective_before:.4f} → {fit.objective_after:.4f} "
                  f"over {image.shape[0]} samples; cos(b, mean image embedding) = {info['cos_with_mean_image']:.3f}")
        return b.detach().cpu(), {k: str(v) for k, v in info.items()}

