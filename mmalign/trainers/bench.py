"""``mmalign bench train``: the diffusion algorithms side by side, and PRDP's two backward paths.

``bench_algorithms`` runs each algorithm's own trainer (PRDP, DDPO, diffusion GRPO) for a few epochs at the same
batch (prompts × samples per prompt, steps, LoRA) on one pipeline, and reports samples/s of an epoch (rollout,
scoring and update) and the peak memory of its update.

For PRDP's update, both backward paths compute the same gradient (a test checks it). The whole-graph path keeps every timestep's UNet
activations alive until one backward; the per-timestep path keeps one. Memory is measured as the peak bytes
of tensors saved for backward (device-independent, via autograd's saved-tensor hooks; on CUDA the allocator's
peak is reported too). Time per sample at several group sizes B shows that the C(B, 2) pairs cost nothing: the
network work is linear in B.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mmalign.models.ddim import DDIMPolicy
from mmalign.models.rollout import (
    backward_weighted_log_probs,
    sample_trajectories,
    step_log_probs,
    trajectory_log_probs,
)
from mmalign.models.stable_diffusion import StableDiffusionAdapter
from mmalign.trainers.prdp_loss import pair_indices, rdp_coefficients, rdp_loss

__all__ = [
    "AlgorithmBenchRow",
    "SavedTensorMeter",
    "TrainBenchRow",
    "bench_algorithms",
    "bench_prdp_update",
    "format_algorithm_rows",
    "format_train_rows",
]


class _Saved:
    __slots__ = ("meter", "nbytes", "tensor")

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor) -> None:
        self.meter, self.tensor, self.nbytes = meter, tensor, tensor.numel() * tensor.element_size()
        meter.current += self.nbytes
        meter.peak = max(meter.peak, meter.current)

    def __del__(self) -> None:
        self.meter.current -= self.nbytes


class SavedTensorMeter:
    """Peak bytes of tensors held for backward while the context is active."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(self, t), lambda s: s.tensor)

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


@dataclass
class TrainBenchRow:
    path: str
    samples: int
    seconds: float
    peak_saved_mb: float
    peak_cuda_mb: float | None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def _measure(path: str, samples: int, fn) -> TrainBenchRow:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with SavedTensorMeter() as meter:
        fn()
    if cuda:
        torch.cuda.synchronize()
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return TrainBenchRow(path, samples, time.perf_counter() - start, meter.peak / 2**20, peak_cuda)


def _per_timestep_update(adapter, policy, unet, trajectory, ref, s_old, rewards, pairs, beta, clip_range) -> None:
    s = trajectory_log_probs(adapter, policy, unet, trajectory) - ref
    terms = rdp_coefficients(s, s_old, rewards, pairs, beta, clip_range)
    backward_weighted_log_probs(adapter, policy, unet, trajectory, terms.coef)


def _whole_graph_update(adapter, policy, unet, trajectory, ref, s_old, rewards, pairs, beta, clip_range) -> None:
    steps = range(trajectory.num_steps)
    s = torch.stack([step_log_probs(adapter, policy, unet, trajectory, t) for t in steps], 1) - ref
    rdp_loss(s, s_old, rewards, pairs, beta, clip_range)[0].backward()


def bench_prdp_update(
    pipeline, group_sizes=(4, 8, 16), num_steps: int = 10, prompts: int = 1, beta: float = 0.1, clip_range: float = 1.0
) -> list[TrainBenchRow]:
    """One PRDP update (coefficients + backward) per path and group size B, on ``prompts`` prompt groups."""
    adapter = StableDiffusionAdapter(pipeline, guidance_scale=5.0)
    policy = DDIMPolicy(pipeline.scheduler.config, num_steps, 1.0)
    unet = pipeline.unet
    unet.requires_grad_(True)
    rows = []
    for size in group_sizes:
        texts = [f"prompt {g}" for g in range(prompts) for _ in range(size)]
        meta = [{"group": g} for g in range(prompts) for _ in range(size)]
        trajectory = sample_trajectories(adapter, policy, texts, meta, torch.Generator().manual_seed(size))
        ref = trajectory_log_probs(adapter, policy, unet, trajectory)
        s_old = trajectory.log_probs - ref
        rewards = torch.randn(len(trajectory), generator=torch.Generator().manual_seed(0))
        pairs = pair_indices(trajectory.groups)

        args = (adapter, policy, unet, trajectory, ref, s_old, rewards, pairs, beta, clip_range)
        for name, fn in (("per-timestep", _per_timestep_update), ("whole-graph", _whole_graph_update)):
            unet.zero_grad(set_to_none=True)
            rows.append(_measure(name, len(trajectory), functools.partial(fn, *args)))
    unet.zero_grad(set_to_none=True)
    return rows


