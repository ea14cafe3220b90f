"""``mmalign bench rewards``: images/s of CLIP-family rewards and the VQAScore judge against naive loops,
measured in one run.

The naive loop is what scripts usually do: one image at a time, PIL round-trip through the model's own
preprocessing transform, the prompt re-encoded every time. mmalign's rewards batch, preprocess on tensors and
cache text embeddings. For the VLM judge the naive loop is what the VQAScore package does: one (image, prompt)
pair per teacher-forced forward through the processor, logits over the whole sequence. Both paths run on the
same images, prompts and model, so the ratio is what a user gains.

``vqascore_forward`` times the judge model's forward alone on rows already encoded, a batch in one forward
against one row per forward: the model's own gain from batching, which bounds what any batched judge gains.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mmalign.media import MediaBatch
from mmalign.rewards import build

__all__ = ["BENCHED", "BenchRow", "bench_rewards", "format_rows", "judge_forward_loops", "naive_clip_loop",
           "naive_vqascore_loop"]

#: The rewards ``bench_rewards`` can time (``vqascore`` only with a judge).
BENCHED = ("clip", "goal_baseline", "vqascore")


@dataclass
class BenchRow:
    reward: str
    batch_size: int
    images_per_s: float
    naive_images_per_s: float

    @property
    def speedup(self) -> float:
        return self.images_per_s / self.naive_images_per_s


def naive_clip_loop(model_dir: str | Path) -> Callable[[MediaBatch], torch.Tensor]:
    """The reference: open_clip's own PIL transform and encoders, one image and one prompt at a time."""
    import open_clip

    name = f"local-dir:{Path(model_dir).resolve()}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()

    def run(batch: MediaBatch) -> torch.Tensor:
        scores = []
        with torch.no_grad():
            for image, prompt in zip(batch.to_pil(), batch.prompts):
                image_emb = F.normalize(model.encode_image(preprocess(image)[None]), dim=-1)
                text_emb = F.normalize(model.encode_text(tokenizer([prompt])), dim=-1)
                scores.append(100 * (image_emb * text_emb).sum())
        return torch.stack(scores)

    return run


def naive_vqascore_loop(reward) -> Callable[[MediaBatch], torch.Tensor]:
    """The reference for ``vqascore`` on ``reward``'s model and processor: one pair per forward, PIL images
    through the processor, the full sequence's logits, log-softmax, the answer tokens' geometric mean."""
    model, processor = reward.model, reward.processor
    answer = processor.tokenizer(reward.answer, add_special_tokens=False)["input_ids"]
    n = len(answer)

    def run(batch: MediaBatch) -> torch.Tensor:
        scores = []
        with torch.no_grad():
            for image, prompt in zip(batch.to_pil(), batch.prompts):
                inputs = processor(text=[reward.context(reward.template.format(prompt=prompt))], images=[image],
                                   return_tensors="pt")
                for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                    if key in inputs:
                        tail = {"input_ids": answer, "attention_mask": [1] * n}.get(key, [0] * n)
                        inputs[key] = torch.cat([inputs[key], torch.tensor([tail])], 1)
                logp = model(**inputs.to(model.device)).logits[0, -n - 1 : -1].float().log_softmax(-1)
                scores.append(logp.gather(-1, torch.tensor(answer, device=model.device)[:, None]).mean().exp())
        return torch.stack(scores)

    return run


def judge_forward_loops(reward, batch: MediaBatch) -> tuple[Callable[[], object], Callable[[], object]]:
    """``(batched, one_at_a_time)``: the judge model's forward on ``batch``'s rows encoded in advance, all rows
    in one forward or one row per forward (the answer positions' logits only, as the judge keeps them)."""
    contexts = [reward.context(reward.template.format(prompt=p)) for p in batch.prompts]
    targets = reward.processor.tokenizer([reward.answer] * len(batch), add_special_tokens=False)["input_ids"]
    pixels = reward.media(batch)
    keep = len(targets[0]) + 1

    def encoded(rows: slice) -> dict:
        return reward.encode(pixels[rows], contexts[rows], targets[rows])[0]

    whole, singles = encoded(slice(None)), [encoded(slice(i, i + 1)) for i in range(len(batch))]
    return (lambda: reward.model(**whole, logits_to_keep=keep),
            lambda: [reward.model(**single, logits_to_keep=keep) for single in singles])


