"""The ``vlm_grpo`` recipe: ``VLMGRPOConfig`` (YAML schema) and ``VLMGRPORecipeTrainer`` (``mmalign train``).

A recipe names the policy (``world`` for the shipped shapes-world VLM, a hub id or a folder), where the VQA
rows come from, the rewards (any mmalign reward spec, each one TRL reward function; or one UWO/WCO ensemble),
mmalign's additions (dynamic sampling, an explicit reference), LoRA, and ``grpo``: keyword arguments of
``trl.GRPOConfig`` passed through as they are (``num_generations``, ``loss_type``, ``scale_rewards``,
``multi_objective_aggregation``, ``beta``, ``max_steps``, …), checked against its fields by name.

The run folder holds ``config.json``, ``metrics.jsonl`` (every TRL log row), ``checkpoints/`` (TRL's, with the
rewards' normalisation state; a rerun resumes from the last), ``before.json`` (the policy's answers before
training), and the report: greedy answers on held-out rows before and after, each reward's mean with a 95% CI,
and for rows with a ``kind`` the first reward's paired change per kind with the kinds that rose and fell
(``summary.json``: ``by_kind``), ``curves.png`` and ``grid.png``; then ``lora/`` or ``model/``.
"""

from __future__ import annotations

import difflib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from mmalign.config import Recipe, StrictModel, import_object
from mmalign.files import write_atomic, write_text_atomic
from mmalign.rewards.registry import RewardSpecs
from mmalign.trainers.lora import LM_TARGETS, LoRAConfig
from mmalign.trainers.run import append_metrics, write_config

__all__ = [
    "AggregateConfig",
    "DataSource",
    "HubVQASource",
    "VLMGRPOConfig",
    "VLMGRPORecipeTrainer",
    "VQAReportConfig",
    "WorldVQASource",
    "load_rows",
]

#: named policies → a function returning their folder, as import paths (the world is reached, not imported)
_MODEL_SOURCES = {"world": "mmalign.world.vlm:vlm_path"}
#: the rows of ``data: world``, by import path as well
_WORLD_ROWS = "mmalign.world.vqa:world_vqa_rows"
#: GRPOConfig fields the recipe sets itself.
_OWNED = {"output_dir": "output_dir", "seed": "seed", "report_to": "trackers"}


class WorldVQASource(StrictModel):
    """Questions about shapes-world renders (``mmalign.world.vqa``)."""

    split: Literal["train", "heldout"] = "train"
    n: int = Field(512, ge=1, description="how many questions")
    seed: int = Field(0, ge=0, description="seed of the scenes, questions and render jitter")
    kinds: list[str] | None = Field(None, description="question kinds (default: all seven)")
    jitter: float = Field(0.0, ge=0, le=1, description="render jitter of the images")
    size: int | None = Field(None, ge=8, description="render side in pixels (default 32)")
    frames: int | None = Field(None, ge=1, description="render each scene this many times into a video")
    balanced: bool = Field(False, description="each kind's gold answers in turn (no constant answer pays)")


class HubVQASource(StrictModel):
    """A ``datasets.load_dataset`` dataset (a hub id, or a builder such as ``parquet`` with ``data_files``)."""

    path: str = Field(description="hub id or builder name")
    name: str | None = Field(None, description="dataset configuration")
    data_files: str | list[str] | None = Field(None, description="local files for builders such as parquet/json")
    split: str = "train"
    question: str = Field("question", description="column with the question text")
    answer: str = Field("answer", description="column with the gold answer")
    image: str = Field("image", description="column with the image")
    limit: int | None = Field(None, ge=1, description="use the first rows only")


class DataSource(StrictModel):
    """``world: {...}`` or ``hub: {...}``, and an ``instruction`` appended to every question."""

    world: WorldVQASource | None = None
    hub: HubVQASource | None = None
    instruction: str | None = Field(None, description="text after each question, e.g. the answer format")

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.world is None) == (self.hub is None):
            raise ValueError("expected exactly one of `world: {...}` or `hub: {...}`")
        return self