def format_train_rows(rows: list[TrainBenchRow]) -> str:
    lines = [f"{'path':<13} {'B':>4} {'s/update':>9} {'samples/s':>10} {'saved MB':>9} {'mem vs whole':>13} {'s/sample':>9}"]
    lines.append("-" * len(lines[0]))
    whole = {r.samples: r for r in rows if r.path == "whole-graph"}
    for r in rows:
        ratio = r.peak_saved_mb / whole[r.samples].peak_saved_mb if r.samples in whole else float("nan")
        lines.append(
            f"{r.path:<13} {r.samples:>4} {r.seconds:>9.2f} {r.samples_per_s:>10.2f} {r.peak_saved_mb:>9.1f} "
            f"{ratio:>12.3f}x {r.seconds / r.samples:>9.3f}"
        )
    return "\n".join(lines)


@dataclass
class AlgorithmBenchRow:
    task: str
    samples: int  # per epoch
    seconds: float  # per epoch: the median of the epochs after the first
    peak_saved_mb: float  # tensors saved for backward during the update
    peak_cuda_mb: float | None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def bench_algorithms(
    load_pipeline,
    tasks: Sequence[str] = ("prdp", "ddpo", "diffusion_grpo"),
    prompts: int = 2,
    samples_per_prompt: int = 4,
    num_steps: int = 10,
    epochs: int = 4,
) -> list[AlgorithmBenchRow]:
    """Each task's trainer on a fresh ``load_pipeline()``, at one batch and sampler; the first epoch (which also
    checks the re-scoring) is not timed and the median epoch is reported (a shared machine's noise). The reward is JPEG incompressibility: cheap, and the same for all."""
    from mmalign.config import TASKS, import_object

    if epochs < 2:
        raise ValueError(f"epochs: expected at least 2 (the first is not timed), got {epochs!r}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.txt"
        prompt_file.write_text("\n".join(f"a photo of thing number {i}" for i in range(prompts)) + "\n")
        for task in tasks:
            schema, trainer_class = import_object(TASKS[task].config), import_object(TASKS[task].trainer)
            config = schema(
                pipeline="given", prompts={"file": str(prompt_file)}, reward=["jpeg_incompressibility"],
                epochs=epochs, prompts_per_epoch=prompts, samples_per_prompt=samples_per_prompt,
                prompts_per_update=prompts, num_steps=num_steps, output_dir=str(Path(tmp) / task), report=None,
            )
            trainer = trainer_class(config, pipeline=load_pipeline(), progress=False)
            trainer.setup()
            loop, seconds, peak_saved, peak_cuda = trainer.loop, [], 0.0, None
            cuda = torch.cuda.is_available()
            for epoch in range(epochs):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                trajectory = loop.rollout(epoch)
                loop.score(trajectory)
                with SavedTensorMeter() as meter:
                    trainer.update(trajectory, epoch)
                if cuda:
                    torch.cuda.synchronize()
                    peak_cuda = max(peak_cuda or 0.0, torch.cuda.max_memory_allocated() / 2**20)
                if epoch > 0:
                    seconds.append(time.perf_counter() - start)
                peak_saved = max(peak_saved, meter.peak / 2**20)
            trainer.cleanup()
            rows.append(AlgorithmBenchRow(task, prompts * samples_per_prompt, statistics.median(seconds), peak_saved,
                                          peak_cuda))
    return rows


def format_algorithm_rows(rows: list[AlgorithmBenchRow]) -> str:
    cuda = any(r.peak_cuda_mb is not None for r in rows)
    head = f"{'algorithm':<15} {'samples':>8} {'s/epoch':>8} {'samples/s':>10} {'saved MB':>9}"
    lines = [head + (f" {'CUDA peak MB':>13}" if cuda else ""), "-" * (len(head) + (14 if cuda else 0))]
    for r in rows:
        line = f"{r.task:<15} {r.samples:>8} {r.seconds:>8.2f} {r.samples_per_s:>10.2f} {r.peak_saved_mb:>9.1f}"
        lines.append(line + (f" {r.peak_cuda_mb:>13.1f}" if cuda else ""))
    return "\n".join(lines)
