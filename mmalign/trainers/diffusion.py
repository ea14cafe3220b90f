"""What every diffusion RL algorithm shares: its recipe fields and the loop around its update.

``DiffusionConfig`` holds the fields every diffusion recipe has (pipeline, prompts, reward, sampler, budget,
optimiser, LoRA, run folder, report); an algorithm's config adds its own. ``DiffusionLoop`` is the component an
algorithm's trainer holds: ``setup`` (pipeline, LoRA or a frozen reference, sampling policy, optimiser, EMA, the
``Run``), ``train(update)`` (each epoch: ``rollout`` → ``score`` → ``update`` → log → checkpoint, resuming from
the run folder), ``report``, ``export`` and ``cleanup``. The algorithm supplies ``update(trajectory, epoch)``
and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from mmalign.config import Recipe, StrictModel, VideoConfig
from mmalign.eval.scoring import build_rewards
from mmalign.files import write_atomic
from mmalign.models.pipelines import adapter_for, load_pipeline
from mmalign.models.rollout import sample_trajectories, trajectory_log_probs
from mmalign.models.trajectory import Trajectory
from mmalign.prompts import PromptSource, load_prompts
from mmalign.rewards.registry import RewardSpecs
from mmalign.trainers.lora import (
    LoRAConfig,
    attach_lora,
    frozen_reference,
    reference_policy,
    trainable_state,
)
from mmalign.trainers.run import Run

__all__ = [
    "DiffusionConfig", "DiffusionLoop", "DiffusionTrainer", "EvalConfig", "ReportConfig", "VideoConfig",
    "assert_ratio_is_one", "group_stats",
]


class ReportConfig(StrictModel):
    prompts: PromptSource = Field(description="evaluation prompts")
    samples_per_prompt: int = Field(4, ge=1, description="samples per evaluation prompt (n = prompts × this)")
    rewards: RewardSpecs = Field(default_factory=list, description="rewards reported, beside the trained one")
    seed: int = Field(1234, description="noise seed of the evaluation samples (same before and after)")
    grid_prompts: int = Field(8, ge=0, description="prompts in the before/after image grids")
    diversity_encoder: str | dict[str, Any] | None = Field(
        None, description="reward spec of a CLIP-type reward whose image encoder embeds the samples for the "
        "diversity metrics; null = the trained reward's (none there: pixel metrics only, with a note)",
    )


class EvalConfig(StrictModel):
    """The held-out evaluation run every ``eval_every`` epochs during training (the over-optimisation curves)."""

    prompts: PromptSource | None = Field(None, description="held-out prompts; null = the report's prompts")
    max_prompts: int = Field(8, ge=1, description="at most this many of them (the first), to keep each evaluation cheap")
    samples_per_prompt: int = Field(2, ge=1, description="samples per prompt, with the same seeds every time")
    rewards: RewardSpecs | None = Field(
        None, description="rewards evaluated beside the trained one; null = the report's (log_rewards without a report)"
    )
    seed: int = Field(4321, description="noise seed of the evaluation samples (the same at every evaluation)")


class DiffusionConfig(Recipe):
    """Fields of every diffusion RL recipe."""

    pipeline: str = Field(description="'world' (the shipped shapes pipeline), a hub id or a folder")
    motion_adapter: str | None = Field(
        None, description="an AnimateDiff MotionAdapter (hub id or folder): the SD 1.x pipeline becomes AnimateDiff's"
    )
    scheduler: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the pipeline's scheduler config (e.g. beta_schedule: linear)"
    )
    video: VideoConfig | None = Field(None, description="frames and size of a video pipeline's samples")
    prompts: PromptSource = Field(description="training prompts")
    reward: RewardSpecs = Field(min_length=1, description="reward specs; several are summed with their weights")
    log_rewards: RewardSpecs = Field(default_factory=list, description="rewards logged each epoch, not trained on")
    epochs: int = Field(10, ge=1)
    prompts_per_epoch: int = Field(8, ge=1, description="prompts sampled per epoch (over all processes)")
    samples_per_prompt: int = Field(4, ge=2, description="trajectories per prompt (a group)")
    inner_steps: int = Field(1, ge=1, description="K: passes over each epoch's samples")
    prompts_per_update: int = Field(4, ge=1, description="prompt groups per optimiser step, per process")
    num_steps: int = Field(20, ge=1, description="sampling steps (DDIM, or the flow SDE's)")
    eta: float = Field(1.0, gt=0,
                       description="DDIM η, or the flow SDE's noise level a (stochasticity of the policy)")
    shared_initial_noise: bool = Field(
        False, description="a prompt's samples start from one initial noise, so reward differences are the steps' doing"
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
    output_dir: str = Field(description="the run folder")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    report: ReportConfig | None = Field(None, description="before/after evaluation")
    eval_every: int | None = Field(
        None, ge=1,
        description="epochs between held-out evaluations during training (and one before the first epoch); null = off",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="what eval_every evaluates")
    trackers: list[str] = Field(default_factory=list, description="accelerate trackers (tensorboard, wandb, …)")
    sample_images: int = Field(4, ge=0, description="samples of each checkpointed epoch sent to the trackers")

    @model_validator(mode="after")
    def _consistent(self) -> DiffusionConfig:
        if self.prompts_per_epoch % self.prompts_per_update:
            raise ValueError(
                f"prompts_per_epoch ({self.prompts_per_epoch}) must be a multiple of prompts_per_update "
                f"({self.prompts_per_update})"
            )
        if self.eval_every is not None and self.eval.prompts is None and self.report is None:
            raise ValueError("eval_every: needs eval.prompts, or a report whose prompts it evaluates")
        return self


def group_stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    """``prefix/mean`` and ``prefix/std`` over the finite values."""
    finite = values[torch.isfinite(values)].double()
    if finite.numel() == 0:
        return {f"{prefix}/mean": float("nan"), f"{prefix}/std": float("nan")}
    return {f"{prefix}/mean": float(finite.mean()), f"{prefix}/std": float(finite.std()) if finite.numel() > 1 else 0.0}


def assert_ratio_is_one(new: torch.Tensor, old: torch.Tensor, rtol: float = 0.0) -> None:
    """Before the first update θ = θ_old: re-scoring a sampled step must give its sampled log-prob (exactly for
    the same batch; within ``rtol`` when the batch differs, since fp32 kernels round differently for other batch
    shapes), or every ratio and clip decision would rest on a mismatch instead of the update."""
    new = new.detach().to(old)
    same = torch.equal(new, old) if rtol == 0 else torch.allclose(new, old, rtol=rtol, atol=0.0)
    if not same:
        raise RuntimeError(
            "re-scoring sampled steps does not reproduce their log-probs: the ratio is not 1 before the first update "
            f"(max |Δ| = {float((new - old).abs().max()):.3g} nats, rtol {rtol:g})"
        )


class DiffusionLoop:
    """The shared loop of a diffusion RL trainer (see the module docstring).

    Args:
        config: the recipe.
        pipeline: a pipeline to train instead of loading ``config.pipeline`` (tests build tiny ones in code).
        needs_reference: store π_ref's log-prob of every sampled step (``trajectory.ref_log_probs``).
        needs_log_probs: the update uses the sampled steps' log-probs, so the first rollout checks that re-scoring
            reproduces them; False for an algorithm that trains on the clean samples alone (DiffusionNFT), which
            may then sample with any solver, deterministic ones included, and with weights of its own.
    """

    def __init__(self, config: DiffusionConfig, pipeline=None, progress: bool = True, needs_reference: bool = True,
                 needs_log_probs: bool = True):
        self.config, self._pipeline, self.progress = config, pipeline, progress
        self.needs_reference, self.needs_log_probs = needs_reference, needs_log_probs
        self.state: dict[str, Any] = {}  # the algorithm's resumable state: name → object with state_dict()
        #: entered around each rollout: the weights it samples with (default the trained ones)
        self.sampling_weights: Callable[[], Any] = nullcontext

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.config
        self.run = Run(cfg, cfg.output_dir, cfg.seed, cfg.mixed_precision, cfg.trackers, f"mmalign-{cfg.task}",
                       self.progress)
        device = self.run.device
        pipe = self._pipeline or load_pipeline(cfg.pipeline, motion_adapter=cfg.motion_adapter,
                                               scheduler=cfg.scheduler)
        pipe.to(device)
        self.adapter = adapter = adapter_for(pipe, cfg.guidance_scale, **(cfg.video.options() if cfg.video else {}))
        for module in adapter.frozen_modules:
            module.requires_grad_(False)
        denoiser = adapter.denoiser
        self.ref_copy = None
        if cfg.lora is not None:
            attach_lora(denoiser, cfg.lora, adapter.lora_targets)
        else:
            self.ref_copy = frozen_reference(denoiser)
            denoiser.requires_grad_(True)
        if cfg.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.policy = adapter.make_policy(cfg.num_steps, cfg.eta)
        floor = cfg.min_step_std_fraction * max(self.policy.stds)
        self.trained_steps = torch.tensor([std >= floor for std in self.policy.stds])
        params = list(trainable_state(denoiser).values())
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.denoiser, self.optimizer = self.run.accelerator.prepare(denoiser, optimizer)
        self.ema = None
        if cfg.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=cfg.ema_decay)
        self.reward = _single_reward(cfg.reward, device)
        self.log_rewards = build_rewards(cfg.log_rewards, device)
        self.prompts = load_prompts(cfg.prompts)
        if cfg.prompts_per_epoch % self.run.accelerator.num_processes:
            raise ValueError(f"prompts_per_epoch: {cfg.prompts_per_epoch} does not split over "
                             f"{self.run.accelerator.num_processes} processes")
        self.start_epoch, self.step = 0, 0

    @property
    def accelerator(self):
        return self.run.accelerator

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def raw_denoiser(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.denoiser)

    def reference(self):
        """π_ref as a context giving its denoiser: the LoRA-disabled one, or the frozen copy of a full fine-tune."""
        return reference_policy(self.raw_denoiser, self.ref_copy)

    def resume(self) -> None:
        """Continue from the run folder's latest checkpoint: weights, optimiser, scaler, EMA, algorithm state."""
        checkpoint = self.run.resume(trainable_state(self.raw_denoiser), self.optimizer)
        if checkpoint is None:
            return
        if self.ema is not None and checkpoint.extra.get("ema"):
            self.ema.load_state_dict(checkpoint.extra["ema"])
            self.ema.to(self.run.device)
        for name, obj in self.state.items():
            obj.load_state_dict(checkpoint.extra[name])
        self.start_epoch, self.step = checkpoint.state["epoch"] + 1, checkpoint.state["step"]

    # ------------------------------------------------------------------------------------------- train
    def train(self, update: Callable[[Trajectory, int], dict[str, Any]], name: str = "train") -> dict[str, Any]:
        """Epochs from the last checkpoint on: ``rollout`` → ``score`` → ``update`` → log → (``evaluate`` every
        ``eval_every`` epochs, and before the first) → checkpoint."""
        cfg = self.config
        self.resume()
        bar = tqdm(range(self.start_epoch, cfg.epochs), desc=name, unit="epoch",
                   disable=not (self.progress and self.run.is_main))
        metrics: dict[str, Any] = {}
        if self.start_epoch == 0 and self._eval_due(0):
            self.evaluate(0)
        for epoch in bar:
            start = time.perf_counter()
            trajectory = self.rollout(epoch)
            metrics = self.score(trajectory)
            metrics.update(update(trajectory, epoch))
            metrics.update(epoch=epoch, step=self.step, samples_per_s=len(trajectory) / (time.perf_counter() - start))
            self.run.log(metrics, self.step)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.4g}", loss=f"{metrics['loss']:.3g}")
            if self._eval_due(epoch + 1):  # before the checkpoint: a run killed in between redoes both
                self.evaluate(epoch + 1)
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                self.save_checkpoint(epoch)
                self._log_samples(trajectory)
        return metrics

    def rollout(self, epoch: int) -> Trajectory:
        """This process's share of the epoch's prompts, ``samples_per_prompt`` trajectories each (π_ref's log-probs
        too when needed). ``metadata[i]`` holds the sample's ``group`` and its ``prompt_index`` in the prompt set."""
        cfg, acc = self.config, self.accelerator
        picks = torch.randint(len(self.prompts), (cfg.prompts_per_epoch,), generator=self.run.generator(epoch, 0, True))
        mine = picks.tolist()[acc.process_index :: acc.num_processes]
        first_group = acc.process_index * len(mine)
        texts, metadata = [], []
        for g, index in enumerate(mine):
            text, meta = self.prompts[index]
            for _ in range(cfg.samples_per_prompt):
                texts.append(text)
                metadata.append({**meta, "group": first_group + g, "prompt_index": index})
        self.denoiser.eval()
        with acc.autocast():
            with self.sampling_weights():
                trajectory = sample_trajectories(
                    self.adapter, self.policy, texts, metadata, self.run.generator(epoch, 0),
                    denoiser=self.raw_denoiser, group_size=cfg.samples_per_prompt if cfg.shared_initial_noise else 1,
                )
            if self.needs_reference:
                with self.reference() as ref:
                    trajectory.ref_log_probs = trajectory_log_probs(self.adapter, self.policy, ref, trajectory)
            if self.needs_log_probs and epoch == self.start_epoch:  # re-scoring must give what sampling produced
                assert_ratio_is_one(trajectory_log_probs(self.adapter, self.policy, self.denoiser, trajectory),
                                    trajectory.log_probs)
        return trajectory

    def score(self, trajectory: Trajectory) -> dict[str, float]:
        """Rewards of the samples (NaN where a reward failed), the logged rewards, and their statistics over all
        processes; ``zero_spread_groups`` is the fraction of prompt groups whose rewards are all equal."""
        acc = self.accelerator
        with torch.no_grad():
            out = self.reward(trajectory.media())
            logged = {name: reward(trajectory.media()).scores for name, reward in self.log_rewards.items()}
        trajectory.rewards = out.scores.float().to(acc.device)
        trajectory.reward_components = {k: v.float().to(acc.device) for k, v in out.components.items()}
        metrics = group_stats("reward", acc.gather(trajectory.rewards))
        for name, values in trajectory.reward_components.items():
            metrics.update(group_stats(f"reward/{name}", acc.gather(values)))
        for name, values in logged.items():
            metrics.update(group_stats(name, acc.gather(values.float().to(acc.device))))
        rewards = trajectory.rewards.view(-1, self.config.samples_per_prompt)
        flat = (rewards.max(1).values - rewards.min(1).values).eq(0) & torch.isfinite(rewards).all(1)
        metrics["zero_spread_groups"] = float(acc.gather(flat.float()).mean())
        metrics["skipped_nonfinite"] = int(acc.gather((~torch.isfinite(trajectory.rewards)).float()).sum())
        return metrics

    def minibatches(self, trajectory: Trajectory, epoch: int, k: int) -> Iterator[torch.Tensor]:
        """Indices of the samples of each optimiser step of pass ``k``: ``prompts_per_update`` whole prompt
        groups, in an order drawn from the run's generators."""
        groups = trajectory.groups
        ids = groups.unique()
        order = ids[torch.randperm(len(ids), generator=self.run.generator(epoch, 1 + k))]
        for start in range(0, len(order), self.config.prompts_per_update):
            yield torch.isin(groups, order[start : start + self.config.prompts_per_update]).nonzero().squeeze(1)

    def no_sync(self):
        """For ``backward_per_step``: gradients are all-reduced once per optimiser step."""
        return self.accelerator.no_sync(self.denoiser)

    def optimizer_step(self) -> float:
        """Clip, step, zero the gradients, update the EMA; returns the gradient norm before clipping."""
        cfg = self.config
        grad_norm = self.accelerator.clip_grad_norm_(self.denoiser.parameters(), cfg.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(trainable_state(self.raw_denoiser).values())
        self.step += 1
        return float(grad_norm)

    # ------------------------------------------------------------------------ evaluation during training
    def _eval_due(self, epochs_done: int) -> bool:
        """Whether ``evaluate`` runs once ``epochs_done`` epochs are trained: 0, every ``eval_every``, the last."""
        every = self.config.eval_every
        return every is not None and (epochs_done % every == 0 or epochs_done == self.config.epochs)

    def evaluate(self, epochs_done: int) -> dict[str, Any] | None:
        """The held-out evaluation of ``eval_every`` (main process; returns the row it logs, None elsewhere).

        The current policy (the EMA weights when kept) samples the ``eval`` prompts with the same seeds every
        time; the row holds the mean (and ``/std``) of the trained reward (``eval/reward``) and of every eval
        reward (``eval/<name>``, components ``eval/<name>/<component>``), ``eval/distance_to_reference`` (the mean
        per-sample pixel RMS difference from π_ref's samples of the same seeds, sampled once and cached),
        ``eval/kl_to_reference`` (KL(π‖π_ref) of the sampling chains in nats, estimated on the eval samples' own
        trajectories, when the policy is stochastic) and the per-prompt diversity metrics averaged over prompts
        (``eval/diversity/…``), with ``"eval": true``, ``epoch`` (epochs trained, 0 = the base policy) and
        ``step``. Every draw comes from the evaluation's own generators and the global RNG state is restored
        after, so training is the same with it on or off.
        """
        from mmalign.eval.generator import evaluate_generator

        if not self.run.is_main:
            return None
        cfg = self.config.eval
        if not hasattr(self, "_eval_prompts"):
            report = self.config.report
            self._eval_prompts = load_prompts(cfg.prompts or report.prompts)[: cfg.max_prompts]
            specs = cfg.rewards if cfg.rewards is not None else report.rewards if report else self.config.log_rewards
            self._eval_rewards = {"reward": self.reward, **build_rewards(specs, self.run.device)}
            self._eval_reference: torch.Tensor | None = None

        def sample(denoiser, rewards, reference=None):
            return evaluate_generator(self.adapter, self.policy, self._eval_prompts, rewards, cfg.samples_per_prompt,
                                      cfg.seed, progress=False, denoiser=denoiser, reference=reference)

        devices = [self.run.device] if self.run.device.type == "cuda" else []
        was_training = self.denoiser.training
        self.denoiser.eval()
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.accelerator.autocast():
            if self._eval_reference is None:
                with self.reference() as ref:
                    self._eval_reference = sample(ref, {}).batch.pixels.float()
            with self.ema_weights():
                current = sample(self.raw_denoiser, self._eval_rewards, self.reference)
            diversity = self._eval_diversity(current)
        self.denoiser.train(was_training)
        row: dict[str, Any] = {"eval": True, "epoch": epochs_done, "step": self.step}
        for key, values in current.scores.items():
            finite = values[torch.isfinite(values)].double()
            row[f"eval/{key}"] = float(finite.mean()) if finite.numel() else float("nan")
            if key in self._eval_rewards:
                row[f"eval/{key}/std"] = float(finite.std()) if finite.numel() > 1 else float("nan")
        difference = current.batch.pixels.float() - self._eval_reference
        row["eval/distance_to_reference"] = float(difference.flatten(1).pow(2).mean(1).sqrt().mean())
        row.update(diversity)
        self.run.log(row, self.step)
        return row

    def _eval_diversity(self, evaluation) -> dict[str, float]:
        """``eval/diversity/…``: the means over prompts of the per-prompt diversity metrics, the embedding ones
        (Vendi, pairwise distance) with the trained reward's image encoder where it has one."""
        encoder, _ = self._trained_reward_encoder()
        columns = evaluation.add_diversity(encoder).diversity
        return {f"eval/{key}": float(values[torch.isfinite(values)].mean()) for key, values in columns.items()}

    def _trained_reward_encoder(self):
        """``(encoder, None)`` from the trained reward's image tower (CLIP-family rewards), or ``(None, why)``."""
        from mmalign.eval.diversity import image_encoder

        try:
            return image_encoder(self.reward), None
        except ValueError as err:  # no image tower (e.g. a pixel rule): pixel metrics only
            return None, err

    # -------------------------------------------------------------------------------------- bookkeeping
    def save_checkpoint(self, epoch: int) -> None:
        extra = {"ema": self.ema.state_dict() if self.ema is not None else {}}
        extra.update({name: obj.state_dict() for name, obj in self.state.items()})
        self.run.save_checkpoint(epoch, self.step, trainable_state(self.raw_denoiser), self.optimizer, extra,
                                 self.config.keep_checkpoints)

    def _log_samples(self, trajectory: Trajectory) -> None:
        n = min(self.config.sample_images, len(trajectory))
        if n and self.config.trackers:
            from mmalign.eval.grid import image_grid

            labels = [f"{p}\nreward {float(r):.3f}" for p, r in zip(trajectory.prompts[:n], trajectory.rewards[:n])]
            self.run.log_images({"samples": image_grid(trajectory.pixels[:n], labels, columns=n)}, self.step)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights swapped in (for the report's "after" and for export), the live ones back after."""
        if self.ema is None:
            yield
            return
        params = list(trainable_state(self.raw_denoiser).values())
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def report(self, curve_keys: list[str]) -> dict[str, Any] | None:
        """Evaluate π_ref (before) and the trained policy (after) on the report prompts with the same seeds; write
        ``summary.json``, ``curves.png`` and ``grid.png`` to the run folder and the grid to the trackers."""
        from mmalign.eval.generator import evaluate_generator
        from mmalign.eval.report import write_report

        cfg = self.config
        if cfg.report is None or not self.run.is_main:
            return None
        rewards = {"reward": self.reward, **build_rewards(cfg.report.rewards, self.run.device)}
        prompts = load_prompts(cfg.report.prompts)
        runs = {}
        for tag in ("before", "after"):
            with torch.no_grad(), self.accelerator.autocast(), self.ema_weights():
                context = self.reference() if tag == "before" else nullcontext(self.raw_denoiser)
                with context as denoiser:
                    runs[tag] = evaluate_generator(
                        self.adapter, self.policy, prompts, rewards, cfg.report.samples_per_prompt, cfg.report.seed,
                        progress=self.progress, denoiser=denoiser,
                    )
        encoder, encoder_name = self._diversity_encoder()
        for run in runs.values():
            run.add_diversity(encoder)
        extra = {"epochs": cfg.epochs, "steps": self.step, "report_prompts": cfg.report.prompts.model_dump(),
                 "diversity_encoder": encoder_name}
        keys = ["reward", *self.log_rewards, *curve_keys]
        summary = write_report(self.run_dir, runs["before"], runs["after"], keys, extra, limit=cfg.report.grid_prompts)
        if summary.get("grid"):
            from PIL import Image

            self.run.log_images({"report/grid": Image.open(self.run_dir / summary["grid"]).convert("RGB")}, self.step)
        return summary

    def _diversity_encoder(self):
        """The report's diversity encoder and what it is: ``report.diversity_encoder``'s image encoder (an error
        if it has none), else the trained reward's, else None (pixel metrics only) with a printed note."""
        spec = self.config.report.diversity_encoder
        if spec is not None:
            from mmalign.eval.diversity import image_encoder
            from mmalign.rewards import build

            return image_encoder(build(spec).to(self.run.device)), spec
        encoder, why = self._trained_reward_encoder()
        if encoder is None:
            print(f"report: no embedding diversity (Vendi, pairwise distance): {why}; set "
                  "report.diversity_encoder to a CLIP-type reward for them")
            return None, None
        return encoder, "reward"

    def export(self) -> Path:
        """The trained weights for plain diffusers: LoRA (``pipe.load_lora_weights``) or the whole pipeline, written
        atomically (a folder that exists is complete)."""
        self.accelerator.wait_for_everyone()
        out = self.run_dir / ("lora" if self.config.lora is not None else "pipeline")
        if self.run.is_main:
            with self.ema_weights():
                if self.config.lora is not None:
                    write_atomic(out, lambda tmp: self.adapter.export_lora(self.raw_denoiser, tmp))
                else:
                    write_atomic(out, self.adapter.pipeline.save_pretrained)
        return out

    def cleanup(self) -> None:
        self.run.cleanup()


class DiffusionTrainer:
    """The trainer protocol (``setup`` → ``train``, which resumes → ``report`` → ``export`` → ``cleanup``) over a
    ``DiffusionLoop``. An algorithm subclasses it with its ``update(trajectory, epoch)`` and sets ``name`` (the
    progress bar's), ``curve_keys`` (metrics drawn in the report's curves) and ``needs_reference`` (whether the
    rollout stores π_ref's log-probs) and ``needs_log_probs`` (whether the update uses the sampled steps' log-probs);
    everything else is the loop's."""

    name = "train"
    curve_keys: tuple[str, ...] = ("approx_kl", "loss")
    needs_reference = True
    needs_log_probs = True

    def __init__(self, config: DiffusionConfig, pipeline=None, progress: bool = True) -> None:
        self.config = config
        self.loop = DiffusionLoop(config, pipeline, progress, needs_reference=self.needs_reference,
                                  needs_log_probs=self.needs_log_probs)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.output_dir)

    def setup(self) -> None:
        self.loop.setup()

    def train(self) -> dict[str, Any]:
        if not hasattr(self.loop, "run"):
            self.setup()
        return self.loop.train(self.update, self.name)

    def update(self, trajectory: Trajectory, epoch: int) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__}: an algorithm defines update(trajectory, epoch)")

    def report(self) -> dict[str, Any] | None:
        return self.loop.report(list(self.curve_keys))

    def export(self) -> Path:
        return self.loop.export()

    def cleanup(self) -> None:
        self.loop.cleanup()


def _single_reward(specs: RewardSpecs, device) -> torch.nn.Module:
    """The trained reward: several specs become one weighted sum, so the loss sees one score per sample."""
    from mmalign.rewards import build

    return build(specs if len(specs) > 1 else specs[0]).to(device)