def _calls_per_s(fn: Callable[[], object], calls: int, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats * calls / (time.perf_counter() - start)


def _images_per_s(fn: Callable[[MediaBatch], object], batches: Sequence[MediaBatch], repeats: int) -> float:
    fn(batches[0])  # warm-up: lazy initialisation and the text cache's first fill are not throughput
    start = time.perf_counter()
    for _ in range(repeats):
        for batch in batches:
            fn(batch)
    return repeats * sum(len(b) for b in batches) / (time.perf_counter() - start)


def bench_rewards(
    model_dir: str | Path,
    batch_sizes: Sequence[int] = (1, 8, 32),
    n_images: int = 64,
    image_size: int = 64,
    n_prompts: int = 8,
    repeats: int = 1,
    judge: str | None = None,
    rewards: Sequence[str] = BENCHED,
) -> list[BenchRow]:
    """CLIP score and goal-baseline projection on the OpenCLIP model in ``model_dir``, and ``vqascore`` on the
    VLM ``judge`` (hub id or folder; None skips it), at each batch size; ``rewards`` picks among them.

    Images are random at ``image_size`` (so both paths resize); ``n_prompts`` distinct prompts repeat across
    the set, as a training batch's prompts do.
    """
    if unknown := [r for r in rewards if r not in BENCHED]:
        raise ValueError(f"rewards: expected names among {list(BENCHED)}, got {unknown}")
    torch.manual_seed(0)
    pixels = torch.rand(n_images, 3, image_size, image_size)
    prompts = [f"prompt number {i % n_prompts}" for i in range(n_images)]
    full = MediaBatch(pixels, prompts)
    options = {"clip": {}, "goal_baseline": {"baseline": "a picture"}}
    clip_family = {name: build({"name": name, "model": str(model_dir), **options[name]})
                   for name in options if name in rewards}
    rows = []
    with torch.no_grad():
        if clip_family:
            naive_rate = _images_per_s(naive_clip_loop(model_dir), [full[:16]], repeats)
        for name, reward in clip_family.items():
            for size in batch_sizes:
                batches = [full[i : i + size] for i in range(0, n_images, size)]
                rows.append(BenchRow(name, size, _images_per_s(reward, batches, repeats), naive_rate))
        if judge is not None and "vqascore" in rewards:
            vqascore = build({"name": "vqascore", "model": judge})
            naive_rate = _images_per_s(naive_vqascore_loop(vqascore), [full[:16]], repeats)
            for size in batch_sizes:
                batches = [full[i : i + size] for i in range(0, n_images, size)]
                rows.append(BenchRow("vqascore", size, _images_per_s(vqascore, batches, repeats), naive_rate))
            for size in batch_sizes:
                batched, one_at_a_time = judge_forward_loops(vqascore, full[:size])
                rows.append(BenchRow("vqascore_forward", size, _calls_per_s(batched, size, repeats),
                                     _calls_per_s(one_at_a_time, size, repeats)))
    return rows


def format_rows(rows: Sequence[BenchRow]) -> str:
    lines = [f"{'reward':<16} {'batch':>5} {'images/s':>10} {'naive/s':>10} {'speedup':>8}", "-" * 53]
    lines += [
        f"{r.reward:<16} {r.batch_size:>5} {r.images_per_s:>10.1f} {r.naive_images_per_s:>10.1f} {r.speedup:>7.1f}x"
        for r in rows
    ]
    return "\n".join(lines)


def write_rows(rows: Sequence[BenchRow], path: str | Path) -> None:
    """JSON with the figures and what they were measured on."""
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine()}
    data = {"meta": meta, "rows": [{**asdict(r), "speedup": r.speedup} for r in rows]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
