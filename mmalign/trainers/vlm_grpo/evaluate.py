"""Greedy answers of a VLM on VQA rows, scored by reward functions: the before/after numbers of a GRPO run.

Rows are those of the training dataset (``prompt``, ``image`` / ``images`` / ``video``, gold columns); the
prompt is rendered the way ``VLMGRPOTrainer`` renders it for generation, so evaluation asks exactly what
training asked. Results come as ``GeneratorEval`` (per-sample score columns with 95% CIs), so the report is
the one the diffusion trainers write; ``kind_changes`` adds what a headline mean hides: the paired change of
every question kind, and which kinds rose and which fell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from mmalign.eval.generator import GeneratorEval, mean_ci
from mmalign.media import MediaBatch
from mmalign.trainers.vlm_grpo.rewards import RewardFunction

__all__ = ["evaluate_rows", "generate_answers", "kind_changes", "score_answers"]


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


def _verdict(change: Mapping[str, float]) -> str:
    """``rose`` / ``fell`` when the paired 95% CI excludes zero, else ``within noise``."""
    if change["ci_low"] > 0:
        return "rose"
    return "fell" if change["ci_high"] < 0 else "within noise"


def _change_text(change: Mapping[str, float]) -> str:
    return f"{change['mean']:+.3f} [{change['ci_low']:+.3f}, {change['ci_high']:+.3f}]"


def kind_changes(before: GeneratorEval, after: GeneratorEval, name: str, kinds: Sequence[str]) -> dict[str, Any]:
    """The paired change of reward ``name`` over all rows and per kind (the ``name/<kind>`` columns of
    ``score_answers``), each with its verdict, the kinds that ``rose`` and ``fell``, and a ``text`` line.

    Kinds are called rose / fell only when the 95% CI of the per-question differences excludes zero: a headline
    gain can hide kinds the training pushed down, and those are the ones to read.
    """
    missing = [k for k in (name, *(f"{name}/{kind}" for kind in kinds)) if k not in before.scores or k not in after.scores]
    if missing:
        raise ValueError(f"kinds: no score columns {missing} in both evaluations (have {sorted(before.scores)})")

    def entry(key: str) -> dict[str, Any]:
        b, a = before.scores[key], after.scores[key]
        change = mean_ci(a - b)
        return {"before": mean_ci(b)["mean"], "after": mean_ci(a)["mean"], "paired_change": change,
                "verdict": _verdict(change)}

    overall, per_kind = entry(name), {kind: entry(f"{name}/{kind}") for kind in kinds}
    grouped = {v: [k for k, e in per_kind.items() if e["verdict"] == v] for v in ("rose", "fell", "within noise")}
    parts = [f"{name} {overall['before']:.3f} -> {overall['after']:.3f}, paired change "
             f"{_change_text(overall['paired_change'])} ({overall['verdict']})"]
    for verdict, listed in grouped.items():
        parts.append(f"{verdict}: " + (", ".join(f"{k} {_change_text(per_kind[k]['paired_change'])}" for k in listed)
                                       or "none"))
    return {"reward": name, "overall": overall, "kinds": per_kind, "rose": grouped["rose"], "fell": grouped["fell"],
            "within_noise": grouped["within noise"], "text": "; ".join(parts)}
