"""``VLMGRPOTrainer``: TRL's ``GRPOTrainer`` with what it lacks for VLM alignment, each off unless asked for.

- **An explicit reference model** (``ref_model=``): TRL rebuilds the reference from the policy's hub id or
  folder, which a model built in memory does not have; when ``beta > 0`` and the policy has neither, a frozen
  copy of it is made before training starts.
- **Dynamic sampling** (``dynamic_sampling_rounds=``, DAPO): groups whose rewards have zero spread (see
  ``sampling.signal_groups``) are dropped and replaced by groups of fresh prompts drawn from the training
  set, for at most that many extra rounds; what is still missing then is filled with flat groups, so the
  batch keeps its size. The final batch then goes through TRL's own scoring path unchanged (its completions
  and rewards replayed), so advantages, GDPO's batch normalisation and log-probs are TRL's.
- **Video inputs** for the Qwen2-VL family: a ``video`` column (a list of frames per row) becomes a video
  part of the user turn; the processor's ``pixel_values_videos`` and ``video_grid_thw`` go to generation and
  to every log-prob forward pass, per sample, so TRL's shuffling and splitting of a generation batch keep
  them with their rows.
- mmalign rewards: ``RewardFunction`` adapters are moved to the trainer's device and told the group size.
- **Resuming a full fine-tune** loads the checkpoint's weights through the model's own weight conversions, every
  one of them or an error (``load_checkpoint_weights``): ``Trainer`` would skip those whose names differ.
- **A clean exit** under ``accelerate launch``: the process group TRL's arguments start is destroyed when the
  interpreter exits (see ``mmalign.trainers.distributed``), so gloo's threads cannot abort the process.

Everything else (losses, ``scale_rewards``, ``multi_objective_aggregation``, PEFT, vLLM, logging, checkpoints)
is TRL's.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather, is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model, get_config_model_id

from mmalign.trainers.distributed import destroy_process_group_at_exit
from mmalign.trainers.run import seeded_generator
from mmalign.trainers.vlm_grpo.rewards import RewardFunction
from mmalign.trainers.vlm_grpo.sampling import signal_groups

__all__ = ["VLMGRPOTrainer", "frozen_copy", "load_checkpoint_weights"]

_VIDEO_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in eval mode with no parameter gradients: a reference policy."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def load_checkpoint_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Loads the weights ``model.save_pretrained(folder)`` wrote back into ``model``, in place.

    ``save_pretrained`` writes the hub's layout: it reverts the model's weight conversions (Qwen2-VL's
    ``model.language_model.*`` and ``model.visual.*`` are saved as ``model.*`` and ``visual.*``). ``from_pretrained``
    applies them again; ``Trainer`` resumes with ``load_state_dict(strict=False)``, which skips every renamed weight
    with a log line (transformers issue #43701). Here the checkpoint's keys go through the same conversions
    (``get_model_conversion_mapping``: renamings, then converters) and every weight of the model must come back,
    tied copies aside, with nothing left over.
    """
    from safetensors.torch import load_file
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SAFE_WEIGHTS_NAME]
    absent = [name for name in files if not (folder / name).is_file()]
    if absent:
        raise FileNotFoundError(
            f"resume_from_checkpoint: {folder} has no {', '.join(absent)}; expected the weights save_pretrained writes "
            f"({SAFE_WEIGHTS_NAME}, or {SAFE_WEIGHTS_INDEX_NAME} and its shards)"
        )
    saved: dict[str, torch.Tensor] = {}
    for name in files:
        saved.update(load_file(folder / name))

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    own = model.state_dict()
    weights: dict[str, torch.Tensor] = {}
    pending: dict[str, WeightConverter] = {}
    for key in sorted(saved, key=dot_natural_key):  # converters that stack lists need them in order
        renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, own)
        if pattern is None:
            weights[renamed] = saved[key]
        else:
            pending.setdefault(renamed, copy.deepcopy(by_pattern[pattern])).add_tensor(renamed, key, pattern, saved[key])
    for first, converter in pending.items():
        for name, value in converter.convert(first, model=model, config=model.config).items():
            weights[name] = value[0] if isinstance(value, list) else value

    missing = sorted(set(own) - set(weights) - set(model.all_tied_weights_keys))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"resume_from_checkpoint: {folder} does not hold this model's weights after its weight conversions: "
            f"{len(missing)} of the model's missing {missing[:3]}, {len(unexpected)} not in the model {unexpected[:3]}"
        )
    model.load_state_dict(weights, strict=False)  # only tied copies are left out, and they share the tensors