class VQAReportConfig(StrictModel):
    data: DataSource = Field(
        default_factory=lambda: DataSource(world=WorldVQASource(split="heldout", n=200, seed=1)),
        description="evaluation rows (greedy answers before and after training)",
    )
    rewards: RewardSpecs = Field(default_factory=list, description="rewards reported besides the trained ones")
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(32, ge=1)


class AggregateConfig(StrictModel):
    """The rewards as one ensemble per completion instead of separate TRL reward functions."""

    mode: Literal["mean", "uwo", "wco"] = Field("uwo", description="mean, UWO (mean − λ·var) or WCO (min)")
    lam: float = Field(0.5, ge=0, description="UWO's variance penalty λ")
    standardize: bool = Field(True, description="running standardisation of each member first")
    momentum: float | None = Field(None, gt=0, le=1, description="EMA of the statistics; None pools all")


class VLMGRPOConfig(Recipe):
    """GRPO (and GDPO, DAPO, Dr. GRPO …) for a vision-language model on TRL's GRPOTrainer."""

    task: Literal["vlm_grpo"] = "vlm_grpo"
    model: str = Field("world", description="'world' (the shipped shapes VLM), a hub id or a folder")
    data: DataSource = Field(default_factory=lambda: DataSource(world=WorldVQASource(jitter=0.5)))
    rewards: RewardSpecs = Field(min_length=1, description="reward specs, each one TRL reward function (`weight`)")
    aggregate: AggregateConfig | None = Field(None, description="one UWO/WCO/mean ensemble of the rewards instead")
    image_size: int | None = Field(None, ge=1, description="resize images to this square size for the rewards")
    dynamic_sampling_rounds: int | None = Field(None, ge=1, description="DAPO: extra rounds replacing flat groups")
    ref_model: str | None = Field(None, description="reference policy folder / hub id (default: the policy's own)")
    lora: LoRAConfig | None = Field(None, description="LoRA settings; null = full fine-tuning")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the policy loads in")
    attn_implementation: str | None = Field(None, description="e.g. sdpa or flash_attention_2")
    grpo: dict[str, Any] = Field(default_factory=dict, description="trl.GRPOConfig keyword arguments")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    seed: int = Field(0, ge=0)
    output_dir: str = "runs/vlm-grpo"
    report: VQAReportConfig | None = Field(default_factory=VQAReportConfig, description="before/after evaluation")
    trackers: list[str] = Field(default_factory=list, description="TRL report_to (tensorboard, wandb, trackio)")

    @field_validator("grpo")
    @classmethod
    def _known_grpo_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Names must be GRPOConfig fields; numbers written as strings (YAML reads ``1e-4`` as one) become numbers."""
        from dataclasses import fields

        from trl import GRPOConfig

        valid = {f.name for f in fields(GRPOConfig) if f.init}
        hints = typing.get_type_hints(GRPOConfig)
        problems, out = [], {}
        for key, item in value.items():
            if key in _OWNED:
                problems.append(f"{key!r} is set by the recipe's `{_OWNED[key]}`")
            elif key not in valid:
                close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
                problems.append(f"{key!r} is not a trl.GRPOConfig field" + (f" (did you mean {close[0]!r}?)" if close else ""))
            else:
                numeric = [t for t in (typing.get_args(hints[key]) or (hints[key],)) if t in (int, float)]
                if isinstance(item, str) and numeric:
                    try:
                        item = TypeAdapter(hints[key]).validate_python(item)
                    except ValidationError:
                        problems.append(f"{key!r}: expected a number, got {item!r}")
            out[key] = item
        if problems:
            raise ValueError("; ".join(problems))
        return out

    @model_validator(mode="after")
    def _consistent(self) -> VLMGRPOConfig:
        grpo = self.grpo_kwargs()
        generations, batch = grpo["num_generations"], grpo["per_device_train_batch_size"]
        steps = grpo.get("steps_per_generation") or grpo.get("gradient_accumulation_steps", 1)
        if generations < 2:
            raise ValueError(f"grpo.num_generations: GRPO needs at least 2 completions per prompt, got {generations}")
        if self.dynamic_sampling_rounds is not None and (batch * steps) % generations:
            raise ValueError(
                f"dynamic_sampling_rounds: per_device_train_batch_size × steps_per_generation ({batch * steps}) "
                f"must be a multiple of num_generations ({generations}), so groups stay on one process"
            )
        if self.aggregate is not None and any(isinstance(s, dict) and "weight" in s for s in self.rewards):
            raise ValueError("rewards: `weight` has no meaning when `aggregate` makes them one ensemble")
        return self

    def grpo_kwargs(self) -> dict[str, Any]:
        """``grpo`` with mmalign's defaults for a small CPU run filled in (TRL's are for GPUs)."""
        cuda = torch.cuda.is_available()
        defaults = {
            "num_generations": 8,
            "per_device_train_batch_size": 8,
            "max_steps": 100,
            "learning_rate": 1e-5,
            "beta": 0.0,
            "logging_steps": 1,
            "save_strategy": "steps",
            "save_steps": 50,
            "save_total_limit": 2,
            "bf16": cuda,
            "use_cpu": not cuda,
            "gradient_checkpointing": False,
            "remove_unused_columns": False,
        }
        return {**defaults, **self.grpo}


def load_rows(source: DataSource, seed: int = 0) -> list[dict[str, Any]]:
    """VQA rows (``prompt``, ``image`` or ``video``, ``answer``, …) of a data source."""
    if source.world is not None:
        w = source.world
        rows = import_object(_WORLD_ROWS)
        return rows(w.n, w.split, w.seed, w.kinds, w.jitter, w.size, w.frames, source.instruction, w.balanced)
    from datasets import load_dataset

    hub = source.hub
    dataset = load_dataset(hub.path, hub.name, data_files=hub.data_files, split=hub.split)
    missing = [c for c in (hub.question, hub.answer, hub.image) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"data.hub: columns {missing} not in {hub.path!r}, which has {dataset.column_names}")
    if hub.limit is not None:
        dataset = dataset.select(range(min(hub.limit, len(dataset))))
    rows = []
    for row in dataset:
        question = str(row[hub.question])
        text = question if source.instruction is None else f"{question} {source.instruction}"
        rest = {k: v for k, v in row.items() if k not in (hub.question, hub.answer, hub.image)}
        rows.append({**rest, "prompt": [{"role": "user", "content": text}], "question": question,
                     "image": row[hub.image], "answer": row[hub.answer]})
    return rows


def _metrics_callback(run_dir: Path):
    from transformers import TrainerCallback

    class JsonlMetrics(TrainerCallback):
        """Every TRL log row to ``metrics.jsonl`` (main process), with its optimiser ``step`` (TRL's ``epoch`` is
        the fraction of the dataset seen)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "train_runtime" in logs:
                return
            append_metrics(run_dir, {**logs, "step": state.global_step})

    return JsonlMetrics()


