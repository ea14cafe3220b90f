"""PRDP: Proximal Reward Difference Prediction (Deng et al., CVPR 2024) for Stable Diffusion pipelines.

Each epoch samples ``prompts_per_epoch`` prompts × ``samples_per_prompt`` trajectories from π_old (= the
current weights), scores them, then takes ``inner_steps`` passes of gradient steps on the proximal RDP loss
(``mmalign.trainers.prdp_loss``). π_ref is the LoRA-disabled UNet (a frozen copy for full fine-tuning).

The loop reads top to bottom: ``setup``, ``train`` (``rollout`` → ``score`` → ``update`` → ``log`` →
``save_checkpoint``), ``finish``. Sampling, scoring, checkpoints and reports are shared components.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from mmalign.config import Recipe, StrictModel
from mmalign.eval.scoring import RewardSpecs, build_rewards
from mmalign.models.ddim import DDIMPolicy
from mmalign.models.pipelines import load_sd_pipeline
from mmalign.models.rollout import backward_weighted_log_probs, sample_trajectories, trajectory_log_probs
from mmalign.models.stable_diffusion import StableDiffusionAdapter
from mmalign.models.trajectory import Trajectory
from mmalign.prompts import PromptSource, load_prompts
from mmalign.trainers.checkpoint import latest_checkpoint, save_checkpoint
from mmalign.trainers.lora import (
    LoRAConfig,
    attach_lora,
    export_lora,
    frozen_reference,
    reference_policy,
    trainable_state,
)
from mmalign.trainers.prdp_loss import pair_indices, rdp_coefficients

__all__ = ["PRDPConfig", "PRDPTrainer", "ReportConfig"]


class ReportConfig(StrictModel):
    prompts: PromptSource | None = Field(
        default_factory=lambda: PromptSource(world="heldout", n=64, seed=1), description="evaluation prompts"
    )
    samples_per_prompt: int = Field(4, ge=1, description="samples per evaluation prompt (n = prompts × this)")
    rewards: RewardSpecs = Field(default_factory=lambda: ["gold"], description="rewards reported, beside the trained one")
    seed: int = Field(1234, description="noise seed of the evaluation samples (same before and after)")
    grid_prompts: int = Field(8, ge=0, description="prompts in the before/after image grids")


class PRDPConfig(Recipe):
    """PRDP on a Stable Diffusion pipeline."""

    task: Literal["prdp"] = "prdp"
    pipeline: str = Field("world", description="'world' (the shipped shapes pipeline), a hub id or a folder")
    prompts: PromptSource = Field(default_factory=lambda: PromptSource(world="train"), description="training prompts")
    reward: RewardSpecs = Field(min_length=1, description="reward specs; several are summed with their weights")
    log_rewards: RewardSpecs = Field(default_factory=list, description="rewards logged each epoch, not trained on")
    beta: float = Field(0.1, gt=0, description="KL strength β: the loss fits r̂ to reward differences / β")
    clip_range: float = Field(1.0, gt=0, description="proximal clip ε on per-step implicit rewards (nats)")
    epochs: int = Field(10, ge=1)
    prompts_per_epoch: int = Field(8, ge=1, description="prompts sampled per epoch (over all processes)")
    samples_per_prompt: int = Field(4, ge=2, description="trajectories per prompt; the loss uses all pairs")
    inner_steps: int = Field(1, ge=1, description="K: passes over each epoch's samples")
    prompts_per_update: int = Field(4, ge=1, description="prompt groups per optimiser step, per process")
    num_steps: int = Field(20, ge=1, description="DDIM sampling steps")
    eta: float = Field(1.0, gt=0, description="DDIM η (stochasticity of the policy)")
    shared_initial_noise: bool = Field(
        True, description="a prompt's samples start from one initial noise, so reward differences are the steps' doing"
    )
    min_step_std_fraction: float = Field(
        0.1, ge=0, le=1,
        description="steps whose policy std is below this fraction of the largest step's are not trained "
        "(they stay in sampling): see docs/trainers/prdp.md",
    )
    guidance_scale: float = Field(5.0, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    lora: LoRAConfig | None = Field(default_factory=LoRAConfig, description="LoRA settings; null = full fine-tuning")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of the trained weights, used for export")
    seed: int = Field(0, ge=0, description="seed of every random draw (prompts, noise, shuffles)")
    output_dir: str = "runs/prdp"
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    report: ReportConfig | None = Field(default_factory=ReportConfig, description="before/after evaluation")
    trackers: list[str] = Field(default_factory=list, description="accelerate trackers (tensorboard, wandb, …)")

    @model_validator(mode="after")
    def _consistent(self) -> PRDPConfig:
        if self.prompts_per_epoch % self.prompts_per_update:
            raise ValueError(
                f"prompts_per_epoch ({self.prompts_per_epoch}) must be a multiple of prompts_per_update "
                f"({self.prompts_per_update})"
            )
        return self


class PRDPTrainer:
    """Runs a ``PRDPConfig``; ``train()`` resumes from the run folder's latest checkpoint when there is one."""

    def __init__(self, config: PRDPConfig, pipeline=None, progress: bool = True) -> None:
        self.config = config
        self._pipeline = pipeline
        self.progress = progress

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.config
        self.run_dir = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision, log_with=cfg.trackers or None, project_dir=str(self.run_dir),
            cpu=_multi_process_without_cuda(),
        )
        set_seed(cfg.seed)
        pipe = self._pipeline or load_sd_pipeline(cfg.pipeline)
        pipe.to(self.accelerator.device)
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        self.ref_copy = None
        if cfg.lora is not None:
            attach_lora(pipe.unet, cfg.lora)
        else:
            self.ref_copy = frozen_reference(pipe.unet)
            pipe.unet.requires_grad_(True)
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        self.adapter = StableDiffusionAdapter(pipe, cfg.guidance_scale)
        self.policy = DDIMPolicy(pipe.scheduler.config, cfg.num_steps, cfg.eta)
        floor = cfg.min_step_std_fraction * max(self.policy.stds)
        self.trained_steps = torch.tensor([std >= floor for std in self.policy.stds])
        params = list(trainable_state(pipe.unet).values())
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.unet, self.optimizer = self.accelerator.prepare(pipe.unet, optimizer)
        self.ema = None
        if cfg.ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(_ParamList(params), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
        self.reward = _single_reward(cfg.reward, self.accelerator.device)
        self.log_rewards = build_rewards(cfg.log_rewards, self.accelerator.device)
        self.prompts = load_prompts(cfg.prompts)
        if cfg.prompts_per_epoch % self.accelerator.num_processes:
            raise ValueError(
                f"prompts_per_epoch: {cfg.prompts_per_epoch} does not split over {self.accelerator.num_processes} processes"
            )
        self.start_epoch, self.step = 0, 0
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
        if cfg.trackers:
            self.accelerator.init_trackers("mmalign-prdp", config=json.loads(cfg.model_dump_json()))
        self._resume()

    @property
    def raw_unet(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.unet)

    # ------------------------------------------------------------------------------------------- train
    def train(self) -> dict[str, Any]:
        if not hasattr(self, "accelerator"):
            self.setup()
        cfg = self.config
        epochs = range(self.start_epoch, cfg.epochs)
        bar = tqdm(epochs, desc="PRDP", unit="epoch", disable=not (self.progress and self.accelerator.is_main_process))
        metrics: dict[str, Any] = {}
        for epoch in bar:
            start = time.perf_counter()
            trajectory = self.rollout(epoch)
            metrics = self.score(trajectory)
            metrics.update(self.observe(trajectory))
            metrics.update(self.update(trajectory, epoch))
            metrics.update(epoch=epoch, step=self.step, samples_per_s=len(trajectory) / (time.perf_counter() - start))
            self.log(metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.4g}", loss=f"{metrics['loss']:.3g}")
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                self.save_checkpoint(epoch)
        return metrics

    def _epoch_generator(self, epoch: int, purpose: int, shared: bool = False) -> torch.Generator:
        """Every random draw of an epoch comes from (seed, epoch, purpose, rank): resuming replays it exactly.
        ``shared`` generators are the same on every process (the epoch's prompt choice)."""
        rank = 0 if shared else self.accelerator.process_index + 1
        return seeded_generator(self.config.seed, epoch, purpose, rank)

    def rollout(self, epoch: int) -> Trajectory:
        """This process's share of the epoch's prompts, ``samples_per_prompt`` trajectories each, with π_ref log-probs."""
        cfg, acc = self.config, self.accelerator
        chooser = self._epoch_generator(epoch, 0, shared=True)
        picks = torch.randint(len(self.prompts), (cfg.prompts_per_epoch,), generator=chooser).tolist()
        mine = picks[acc.process_index :: acc.num_processes]
        first_group = acc.process_index * len(mine)
        texts, metadata = [], []
        for g, index in enumerate(mine):
            text, meta = self.prompts[index]
            for _ in range(cfg.samples_per_prompt):
                texts.append(text)
                metadata.append({**meta, "group": first_group + g})
        self.unet.eval()
        with acc.autocast():
            trajectory = sample_trajectories(
                self.adapter, self.policy, texts, metadata, self._epoch_generator(epoch, 0), unet=self.raw_unet,
                group_size=cfg.samples_per_prompt if cfg.shared_initial_noise else 1,
            )
            with reference_policy(self.raw_unet, self.ref_copy) as ref:
                trajectory.ref_log_probs = trajectory_log_probs(self.adapter, self.policy, ref, trajectory)
            if epoch == self.start_epoch:  # the training path must re-score exactly what sampling produced
                again = trajectory_log_probs(self.adapter, self.policy, self.unet, trajectory)
                if not torch.equal(again, trajectory.log_probs):
                    raise RuntimeError(
                        "re-scoring sampled steps does not reproduce their log-probs: the ratio is not 1 before the "
                        f"first update (max |Δ| = {float((again - trajectory.log_probs).abs().max()):.3g})"
                    )
        return trajectory

    def score(self, trajectory: Trajectory) -> dict[str, float]:
        """Rewards of the samples (NaN where a reward failed), and their statistics over all processes."""
        with torch.no_grad():
            out = self.reward(trajectory.media())
        trajectory.rewards = out.scores.float().to(self.accelerator.device)
        trajectory.reward_components = {k: v.float().to(self.accelerator.device) for k, v in out.components.items()}
        metrics = _stats("reward", self.accelerator.gather(trajectory.rewards))
        for name, values in trajectory.reward_components.items():
            metrics.update(_stats(f"reward/{name}", self.accelerator.gather(values)))
        rewards = trajectory.rewards.view(-1, self.config.samples_per_prompt)
        finite = torch.isfinite(rewards).all(1)
        flat = (rewards.max(1).values - rewards.min(1).values).eq(0) & finite
        metrics["zero_spread_groups"] = float(self.accelerator.gather(flat.float()).mean())
        return metrics

    def observe(self, trajectory: Trajectory) -> dict[str, float]:
        """Rewards that are logged but not trained on (the world's gold verifier: the truth to compare with)."""
        metrics = {}
        with torch.no_grad():
            for name, reward in self.log_rewards.items():
                metrics.update(_stats(name, self.accelerator.gather(reward(trajectory.media()).scores.float().to(self.accelerator.device))))
        return metrics

    def update(self, trajectory: Trajectory, epoch: int) -> dict[str, float]:
        """``inner_steps`` passes of proximal RDP gradient steps over the epoch's prompt groups."""
        cfg, acc = self.config, self.accelerator
        trained = self.trained_steps.to(trajectory.log_probs.device)
        s_old = (trajectory.log_probs - trajectory.ref_log_probs) * trained
        valid = torch.isfinite(trajectory.rewards).cpu()
        rewards = torch.nan_to_num(trajectory.rewards, nan=0.0, posinf=0.0, neginf=0.0)
        groups = trajectory.groups
        group_ids = groups.unique()
        totals = {"loss": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0, "pairs": 0}
        updates, changed = 0, False
        self.unet.train()
        for k in range(cfg.inner_steps):
            order = group_ids[torch.randperm(len(group_ids), generator=self._epoch_generator(epoch, 1 + k))]
            for start in range(0, len(order), cfg.prompts_per_update):
                chosen = torch.isin(groups, order[start : start + cfg.prompts_per_update])
                index = chosen.nonzero().squeeze(1)
                part = trajectory.select(index)
                with acc.autocast():
                    if changed:
                        s = (trajectory_log_probs(self.adapter, self.policy, self.unet, part) - part.ref_log_probs) * trained
                    else:  # θ is still θ_old: the sampled log-probs are exact
                        s = s_old[index.to(s_old.device)]
                    terms = rdp_coefficients(
                        s, s_old[index.to(s_old.device)], rewards[index.to(rewards.device)],
                        pair_indices(part.groups, valid[index]), cfg.beta, cfg.clip_range,
                    )
                    terms.coef[:, ~trained.to(terms.coef.device)] = 0  # untrained steps are not back-propagated
                    backward_weighted_log_probs(
                        self.adapter, self.policy, self.unet, part, terms.coef, lambda: acc.no_sync(self.unet)
                    )
                grad_norm = acc.clip_grad_norm_(self.unet.parameters(), cfg.max_grad_norm or float("inf"))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update_parameters(_ParamList(list(trainable_state(self.raw_unet).values())))
                self.step += 1
                updates += 1
                changed = True
                totals["loss"] += terms.loss
                totals["clip_fraction"] += terms.clip_fraction
                totals["grad_norm"] += float(grad_norm)
                totals["pairs"] += terms.num_pairs
        self.unet.eval()
        with torch.no_grad(), acc.autocast():
            new = trajectory_log_probs(self.adapter, self.policy, self.raw_unet, trajectory)
        delta = new - trajectory.log_probs
        metrics = {k: v / max(updates, 1) for k, v in totals.items() if k != "pairs"}
        metrics["pairs"] = totals["pairs"]
        # over the trained steps: an untrained low-noise step's log-prob moves by ~1/σ² for any change of the mean
        metrics["approx_kl"] = float(acc.gather(0.5 * delta[:, trained].pow(2).mean(1)).mean())
        metrics["skipped_nonfinite"] = int(acc.gather((~valid).to(acc.device).float()).sum())
        metrics["implicit_reward"] = float(acc.gather(((new - trajectory.ref_log_probs) * trained).sum(1)).mean())
        return metrics

    # -------------------------------------------------------------------------------------- bookkeeping
    def log(self, metrics: dict[str, Any]) -> None:
        if self.config.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=self.step)
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(metrics) + "\n")

    def save_checkpoint(self, epoch: int) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            extra = {"ema": self.ema.state_dict() if self.ema is not None else {}}
            state = {"epoch": epoch, "step": self.step, "config": json.loads(self.config.model_dump_json())}
            save_checkpoint(
                self.run_dir / "checkpoints", f"epoch-{epoch:05d}", trainable_state(self.raw_unet),
                self.optimizer.state_dict(), extra, state, self.config.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir / "checkpoints")
        if checkpoint is None:
            return
        params = trainable_state(self.raw_unet)
        missing = sorted(set(params) - set(checkpoint.trainable))
        if missing:
            raise ValueError(f"checkpoint {checkpoint.path}: lacks trained parameters {missing[:3]} (another setup?)")
        with torch.no_grad():
            for name, value in checkpoint.trainable.items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        if self.ema is not None and checkpoint.extra.get("ema"):
            self.ema.load_state_dict(checkpoint.extra["ema"])
        self.start_epoch, self.step = checkpoint.state["epoch"] + 1, checkpoint.state["step"]
        self.resumed_from = str(checkpoint.path)
        if self.accelerator.is_main_process and self.progress:
            print(f"resuming from {checkpoint.path} (epoch {self.start_epoch})")

    def report(self) -> dict[str, Any] | None:
        """Evaluate π_ref (before) and the trained policy (after) on the report prompts with the same seeds; write
        ``summary.json``, ``curves.png`` and ``grid.png`` to the run folder."""
        from mmalign.eval.generator import evaluate_generator
        from mmalign.eval.report import write_report

        cfg = self.config
        if cfg.report is None or cfg.report.prompts is None or not self.accelerator.is_main_process:
            return None
        rewards = {"reward": self.reward, **build_rewards(cfg.report.rewards, self.accelerator.device)}
        prompts = load_prompts(cfg.report.prompts)
        runs = {}
        for tag in ("before", "after"):
            with torch.no_grad(), self.accelerator.autocast(), _ema_weights(self):
                context = reference_policy(self.raw_unet, self.ref_copy) if tag == "before" else nullcontext(self.raw_unet)
                with context as unet:
                    runs[tag] = evaluate_generator(
                        self.adapter, self.policy, prompts, rewards, cfg.report.samples_per_prompt, cfg.report.seed,
                        progress=self.progress, unet=unet,
                    )
        extra = {"epochs": cfg.epochs, "steps": self.step, "report_prompts": cfg.report.prompts.model_dump()}
        keys = ["reward", *self.log_rewards, "approx_kl", "loss"]
        return write_report(self.run_dir, runs["before"], runs["after"], keys, extra)

    def export(self) -> Path:
        """The trained weights for plain diffusers: LoRA (``pipe.load_lora_weights``) or the whole pipeline."""
        self.accelerator.wait_for_everyone()
        out = self.run_dir / ("lora" if self.config.lora is not None else "pipeline")
        if self.accelerator.is_main_process:
            with _ema_weights(self):
                if self.config.lora is not None:
                    export_lora(self.raw_unet, out)
                else:
                    self.adapter.pipeline.save_pretrained(out)
        return out