@dataclass
class _Row:
    """One completion of the dynamic-sampling search: its dataset row, generation outputs and rewards."""

    row: dict[str, Any]
    prompt_ids: list[int]
    completion_ids: list[int]
    completion: Any
    logprobs: list[float] | None
    images: list | None
    rewards: torch.Tensor  # (K,)


@dataclass
class _Replay:
    """The rows the final batch is made of, replayed to TRL's ``_generate`` and ``_calculate_rewards``."""

    rows: list[_Row] = field(default_factory=list)

    def generation(self) -> tuple:
        rows = self.rows
        logprobs = None if any(r.logprobs is None for r in rows) else [r.logprobs for r in rows]
        images = None if all(r.images is None for r in rows) else [r.images for r in rows]
        return (
            [r.prompt_ids for r in rows], [r.completion_ids for r in rows], None, [r.completion for r in rows],
            logprobs, {}, images, [],
        )


def _video_of(prompt: Any) -> Any | None:
    """The payload of the (single) video part of a conversational prompt, or None."""
    if isinstance(prompt, str):
        return None
    found = [
        part["video"] for message in prompt if isinstance(message.get("content"), list)
        for part in message["content"] if part.get("type") == "video" and "video" in part
    ]
    if len(found) > 1:
        raise ValueError(f"video: expected at most one video per prompt, got {len(found)}")
    return found[0] if found else None


