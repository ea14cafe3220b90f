"""``mmalign bench train``: the diffusion algorithms side by side, their updates alone, and PRDP's two backward paths.

``bench_algorithms`` runs each variant's own trainer (PRDP, DDPO, diffusion GRPO, and the back-propagation trainer
as DRaFT-K with K = every step and as Direct-Align, each with and without checkpointing) for a few epochs at the
same batch (prompts × samples per prompt, steps, LoRA) on one pipeline. It reports samples/s of an epoch
(rollout, scoring and update) and, for the update alone, samples/s, peak memory and the first update's gradient
norm, with ratios against PRDP's update measured in the same run.

For PRDP's update, both backward paths compute the same gradient (a test checks it). The whole-graph path keeps every timestep's UNet
activations alive until one backward; the per-timestep path keeps one. Memory is measured as the peak bytes
of tensors saved for backward (device-independent, via autograd's saved-tensor hooks; on CUDA the allocator's
peak is reported too). Inside a checkpointed region the checkpoint's own hooks take over, so with checkpointing
the saved bytes leave out the inputs the checkpoints keep and the segment recomputed in backward: CUDA's peak
is the full figure. Time per sample at several group sizes B shows that the C(B, 2) pairs cost nothing: the
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
    "DEFAULT_VARIANTS",
    "VARIANTS",
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
    """One measured update: ``seconds`` for ``samples`` samples, the peak MB saved for backward, CUDA's peak MB
    (None off CUDA) and, for a trainer's update, its gradient norm before clipping."""

    path: str
    samples: int
    seconds: float
    peak_saved_mb: float
    peak_cuda_mb: float | None
    grad_norm: float | None = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _measure(path: str, samples: int, fn) -> tuple[TrainBenchRow, object]:
    """Run ``fn()`` once: its row (seconds, peak saved-for-backward MB, CUDA's peak MB) and its result."""
    cuda = torch.cuda.is_available()
    _synchronize()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with SavedTensorMeter() as meter:
        result = fn()
    _synchronize()
    seconds = time.perf_counter() - start
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return TrainBenchRow(path, samples, seconds, meter.peak / 2**20, peak_cuda), result


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
            rows.append(_measure(name, len(trajectory), functools.partial(fn, *args))[0])
    unet.zero_grad(set_to_none=True)
    return rows


def format_train_rows(rows: list[TrainBenchRow], reference: str = "whole-graph") -> str:
    """A table of ``rows`` with the speed (samples/s) and memory of each as a multiple of the ``reference`` row at
    the same number of samples B (CUDA's peak too where measured; the gradient norm where given)."""
    cuda = any(r.peak_cuda_mb is not None for r in rows)
    norms = any(r.grad_norm is not None for r in rows)
    ref = {r.samples: r for r in rows if r.path == reference}
    width = max([13, *(len(r.path) for r in rows)])
    head = f"{'path':<{width}} {'B':>4} {'s/update':>9} {'samples/s':>10} {'speed ×':>8} {'saved MB':>9} {'mem ×':>7}"
    head += f" {'CUDA MB':>9} {'CUDA ×':>7}" if cuda else ""
    head += f" {'s/sample':>9}" + (f" {'grad norm':>10}" if norms else "")
    lines = [f"× : against {reference} at the same B, measured in this run", head, "-" * len(head)]

    def ratio(value, base) -> float:
        return value / base if value is not None and base else float("nan")

    for r in rows:
        base = ref.get(r.samples)
        line = (f"{r.path:<{width}} {r.samples:>4} {r.seconds:>9.2f} {r.samples_per_s:>10.2f} "
                f"{ratio(r.samples_per_s, base and base.samples_per_s):>7.2f}x {r.peak_saved_mb:>9.1f} "
                f"{ratio(r.peak_saved_mb, base and base.peak_saved_mb):>6.2f}x")
        if cuda:
            cuda_mb = float("nan") if r.peak_cuda_mb is None else r.peak_cuda_mb
            line += f" {cuda_mb:>9.1f} {ratio(r.peak_cuda_mb, base and base.peak_cuda_mb):>6.2f}x"
        line += f" {r.seconds / r.samples:>9.3f}"
        if norms:
            line += f" {float('nan') if r.grad_norm is None else r.grad_norm:>10.4g}"
        lines.append(line)
    return "\n".join(lines)


_CHECKPOINTING = {"gradient_checkpointing": True, "decoder_checkpointing": True}

