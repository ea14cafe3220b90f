"""Where the world generator's mistakes come from: the prompt or the seed.

Samples ``--prompts`` prompts of a split × ``--samples`` seeds at the shipped sampler (DDIM, 20 steps, guidance 5)
and counts, per kind of gold check, the (prompt, check) pairs that pass for every seed, for none, or for some:
a check that passes for some seeds only is a mistake the noise draws, not the prompt. Also prints gold's
between-prompt and within-prompt variance.

    python benchmarks/world_seed_dependence.py --split heldout --prompts 96 --samples 4
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="heldout", choices=("train", "heldout"))
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--samples", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--seed", type=int, default=1000, help="prompt and noise seed (the build report's)")
    parser.add_argument("--pipeline", help="pipeline folder (default: the shipped one)")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    if args.samples < 2 or args.prompts < 1:
        parser.error(f"--samples: expected ≥ 2 and --prompts ≥ 1, got {args.samples} and {args.prompts}")

    from mmalign.eval.best_of_k import variance_components
    from mmalign.world.assets import generate, load_pipeline
    from mmalign.world.captions import prompt_set
    from mmalign.world.verify import verify_batch

    pipe = load_pipeline(path=args.pipeline)
    k = args.samples
    items = [p for p in prompt_set(args.split, args.prompts, args.seed) for _ in range(k)]
    texts = [p.text for p in items]
    images = torch.cat([generate(pipe, texts[i : i + args.batch], seed=args.seed + i)
                        for i in range(0, len(items), args.batch)])
    verdicts = verify_batch(images, [p.scene for p in items])
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"always": 0, "never": 0, "seed": 0})
    for g in range(args.prompts):
        group = verdicts[g * k : (g + 1) * k]
        for check in group[0].checks:
            passed = sum(v.checks[check] for v in group)
            counts[check.split(".")[-1]]["always" if passed == k else "never" if passed == 0 else "seed"] += 1
    gold = torch.tensor([v.score for v in verdicts]).view(args.prompts, k)
    result = {"split": args.split, "prompts": args.prompts, "samples": k, "checks": dict(sorted(counts.items())),
              "gold_mean": round(float(gold.mean()), 4),
              "gold_variance": {n: round(v, 4) for n, v in variance_components(gold).items()}}
    print(f"{args.prompts} {args.split} prompts x {k} seeds; mean gold {result['gold_mean']:.3f}; variance "
          + ", ".join(f"{n} {v:.4f}" for n, v in result["gold_variance"].items()))
    print("check".ljust(12) + "always".rjust(8) + "never".rjust(8) + "by seed".rjust(9))
    for name, row in result["checks"].items():
        print(name.ljust(12) + f"{row['always']:8d}{row['never']:8d}{row['seed']:9d}")
    return result


if __name__ == "__main__":
    print(json.dumps(main()["checks"]))