def _strip_video(prompt: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prompt with video payloads removed (the chat template only needs the placeholder)."""
    out = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "video"} if part.get("type") == "video" else part for part in content]
        out.append({**message, "content": content})
    return out


def with_video_part(row: Mapping[str, Any]) -> dict[str, Any]:
    """A dataset row whose ``video`` column (frames) is put into its prompt's first user turn."""
    if "image" in row or "images" in row:
        raise ValueError("video: a row with a 'video' column cannot also have 'image' or 'images'")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        raise ValueError("prompt: video rows need conversational prompts ([{'role': 'user', 'content': ...}]), got a string")
    video, messages, placed = row["video"], [], False
    for message in prompt:
        content = message.get("content")
        if message.get("role") == "user" and not placed:
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
            slots = [i for i, part in enumerate(parts) if part.get("type") == "video"]
            if slots:
                parts[slots[0]] = {"type": "video", "video": video}
            else:
                parts.insert(0, {"type": "video", "video": video})
            message, placed = {**message, "content": parts}, True
        messages.append(message)
    if not placed:
        raise ValueError("prompt: a video row needs a user turn to put the video in")
    return {**row, "prompt": messages}


class VLMGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` plus an explicit reference model, DAPO dynamic sampling and video inputs.

    Args (besides ``GRPOTrainer``'s):
        ref_model: the reference policy for the KL term (needs ``args.beta > 0``); a model or a folder / hub id.
            None: TRL's default, or a frozen copy of an in-memory policy that has no folder to reload.
        dynamic_sampling_rounds: None (off), or the most extra generation rounds per batch that replace
            groups with zero reward spread. Needs a map-style ``train_dataset`` and whole groups on each
            process (``per_device_train_batch_size × steps_per_generation`` divisible by ``num_generations``).
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        ref_model=None,
        dynamic_sampling_rounds: int | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            raise ValueError("args: expected a trl.GRPOConfig (output_dir, batch sizes, num_generations), got None")
        destroy_process_group_at_exit()
        self._check_dynamic_sampling(dynamic_sampling_rounds, args, train_dataset, kwargs)
        ref = self._reference(model, ref_model, args, peft_config)
        beta, sync = args.beta, args.sync_ref_model
        if ref is not None:  # keep TRL from building its own reference from a hub id the model may not have
            args.beta, args.sync_ref_model = 0.0, False
        try:
            super().__init__(
                model, reward_funcs, args, train_dataset, eval_dataset, processing_class, reward_processing_classes,
                callbacks, optimizers, peft_config=peft_config, **kwargs,
            )
        finally:
            args.beta, args.sync_ref_model = beta, sync
        if ref is not None:
            self.beta = beta
            self.ref_model = self._prepare_reference(ref)
            if sync:
                from trl.trainer.callbacks import SyncRefModelCallback

                self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        self.dynamic_sampling_rounds = dynamic_sampling_rounds
        self._replay: _Replay | None = None
        self._video: list[dict[str, torch.Tensor]] | None = None
        self._refills = 0
        for func in self.reward_funcs:
            if isinstance(func, RewardFunction):
                if func.device is None:
                    func.to(self.accelerator.device)
                func.group_size = self.num_generations

    # ------------------------------------------------------------------------------------- reference
    @staticmethod
    def _reference(model, ref_model, args: GRPOConfig, peft_config) -> torch.nn.Module | None:
        if ref_model is not None:
            if args.beta == 0.0:
                raise ValueError("ref_model: a reference model was given but args.beta is 0.0, so it would never be used")
            if isinstance(ref_model, str):
                from trl.trainer.utils import create_model_from_path

                ref_model = create_model_from_path(ref_model, **dict(args.model_init_kwargs or {}))
            if not isinstance(ref_model, torch.nn.Module):
                raise TypeError(f"ref_model: expected a model, a folder or a hub id, got {type(ref_model).__name__}")
            return frozen_copy(ref_model) if ref_model is model else ref_model.requires_grad_(False).eval()
        in_memory = not isinstance(model, str) and not get_config_model_id(model.config)
        if args.beta != 0.0 and in_memory and peft_config is None and not is_peft_model(model):
            return frozen_copy(model)
        return None

    def _prepare_reference(self, ref: torch.nn.Module) -> torch.nn.Module:
        """What TRL does to the reference it builds: no dropout, the fused log-prob head, device placement."""
        if self.args.cast_lm_head_to_fp32:
            raise ValueError("ref_model: cast_lm_head_to_fp32 is not supported with an explicit reference model")
        if self.args.sync_ref_model and is_peft_model(self.model):
            raise NotImplementedError("sync_ref_model: not supported with a PEFT policy (its reference is the base model)")
        if self.args.disable_dropout:
            disable_dropout_in_model(ref)
        add_fused_lm_head(ref, temperature=self.temperature)
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(ref, self.accelerator)
        if self.is_fsdp_enabled:
            from trl.models import prepare_fsdp

            return prepare_fsdp(ref, self.accelerator)
        return self.accelerator.prepare_model(ref, evaluation_mode=True)

    # ------------------------------------------------------------------------------------- resuming
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """A full fine-tune's weights through ``load_checkpoint_weights``; adapters and FSDP as ``Trainer`` does."""
        model = self.model if model is None else model
        if is_peft_model(model) or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_checkpoint_weights(model, resume_from_checkpoint)

    # ------------------------------------------------------------------------------ dynamic sampling
    @staticmethod
    def _check_dynamic_sampling(rounds, args: GRPOConfig, train_dataset, kwargs: Mapping[str, Any]) -> None:
        if rounds is None:
            return
        if not (isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 1):
            raise ValueError(f"dynamic_sampling_rounds: expected None (off) or an int >= 1, got {rounds!r}")
        local = args.per_device_train_batch_size * args.steps_per_generation
        if local % args.num_generations:
            raise ValueError(
                f"dynamic_sampling_rounds: needs whole prompt groups on each process, but per_device_train_batch_size "
                f"× steps_per_generation = {local} is not divisible by num_generations = {args.num_generations}"
            )
        from datasets import Dataset

        if not isinstance(train_dataset, Dataset):
            raise ValueError(
                f"dynamic_sampling_rounds: refills draw rows by index from a map-style datasets.Dataset, "
                f"got train_dataset of type {type(train_dataset).__name__}"
            )
        used = [k for k in ("tools", "rollout_func", "environment_factory") if kwargs.get(k)]
        if used:
            raise ValueError(f"dynamic_sampling_rounds: not supported together with {', '.join(used)}")

    def _prepared_prompts(self, inputs: Sequence[Mapping[str, Any]]) -> list:
        """The prompts TRL's ``_generate_and_score_completions`` builds from dataset rows (images put in)."""
        prompts = [x["prompt"] for x in inputs]
        if "images" in inputs[0]:
            images = [x.get("images") for x in inputs]
        elif "image" in inputs[0]:
            images = [[x["image"]] if x.get("image") is not None else None for x in inputs]
        else:
            images = None
        if images is not None and all(i == [] for i in images):
            images = None
        if images is not None:
            prompts = [prepare_multimodal_messages(p, images=i) for p, i in zip(prompts, images)]
        return prompts

    def _refill_rows(self, n: int, round_: int) -> list[dict[str, Any]]:
        """``n // G`` fresh prompts of the training set for this process, each repeated ``G`` times."""
        g, processes = self.num_generations, self.accelerator.num_processes
        self._refills += 1
        generator = seeded_generator(self.args.seed, self.state.global_step, self._refills, round_)
        picks = torch.randint(len(self.train_dataset), (processes * (n // g),), generator=generator).tolist()
        mine = picks[self.accelerator.process_index * (n // g) : (self.accelerator.process_index + 1) * (n // g)]
        rows = []
        for index in mine:
            row = self.train_dataset[int(index)]
            row = with_video_part(row) if "video" in row else row
            rows += [dict(row) for _ in range(g)]
        return rows

    def _dynamic_sample(self, inputs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], _Replay]:
        """Generate and score; keep groups with reward spread; refill; return the final rows and their replay."""
        g, n = self.num_generations, len(inputs)
        if n % g:
            raise RuntimeError(f"dynamic sampling: a local generation batch of {n} rows does not hold whole groups of {g}")
        need, index = n // g, self.accelerator.process_index
        kept: list[list[_Row]] = []
        flat: list[list[_Row]] = []
        candidates, rounds, seen, dropped = inputs, 0, 0, 0
        while True:
            prompts = self._prepared_prompts(candidates)
            prompt_ids, completion_ids, _, completions, logprobs, _, images, _ = GRPOTrainer._generate(self, prompts)
            rewards = GRPOTrainer._calculate_rewards(self, candidates, prompts, completions, completion_ids)
            local = rewards[index * n : (index + 1) * n].detach().cpu()
            signal = signal_groups(local, self.reward_weights, g, self.multi_objective_aggregation)
            for k in range(n // g):
                group = [
                    _Row(candidates[i], list(prompt_ids[i]), list(completion_ids[i]), completions[i],
                         None if logprobs is None else logprobs[i], None if images is None else images[i], local[i])
                    for i in range(k * g, (k + 1) * g)
                ]
                if not signal[k]:
                    flat.append(group)
                elif len(kept) < need:
                    kept.append(group)
            rounds, seen, dropped = rounds + 1, seen + n // g, dropped + int((~signal).sum())
            missing = torch.tensor([need - len(kept)], device=self.accelerator.device)
            if int(gather(missing).max()) == 0 or rounds > self.dynamic_sampling_rounds:
                break
            candidates = self._refill_rows(n, rounds)
        filled = need - len(kept)
        kept += flat[len(flat) - filled :] if filled else []  # the most recent flat groups
        stats = torch.tensor([rounds, dropped / seen, filled / need], device=self.accelerator.device)
        rounds_mean, dropped_share, filled_share = gather(stats).view(-1, 3).mean(0).tolist()
        metrics = self._metrics["train"]
        metrics["dynamic_sampling/rounds"].append(rounds_mean)
        metrics["dynamic_sampling/zero_spread_groups"].append(dropped_share)
        metrics["dynamic_sampling/flat_groups_kept"].append(filled_share)
        rows = [r for group in kept for r in group]
        return [r.row for r in rows], _Replay(rows)

    # ---------------------------------------------------------------------------------------- hooks
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        if inputs and "video" in inputs[0]:
            inputs = [with_video_part(x) for x in inputs]
        if self.dynamic_sampling_rounds and self.model.training:
            inputs, self._replay = self._dynamic_sample(inputs)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._replay = None
        if self._video is not None:
            output["video_inputs"] = self._video  # one dict per row: shuffled and split with the rows
            self._video = None
        return output

    def _generate(self, prompts: list):
        if self._replay is None:
            return super()._generate(prompts)
        if _video_of(prompts[0]) is not None:
            self._tokenize_prompts(prompts)  # the video inputs of the replayed rows
        return self._replay.generation()

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self._replay is None:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        local = torch.stack([r.rewards for r in self._replay.rows]).to(self.accelerator.device)
        return gather(local)

    # ------------------------------------------------------------------------------------------- video
    def _tokenize_prompts(self, prompts: list):
        videos = [_video_of(p) for p in prompts]
        if all(v is None for v in videos):
            return super()._tokenize_prompts(prompts)
        if any(v is None for v in videos):
            raise ValueError("video: a batch mixes rows with and without a video; give every row a 'video' column")
        if self.tools or self.environment_factories is not None:
            raise ValueError("video: inputs are not supported together with tools or environments")
        texts = self.processing_class.apply_chat_template(
            [_strip_video(p) for p in prompts], tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
        )
        prompt_ids, token_types, per_row = [], [], []
        for text, video in zip(texts, videos):
            encoded = self.processing_class(text=[text], videos=[video], return_tensors="pt")
            prompt_ids.append(encoded["input_ids"][0].tolist())
            if "mm_token_type_ids" in encoded:
                token_types.append(encoded["mm_token_type_ids"][0].tolist())
            per_row.append({k: torch.as_tensor(v) for k, v in encoded.items() if k not in _VIDEO_TEXT_KEYS})
        self._video = per_row
        fields: dict[str, Any] = {k: torch.cat([r[k] for r in per_row]) for k in per_row[0]}
        if token_types:
            fields["mm_token_type_ids"] = token_types
        return prompt_ids, None, fields

    def _compute_loss(self, model, inputs):
        self._video = inputs.get("video_inputs")
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._video = None

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):
        if self._video is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal,
            )
        rows = self._video
        if len(rows) != input_ids.size(0):
            raise RuntimeError(f"video: {len(rows)} rows of video inputs for a batch of {input_ids.size(0)}")
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            ids, mask = input_ids[start:end], attention_mask[start:end]
            inputs = {"input_ids": ids, "attention_mask": mask}
            for key in rows[0]:
                inputs[key] = torch.cat([r[key] for r in rows[start:end]]).to(ids.device)
            token_types = torch.zeros_like(ids)
            if self._video_pad_token_id is not None:
                token_types[ids == self._video_pad_token_id] = 2
            inputs["mm_token_type_ids"] = token_types
            if compute_aux_loss:
                inputs["output_router_logits"] = True
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100
            with self.accelerator.autocast():
                outputs = model(**inputs, labels=labels, fused_lm_head=True)
            logps.append(outputs.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(outputs.entropy[:, -logits_to_keep:])
            if compute_aux_loss:
                aux.append(outputs.aux_loss)
        return (
            torch.cat(logps),
            torch.cat(entropies) if compute_entropy else None,
            torch.stack(aux).mean() if compute_aux_loss else None,
        )