class _ParamList(torch.nn.Module):
    """Parameters as a module, so ``AveragedModel`` can keep an EMA of just the trained ones."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(params)


class _ema_weights:  # noqa: N801 - used as a context manager
    """Swap the EMA weights in for export, and the live ones back after."""

    def __init__(self, trainer: PRDPTrainer) -> None:
        self.trainer = trainer
        self.saved: list[torch.Tensor] = []

    def __enter__(self):
        if self.trainer.ema is None:
            return
        live = list(trainable_state(self.trainer.raw_unet).values())
        self.saved = [p.detach().clone() for p in live]
        with torch.no_grad():
            for p, avg in zip(live, self.trainer.ema.module.params):
                p.copy_(avg)

    def __exit__(self, *exc):
        if self.saved:
            with torch.no_grad():
                for p, value in zip(trainable_state(self.trainer.raw_unet).values(), self.saved):
                    p.copy_(value)


def _multi_process_without_cuda() -> bool:
    """Several launched processes and no CUDA: accelerate must be told to use gloo on the CPU, or every process
    would train alone as rank 0."""
    import os

    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers by NumPy's SeedSequence (stable across processes and runs,
    unlike Python's salted ``hash``)."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1))


def _single_reward(specs: RewardSpecs, device) -> torch.nn.Module:
    """The trained reward: several specs become one weighted sum, so the loss sees one score per sample."""
    from mmalign.rewards import build

    return build(specs if len(specs) > 1 else specs[0]).to(device)


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    finite = values[torch.isfinite(values)].double()
    if finite.numel() == 0:
        return {f"{prefix}/mean": float("nan"), f"{prefix}/std": float("nan")}
    return {f"{prefix}/mean": float(finite.mean()), f"{prefix}/std": float(finite.std()) if finite.numel() > 1 else 0.0}