#: ``bench_algorithms``'s variants besides the task names (a task name runs with its defaults): name → (task,
#: config fields); ``"grad_steps": None`` keeps every step's graph (DRaFT-K with K = all: AlignProp's worst case).
#: ``+ckpt``: UNet gradient checkpointing and VAE decoder checkpointing.
VARIANTS: dict[str, tuple[str, dict]] = {
    "draft-all": ("backprop", {"method": "draft", "grad_steps": None}),
    "draft-all+ckpt": ("backprop", {"method": "draft", "grad_steps": None, **_CHECKPOINTING}),
    "direct-align": ("backprop", {"method": "direct_align"}),
    "direct-align+ckpt": ("backprop", {"method": "direct_align", **_CHECKPOINTING}),
}
DEFAULT_VARIANTS = ("prdp", "ddpo", "diffusion_grpo", "diffusion_nft", *VARIANTS)


@dataclass
class AlgorithmBenchRow:
    task: str
    samples: int  # per epoch
    seconds: float  # per epoch (rollout, scoring, update): the median of the epochs after the first
    update: TrainBenchRow  # the update alone: median seconds, peak memory over the epochs, first update's grad norm

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    @property
    def peak_saved_mb(self) -> float:
        return self.update.peak_saved_mb

    @property
    def peak_cuda_mb(self) -> float | None:
        return self.update.peak_cuda_mb


def bench_algorithms(
    load_pipeline,
    tasks: Sequence[str] = DEFAULT_VARIANTS,
    prompts: int = 2,
    samples_per_prompt: int = 4,
    num_steps: int = 10,
    epochs: int = 4,
    reward: str = "jpeg_incompressibility",
    differentiable_reward: str = "proxy",
) -> list[AlgorithmBenchRow]:
    """Each variant's trainer (a task name or a ``VARIANTS`` name) on a fresh ``load_pipeline()``, at one batch and
    sampler, with one optimiser step per epoch over the whole batch; the first epoch (which also checks the
    re-scoring) is not timed and the median epoch is reported (a shared machine's noise). The black-box trainers
    train on ``reward`` (default JPEG incompressibility: cheap), the back-propagation trainer on
    ``differentiable_reward`` (default the world's CLIP proxy). Every variant starts from the same weights and
    seed, so variants that differ only in checkpointing have the same first update."""
    from mmalign.config import TASKS, import_object
    from mmalign.trainers.backprop import BackpropConfig

    if epochs < 2:
        raise ValueError(f"epochs: expected at least 2 (the first is not timed), got {epochs!r}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.txt"
        prompt_file.write_text("\n".join(f"a photo of thing number {i}" for i in range(prompts)) + "\n")
        for name in tasks:
            task, fields = VARIANTS.get(name, (name, {}))
            if task not in TASKS:
                raise ValueError(f"{name!r}: expected a task ({', '.join(TASKS)}) or one of {', '.join(VARIANTS)}")
            fields = {k: num_steps if k == "grad_steps" and v is None else v for k, v in fields.items()}
            schema, trainer_class = import_object(TASKS[task].config), import_object(TASKS[task].trainer)
            config = schema(
                pipeline="given", prompts={"file": str(prompt_file)},
                reward=[differentiable_reward if issubclass(schema, BackpropConfig) else reward],
                epochs=epochs, prompts_per_epoch=prompts, samples_per_prompt=samples_per_prompt,
                prompts_per_update=prompts, num_steps=num_steps, output_dir=str(Path(tmp) / name), report=None,
                **fields,
            )
            trainer = trainer_class(config, pipeline=load_pipeline(), progress=False)
            trainer.setup()
            loop, seconds, updates, grad_norm = trainer.loop, [], [], None
            for epoch in range(epochs):
                start = time.perf_counter()
                trajectory = loop.rollout(epoch)
                loop.score(trajectory)
                _synchronize()
                sampling = time.perf_counter() - start
                update, metrics = _measure(name, len(trajectory), functools.partial(trainer.update, trajectory, epoch))
                updates.append(update)
                seconds.append(sampling + update.seconds)
                grad_norm = metrics.get("grad_norm") if epoch == 0 else grad_norm
            trainer.cleanup()
            cuda = [u.peak_cuda_mb for u in updates if u.peak_cuda_mb is not None]
            update = TrainBenchRow(name, len(trajectory), statistics.median(u.seconds for u in updates[1:]),
                                   max(u.peak_saved_mb for u in updates), max(cuda) if cuda else None, grad_norm)
            rows.append(AlgorithmBenchRow(name, len(trajectory), statistics.median(seconds[1:]), update))
    return rows


def format_algorithm_rows(rows: list[AlgorithmBenchRow]) -> str:
    """The epoch table (rollout, scoring, update); the update alone is ``format_train_rows([r.update ...])``."""
    width = max([15, *(len(r.task) for r in rows)])
    head = f"{'algorithm':<{width}} {'samples':>8} {'s/epoch':>8} {'samples/s':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.task:<{width}} {r.samples:>8} {r.seconds:>8.2f} {r.samples_per_s:>10.2f}")
    return "\n".join(lines)
