"""The world's VLM: a tiny Qwen2-VL that answers questions about shapes-world images, and judges them.

It is the policy of VLM GRPO and the judge of VLM-judge rewards when no real checkpoint can be had. The
model, processor, tokenizer class, chat markup and special tokens are Qwen2-VL's own, only small: 32-pixel
images in 4-pixel patches, merged 2 x 2 into 16 image tokens. ``AutoProcessor`` and
``AutoModelForImageTextToText`` load the shipped folder offline; nothing here is needed to use it.

``build_vlm`` trains it from scratch by supervised fine-tuning on ``question_set`` answers and stops early
on purpose: held-out answers are right about half the time, so GRPO has room to improve them, while its
yes/no judgements ("Does this image show …?") already separate matching from mismatched prompts.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mmalign.eval.agreement import auroc
from mmalign.world.captions import prompt_set
from mmalign.world.questions import (
    CAPTION,
    IMAGE_SIZE,
    JUDGE_TEMPLATE,
    KINDS,
    Question,
    make_question,
    question_set,
    score,
)
from mmalign.world.render import render
from mmalign.world.scenes import sample_scenes
from mmalign.world.verify import verify_batch
from mmalign.world.vlm_tokenizer import build_tokenizer

__all__ = [
    "VLMRecipe",
    "answer",
    "build_processor",
    "build_vlm",
    "evaluate_vlm",
    "judge_auroc",
    "load_vlm",
    "sft_batch",
    "sft_loss",
    "vlm_config",
    "vlm_path",
    "yes_probability",
]

VLM_DIR = Path(__file__).resolve().parent / "assets" / "vlm"
REPORT = "build_report.json"


@dataclass(frozen=True)
class VLMRecipe:
    """Architecture and SFT schedule of the shipped VLM (the build's fixed seed lives in ``build_vlm``)."""

    hidden_size: int = 128  # text width; the vision merger projects to it
    layers: int = 4
    heads: int = 4  # head dim 32: mrope sections [4, 6, 6] cover its 16 frequencies
    kv_heads: int = 2  # grouped-query attention, as in Qwen2-VL
    intermediate_size: int = 256
    vision_dim: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    patch_size: int = 4  # 32 px / 4 = 8 x 8 patches, merged 2 x 2 into 16 image tokens
    questions: int = 12_000  # training questions of every kind but yes/no, plus captions; one render each
    pairs: int = 6_000  # training scenes asked one yes and one no judge question, about the same render
    jitter: float = 0.5
    steps: int = 3000
    batch: int = 32
    pair_share: float = 0.5  # of each batch, given to yes/no pairs
    lr: float = 5e-4
    warmup: int = 100
    eval_questions: int = 350  # held-out questions, 50 per kind
    judge_prompts: int = 200


def vlm_config(tokenizer, recipe: VLMRecipe = VLMRecipe()):
    """A ``Qwen2VLConfig`` sized by ``recipe`` whose token ids are ``tokenizer``'s.

    The vocabulary is rounded up to a multiple of 64, as Qwen's checkpoints are (151,936 rows for 151,665
    tokens), so code that assumes ``len(tokenizer) == vocab_size`` fails here as it would on the real ones.
    """
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    # M-RoPE gives the head's rotary frequencies to (time, height, width) as 1 : 1.5 : 1.5, as Qwen2-VL's
    # [16, 24, 24] does for head dim 128.
    half = recipe.hidden_size // recipe.heads // 2
    time_freqs = half // 4
    height_freqs = (half - time_freqs) // 2
    return Qwen2VLConfig(
        text_config={
            "vocab_size": -(-len(tokenizer) // 64) * 64,
            "hidden_size": recipe.hidden_size,
            "intermediate_size": recipe.intermediate_size,
            "num_hidden_layers": recipe.layers,
            "num_attention_heads": recipe.heads,
            "num_key_value_heads": recipe.kv_heads,
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10_000.0,
                "mrope_section": [time_freqs, height_freqs, half - time_freqs - height_freqs],
            },
        },
        vision_config={
            "depth": recipe.vision_depth,
            "embed_dim": recipe.vision_dim,
            "num_heads": recipe.vision_heads,
            "hidden_size": recipe.hidden_size,
            "mlp_ratio": 4,
            "patch_size": recipe.patch_size,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_processor(tokenizer, patch_size: int = 4):
    """``Qwen2VLProcessor`` that turns any image into ``IMAGE_SIZE``² pixels (video frames likewise)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pixels = {"shortest_edge": IMAGE_SIZE**2, "longest_edge": IMAGE_SIZE**2}
    grid = {"patch_size": patch_size, "temporal_patch_size": 2, "merge_size": 2}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, **grid),
        video_processor=Qwen2VLVideoProcessor(size=pixels, cap_pixels_per_frame=True, **grid),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def vlm_path() -> str:
    """Folder of the shipped VLM (config, safetensors, tokenizer, processor and chat template)."""
    if not (VLM_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"{VLM_DIR} holds no config.json: the shipped vlm is missing; rebuild it with "
            "`mmalign world build --only vlm`"
        )
    return str(VLM_DIR)


def load_vlm(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path: str | None = None):
    """``(model, processor)`` of the shipped (or ``path``'s) VLM through the auto classes, in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = path or vlm_path()
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device).eval()
    return model, AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------------------- inference
def _chat(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _uint8(images) -> list:
    """Images as the processor takes them: float ``(B, 3, H, W)`` in [0, 1] become uint8 (PIL passes through)."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected a (B, 3, H, W) tensor, got {tuple(images.shape)}")
        if images.is_floating_point():
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return list(images.cpu())
    return list(images)


def _inputs(processor, images, texts: Sequence[str], device) -> dict:
    images = _uint8(images)
    if len(images) != len(texts):
        raise ValueError(f"texts: expected one per image ({len(images)}), got {len(texts)}")
    return processor(text=list(texts), images=images, padding=True, return_tensors="pt").to(device)


@torch.no_grad()
def answer(model, processor, images, questions: Sequence[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy completions (``<answer>…</answer>``), one per image and question."""
    batch = _inputs(processor, images, [_chat(processor, q) for q in questions], model.device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def yes_probability(model, processor, images, questions: Sequence[str]) -> torch.Tensor:
    """``(B,)`` P(yes) against P(no) of the answer's first word, read after a forced ``<answer>``."""
    batch = _inputs(processor, images, [_chat(processor, q) + "<answer>" for q in questions], model.device)
    yes, no = processor.tokenizer.convert_tokens_to_ids(["yes", "no"])
    logits = model(**batch).logits[:, -1, [yes, no]].float()
    return logits.softmax(-1)[:, 0].cpu()


def _renders(questions: Sequence[Question], jitter: float = 0.0, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([render(q.scene, IMAGE_SIZE, jitter, rng) for q in questions])


def evaluate_vlm(model, processor, questions: Sequence[Question], batch_size: int = 64, progress: bool = False) -> dict:
    """Answer accuracy per kind and overall on un-jittered renders, and the judge AUROC of P(yes) on the
    yes/no questions (gold yes against gold no)."""
    from tqdm.auto import tqdm

    correct: dict[str, list[float]] = defaultdict(list)
    p_yes, gold_yes = [], []
    for start in tqdm(range(0, len(questions), batch_size), desc="evaluate", disable=not progress):
        chunk = questions[start : start + batch_size]
        images = _renders(chunk)
        for q, completion in zip(chunk, answer(model, processor, images, [q.text for q in chunk])):
            correct[q.kind].append(score(q, completion))
        judged = [i for i, q in enumerate(chunk) if q.kind == "yesno"]
        if judged:
            p_yes.append(yes_probability(model, processor, images[judged], [chunk[i].text for i in judged]))
            gold_yes += [chunk[i].answer == "yes" for i in judged]
    result = {"accuracy": sum(map(sum, correct.values())) / max(sum(map(len, correct.values())), 1)}
    result["accuracy_by_kind"] = {k: sum(correct[k]) / len(correct[k]) for k in KINDS if correct[k]}
    if p_yes and 0 < sum(gold_yes) < len(gold_yes):
        p, g = torch.cat(p_yes), torch.tensor(gold_yes)
        result["yesno_auroc"] = auroc(p[g], p[~g])
    return result


def judge_auroc(model, processor, n: int = 200, split: str = "heldout", seed: int = 0) -> float:
    """AUROC of P(yes) for "Does this image show <prompt>?" on renders of ``n`` prompts with their own prompt
    against the next prompt's; pairs whose mismatched prompt still holds (by the gold verifier) are dropped."""
    prompts = prompt_set(split, n, seed)
    images = torch.stack([render(p.scene, IMAGE_SIZE) for p in prompts])
    others = prompts[1:] + prompts[:1]
    holds = torch.tensor([v.score == 1.0 for v in verify_batch(images, [o.scene for o in others])])
    own = yes_probability(model, processor, images, [JUDGE_TEMPLATE.format(p.text) for p in prompts])
    mismatched = yes_probability(model, processor, images, [JUDGE_TEMPLATE.format(o.text) for o in others])
    return auroc(own, mismatched[~holds])


# ---------------------------------------------------------------------------------------------- training
def sft_batch(processor, questions: Sequence[Question], images) -> dict:
    """Processor inputs of prompt + gold completion, with ``labels`` on the completion and end of turn only."""
    end = processor.tokenizer.eos_token
    texts = [_chat(processor, q.text) + q.completion + end for q in questions]
    batch = _inputs(processor, images, texts, "cpu")
    labels = torch.full_like(batch["input_ids"], -100)
    for i, q in enumerate(questions):  # left padding: every completion ends its row
        n = len(processor.tokenizer(q.completion + end)["input_ids"])
        labels[i, -n:] = batch["input_ids"][i, -n:]
    batch["labels"] = labels
    return batch


def sft_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of the labelled tokens, averaged within each sample and then over samples, so that a
    18-token box answer weighs as much as a one-word answer."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    target = batch["labels"][:, 1:].to(logits.device)
    mask = target != -100
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
    return ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


@dataclass
class _TrainingSet:
    """Single questions and yes/no pairs (a yes and a no question about one render), with uint8 renders."""

    singles: list[Question]
    single_images: torch.Tensor
    pairs: list[tuple[Question, Question]]
    pair_images: torch.Tensor

    @classmethod
    def make(cls, recipe: VLMRecipe, seed: int) -> _TrainingSet:
        kinds = (*(k for k in KINDS if k != "yesno"), CAPTION)
        singles = question_set(recipe.questions, "train", seed, kinds=kinds)
        rng = np.random.default_rng([seed, 5])
        pairs = [
            (make_question(s, "yesno", rng, yes=True), make_question(s, "yesno", rng, yes=False))
            for s in sample_scenes(recipe.pairs, "train", seed + 1)
        ]
        return cls(
            singles, torch.stack(_uint8(_renders(singles, recipe.jitter, seed))),
            pairs, torch.stack(_uint8(_renders([p[0] for p in pairs], recipe.jitter, seed + 1))),
        )

    def batch(self, size: int, pair_share: float, generator: torch.Generator) -> tuple[list[Question], torch.Tensor]:
        n_pairs = round(size * pair_share / 2)
        p = torch.randint(len(self.pairs), (n_pairs,), generator=generator).tolist()
        s = torch.randint(len(self.singles), (size - 2 * n_pairs,), generator=generator).tolist()
        questions = [q for i in p for q in self.pairs[i]] + [self.singles[i] for i in s]
        return questions, torch.cat([self.pair_images[p].repeat_interleave(2, 0), self.single_images[s]])


def _train(model, processor, data: _TrainingSet, recipe: VLMRecipe, seed: int, progress: bool) -> list[float]:
    """AdamW on answer tokens, linear warm-up then cosine decay to a tenth; returns the loss per step.

    Yes/no questions come in pairs about one image, so the only way to tell their answers apart is to
    compare the caption with the image: a one-bit answer teaches little otherwise.
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    decay = max(recipe.steps - recipe.warmup, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / recipe.warmup if s < recipe.warmup
        else 0.1 + 0.45 * (1 + np.cos(np.pi * min(s - recipe.warmup, decay) / decay)),
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    bar = tqdm(range(recipe.steps), desc="vlm sft", disable=not progress)
    for _ in bar:
        questions, images = data.batch(recipe.batch, recipe.pair_share, generator)
        loss = sft_loss(model, sft_batch(processor, questions, images))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    return losses


def build_vlm(out_dir: str | Path, steps: int | None = None, seed: int = 0, progress: bool = True,
              recipe: VLMRecipe | None = None) -> dict:
    """Build the VLM from scratch into ``out_dir`` and return (and save as ``build_report.json``) its metrics.

    ``steps`` overrides the recipe's step count (and trains on as few questions as those steps use), for
    smoke tests. The build runs on one thread: the model is too small for a second one to pay, and on a
    shared machine two threads that wait on each other ran five times slower than one.
    """
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    recipe = recipe or VLMRecipe()
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps: expected a positive int or None, got {steps!r}")
        recipe = replace(recipe, steps=steps, warmup=min(recipe.warmup, steps),
                         questions=min(recipe.questions, steps * recipe.batch),
                         pairs=min(recipe.pairs, steps * recipe.batch))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        processor = build_processor(tokenizer, recipe.patch_size)
        model = Qwen2VLForConditionalGeneration(vlm_config(tokenizer, recipe))
        losses = _train(model, processor, _TrainingSet.make(recipe, seed), recipe, seed, progress)
        model.eval()
        out = Path(out_dir)
        model.generation_config = GenerationConfig(
            eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.pad_token_id, do_sample=False,
        )
        model.save_pretrained(out)
        processor.save_pretrained(out)
        train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
        report = {
            "recipe": asdict(recipe),
            "seed": seed,
            "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": float(np.mean(losses[-50:])),
            "heldout": evaluate_vlm(model, processor, question_set(recipe.eval_questions, "heldout", seed + 1000)),
            "train": evaluate_vlm(model, processor, question_set(recipe.eval_questions, "train", seed + 2000)),
            "judge_auroc": judge_auroc(model, processor, recipe.judge_prompts, "heldout", seed + 3000),
            "build_seconds": round(train_seconds, 1),
            "build_cpu_seconds": round(train_cpu, 1),
            "evaluate_seconds": round(time.perf_counter() - start - train_seconds, 1),
            "evaluate_cpu_seconds": round(time.process_time() - cpu - train_cpu, 1),
            "threads": torch.get_num_threads(),
            "load_average": [load, os.getloadavg()],
            "size_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        }
    finally:
        torch.set_num_threads(threads)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
