"""Greedy answers of a VLM on VQA rows, scored by reward functions: the before/after numbers of a GRPO run.

Rows are those of the training dataset (``prompt``, ``image`` / ``images`` / ``video``, gold columns); the
prompt is rendered the way ``VLMGRPOTrainer`` renders it for generation, so evaluation asks exactly what
training asked. Results come as ``GeneratorEval`` (per-sample score columns with 95% CIs), so the report is
the one the diffusion trainers write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from mmalign.eval.generator import GeneratorEval
from mmalign.media import MediaBatch
from mmalign.trainers.vlm_grpo.rewards import RewardFunction

__all__ = ["evaluate_rows", "generate_answers", "score_answers"]


def _processor_inputs(processor, rows: Sequence[Mapping[str, Any]]) -> dict:
    from trl.data_utils import prepare_multimodal_messages

    from mmalign.trainers.vlm_grpo.trainer import _strip_video, with_video_part

    if "video" in rows[0]:
        prompts = [_strip_video(with_video_part(r)["prompt"]) for r in rows]
        media = {"videos": [r["video"] for r in rows]}
    elif "image" in rows[0] or "images" in rows[0]:
        images = [r["images"] if "images" in r else [r["image"]] for r in rows]
        prompts = [prepare_multimodal_messages(r["prompt"], images=i) for r, i in zip(rows, images)]
        media = {"images": images}
    else:
        prompts, media = [r["prompt"] for r in rows], {}
    texts = processor.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
    return processor(text=texts, padding=True, return_tensors="pt", **media)


@torch.no_grad()
def generate_answers(
    model, processor, rows: Sequence[Mapping[str, Any]], batch_size: int = 32, max_new_tokens: int = 32,
    progress: bool = False,
) -> list[str]:
    """Greedy completions (special tokens removed), one per row; batches are left-padded."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    tokenizer = getattr(processor, "tokenizer", processor)
    side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(rows), batch_size), desc="answers", disable=not progress):
            inputs = _processor_inputs(processor, rows[start : start + batch_size]).to(device)
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def score_answers(
    rows: Sequence[Mapping[str, Any]], answers: Sequence[str], functions: Sequence[RewardFunction], by: str | None = "kind"
) -> GeneratorEval:
    """Score ``answers`` with each reward function: columns ``name`` and ``name/component``, and for the first
    function ``name/<value of by>`` per value of the ``by`` column (NaN for the other rows)."""
    if len(rows) != len(answers):
        raise ValueError(f"answers: expected one per row ({len(rows)}), got {len(answers)}")
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}
    prompts = [r["prompt"] for r in rows]
    scores: dict[str, torch.Tensor] = {}
    batch = None
    for i, function in enumerate(functions):
        batch = function.media_batch(prompts, list(answers), columns)
        with torch.no_grad():
            out = function.reward(batch)
        values = out.scores.detach().float().cpu()
        scores[function.__name__] = values
        scores.update({f"{function.__name__}/{k}": v.detach().float().cpu() for k, v in out.components.items()})
        if i == 0 and by and by in columns:
            for value in dict.fromkeys(columns[by]):
                mask = torch.tensor([v == value for v in columns[by]])
                scores[f"{function.__name__}/{value}"] = torch.where(mask, values, torch.nan)
    shown = batch.pixels[:, 0] if batch is not None and batch.is_video else batch.pixels
    labels = [f"{r.get('question', '')} → {a.strip()}" for r, a in zip(rows, answers)]
    return GeneratorEval(MediaBatch(shown.detach().float().cpu().clamp(0, 1), labels, batch.metadata), scores)


def evaluate_rows(
    model, processor, rows: Sequence[Mapping[str, Any]], functions: Sequence[RewardFunction], batch_size: int = 32,
    max_new_tokens: int = 32, progress: bool = False,
) -> tuple[GeneratorEval, list[str]]:
    """``score_answers`` of ``generate_answers``; also returns the answers."""
    answers = generate_answers(model, processor, rows, batch_size, max_new_tokens, progress)
    return score_answers(rows, answers, functions), answers
