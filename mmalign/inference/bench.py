"""``mmalign bench optimize``: ReNO's prompts per second, batched against one prompt at a time.

The paper's code optimises one image at a time; mmalign optimises a batch. Both are measured in one run on the
same model, prompts, seeds and iterations, after a warm-up call, and the ratio is printed beside the figures.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from mmalign.models.adapter import GeneratorAdapter

__all__ = ["OptimizeRow", "add_arguments", "bench_optimize", "run"]


@dataclass
class OptimizeRow:
    mode: str
    prompts: int
    seconds: float

    @property
    def prompts_per_s(self) -> float:
        return self.prompts / self.seconds


def bench_optimize(adapter: GeneratorAdapter, prompts: list[str], metadata: list[dict], reward,
                   iterations: int, num_steps: int) -> list[OptimizeRow]:
    """Seconds to optimise ``prompts`` in one batch, then one at a time (the same seeds)."""
    from mmalign.inference.reno import optimize_noise

    def optimise(rows: slice) -> None:
        optimize_noise(adapter, prompts[rows], reward, metadata=metadata[rows], seeds=range(len(prompts))[rows],
                       num_steps=num_steps, iterations=iterations)

    optimize_noise(adapter, prompts[:2], reward, metadata=metadata[:2], num_steps=num_steps, iterations=2)  # warm-up
    start = time.perf_counter()
    optimise(slice(None))
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(len(prompts)):
        optimise(slice(i, i + 1))
    loop = time.perf_counter() - start
    return [OptimizeRow(f"batched ({len(prompts)} prompts)", len(prompts), batched),
            OptimizeRow("one prompt at a time", len(prompts), loop)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="world", help="'world', a hub id or a pipeline folder")
    parser.add_argument("--reward", default="preference_proxy", help="reward name or JSON spec (differentiable)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts (world held-out prompts on the world)")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4, help="deterministic DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import json

    from mmalign.models.pipelines import adapter_for, load_pipeline
    from mmalign.prompts import PromptSource, load_prompts
    from mmalign.rewards import build

    adapter = adapter_for(load_pipeline(args.pipeline).to(args.device), args.guidance_scale)
    rows = load_prompts(PromptSource(world="heldout", n=args.prompts, seed=1))
    spec = json.loads(args.reward) if args.reward.startswith("{") else args.reward
    reward = build(spec).to(args.device)
    print(f"ReNO on {args.pipeline}: {args.prompts} prompts × {args.iterations} iterations, {args.steps} DDIM steps, "
          f"reward {reward.name}, on {args.device} ({torch.get_num_threads()} threads)")
    table = bench_optimize(adapter, [t for t, _ in rows], [m for _, m in rows], reward, args.iterations, args.steps)
    for row in table:
        print(f"{row.mode:>24}: {row.seconds:8.2f} s  {row.prompts_per_s:7.3f} prompts/s")
    print(f"{'batched / loop':>24}: {table[0].prompts_per_s / table[1].prompts_per_s:.2f}×")
    return 0