def _merged_pairs_callback():
    """Adds ``advantages/merged_pairs`` to each log row: of the pairs of completions in a group whose reward
    combinations differ, the share whose advantages came out equal (``sampling.merged_pairs``), read from the
    rewards and advantages TRL keeps of the last generation batch. ``trainer`` is set once the trainer exists."""
    from transformers import TrainerCallback

    from mmalign.trainers.vlm_grpo.sampling import merged_pairs

    class MergedPairs(TrainerCallback):
        trainer = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            trainer = self.trainer
            if trainer is None or not logs or "train_runtime" in logs or not trainer._logs["advantages"]:
                return
            rewards = torch.tensor([list(trainer._logs["rewards"][n]) for n in trainer.reward_func_names]).T
            advantages = torch.tensor(list(trainer._logs["advantages"]))
            merged, distinct = merged_pairs(rewards, advantages, trainer.num_generations)
            logs["advantages/merged_pairs"] = merged / distinct if distinct else float("nan")

    return MergedPairs()


def _reward_state_callback(functions):
    """Saves the rewards' buffers (ensemble statistics) into each TRL checkpoint folder."""
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    class RewardState(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, f in enumerate(functions)
                       for k, v in f.reward.state_dict().items()}
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if tensors and state.is_world_process_zero and folder.is_dir():
                save_file(tensors, folder / "reward_state.safetensors")

    return RewardState()


class VLMGRPORecipeTrainer:
    """Runs a ``VLMGRPOConfig``: ``setup`` → ``train`` (resumes) → ``report`` → ``export``.

    ``model`` and ``processor`` replace loading ``config.model`` (e.g. a model built in memory for tests).
    """

    def __init__(self, config: VLMGRPOConfig, model=None, processor=None, progress: bool = True) -> None:
        self.config = config
        self._model, self._processor = model, processor
        self.progress = progress
        self.run_dir = Path(config.output_dir)
        self.before_answers: list[str] | None = None

    # ------------------------------------------------------------------------------------------ setup
    def load_policy(self):
        """``(model, processor)`` of ``config.model``; no remote code."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if self._model is not None:
            if self._processor is None:
                raise ValueError("processor: a model given in memory needs its processor too")
            return self._model, self._processor
        path = self.config.model
        if path in _MODEL_SOURCES:
            path = import_object(_MODEL_SOURCES[path])()
        kwargs: dict[str, Any] = {"dtype": getattr(torch, self.config.dtype)}
        if self.config.attn_implementation:
            kwargs["attn_implementation"] = self.config.attn_implementation
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs), AutoProcessor.from_pretrained(path)

    def setup(self) -> None:
        from datasets import Dataset
        from trl import GRPOConfig

        from mmalign.trainers.vlm_grpo.rewards import reward_functions
        from mmalign.trainers.vlm_grpo.trainer import VLMGRPOTrainer

        cfg = self.config
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        model, processor = self.load_policy()
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"  # TRL's prompts are left-padded; the processor's token types must agree
        aggregate = cfg.aggregate.model_dump() if cfg.aggregate else None
        self.functions, weights = reward_functions(cfg.rewards, aggregate, cfg.image_size)
        grpo = cfg.grpo_kwargs()
        grpo.setdefault("reward_weights", weights)
        grpo.setdefault("disable_tqdm", not self.progress)
        args = GRPOConfig(
            output_dir=str(self.run_dir / "checkpoints"), seed=cfg.seed, report_to=cfg.trackers or "none", **grpo
        )
        peft_config = None
        if cfg.lora is not None:
            peft_config = cfg.lora.peft(LM_TARGETS, task_type="CAUSAL_LM")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rows = load_rows(cfg.data)
        if cfg.report is not None:
            rows = self._without_report_rows(rows)
        dataset = Dataset.from_list(rows)
        merged = _merged_pairs_callback()
        self.trainer = VLMGRPOTrainer(
            model, list(self.functions), args, train_dataset=dataset, processing_class=processor,
            peft_config=peft_config, ref_model=cfg.ref_model, dynamic_sampling_rounds=cfg.dynamic_sampling_rounds,
            callbacks=[merged, _metrics_callback(self.run_dir), _reward_state_callback(self.functions)],
        )
        merged.trainer = self.trainer
        self.processor = processor
        if self.trainer.accelerator.is_main_process:
            write_config(self.run_dir, cfg)
        self._evaluate_before()

    def _without_report_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Training rows minus any that ask a report question about the same scene (world rows carry their
        scene), so the held-out numbers are never trained on; the count goes to the summary."""
        asked = {(r.get("question"), r.get("scene")) for r in self._report_rows() if r.get("scene") is not None}
        kept = [r for r in rows if (r.get("question"), r.get("scene")) not in asked]
        self.dropped_as_report = len(rows) - len(kept)
        if not kept:
            raise ValueError("data: every training row is also a report row; use another seed or split")
        return kept

    def _report_rows(self) -> list[dict[str, Any]]:
        if not hasattr(self, "_rows"):
            self._rows = load_rows(self.config.report.data)
        return self._rows

    def _report_functions(self):
        from mmalign.trainers.vlm_grpo.rewards import reward_functions

        extra = reward_functions(self.config.report.rewards)[0] if self.config.report.rewards else []
        for function in extra:
            function.to(self.trainer.accelerator.device)
        return [*self.functions, *extra]

    def _answers(self) -> list[str]:
        from mmalign.trainers.vlm_grpo.evaluate import generate_answers

        report = self.config.report
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return generate_answers(model, self.processor, self._report_rows(), report.batch_size, report.max_new_tokens,
                                progress=self.progress)

    def _evaluate_before(self) -> None:
        """The untrained policy's answers to the report rows, once per run folder (greedy: deterministic)."""
        path = self.run_dir / "before.json"
        if self.config.report is None or not self.trainer.accelerator.is_main_process:
            return
        if path.is_file():
            self.before_answers = json.loads(path.read_text())["answers"]
        elif self._last_checkpoint() is None:
            self.before_answers = self._answers()
            write_text_atomic(path, json.dumps({"answers": self.before_answers}, indent=1) + "\n")

    def _last_checkpoint(self) -> str | None:
        from transformers.trainer_utils import get_last_checkpoint

        folder = self.run_dir / "checkpoints"
        return get_last_checkpoint(str(folder)) if folder.is_dir() else None

    # ------------------------------------------------------------------------------------------ train
    def train(self) -> dict[str, Any]:
        if not hasattr(self, "trainer"):
            self.setup()
        checkpoint = self._last_checkpoint()
        if checkpoint is not None:
            self._load_reward_state(Path(checkpoint))
            if self.progress and self.trainer.accelerator.is_main_process:
                print(f"resuming from {checkpoint}")
        output = self.trainer.train(resume_from_checkpoint=checkpoint)
        self.train_metrics = dict(output.metrics)
        return self.train_metrics

    def _load_reward_state(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        path = checkpoint / "reward_state.safetensors"
        if not path.is_file():
            return
        tensors = load_file(path)
        for i, function in enumerate(self.functions):
            state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
            if state:
                function.reward.load_state_dict(state)

    # ----------------------------------------------------------------------------------------- report
    def report(self) -> dict[str, Any] | None:
        """Greedy answers on the report rows after training against those before: ``summary.json``,
        ``curves.png`` and ``grid.png`` in the run folder (main process; None elsewhere or without a report)."""
        from mmalign.eval.report import write_report
        from mmalign.trainers.vlm_grpo.evaluate import kind_changes, score_answers

        cfg = self.config
        if cfg.report is None or not self.trainer.accelerator.is_main_process or self.before_answers is None:
            return None
        rows, functions = self._report_rows(), self._report_functions()
        before = score_answers(rows, self.before_answers, functions)
        after_answers = self._answers()
        after = score_answers(rows, after_answers, functions)
        write_text_atomic(self.run_dir / "after.json", json.dumps({"answers": after_answers}, indent=1) + "\n")
        names = [f.__name__ for f in self.functions]
        keys = ["reward", *(f"rewards/{n}" for n in names), "kl", "completions/mean_length",
                "frac_reward_zero_std", "advantages/merged_pairs", "dynamic_sampling/zero_spread_groups"]
        extra = {
            "model": cfg.model, "steps": self.trainer.state.global_step, "report_rows": len(rows),
            "train_rows_dropped_as_report_rows": getattr(self, "dropped_as_report", 0),
            "train": getattr(self, "train_metrics", {}),
            "grpo": {k: v for k, v in cfg.grpo_kwargs().items() if isinstance(v, (int, float, str, bool, type(None)))},
        }
        kinds = [k for k in dict.fromkeys(r.get("kind") for r in rows) if k is not None]
        if kinds:
            extra["by_kind"] = kind_changes(before, after, names[0], kinds)
        return write_report(self.run_dir, before, after, keys, extra, x="step")

    def export(self) -> Path:
        """The trained weights: the LoRA adapter (``lora/``) or the whole model (``model/``), with the processor,
        written atomically (a folder that exists is complete)."""
        self.trainer.accelerator.wait_for_everyone()
        out = self.run_dir / ("lora" if self.config.lora is not None else "model")
        if self.trainer.accelerator.is_main_process:
            model = self.trainer.accelerator.unwrap_model(self.trainer.model)

            def write(tmp: Path) -> None:
                model.save_pretrained(tmp)
                self.processor.save_pretrained(tmp)

            write_atomic(out, write)
        return out

    def cleanup(self) -> None:
        """Close TRL's trackers and process groups."""
        self.trainer.accelerator.end_training()
