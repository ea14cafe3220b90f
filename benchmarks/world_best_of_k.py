"""How much gold a reward can buy on the world generator: best-of-k selection by the reward, against gold's own.

Samples ``--samples`` images per held-out prompt with the PRDP training policy (DDIM-η, the recipe's steps,
guidance and η), scores them with gold and with each ``--reward``, then prints, for k = 2, 4, … up to the
samples, the mean gold of each prompt's best-of-k sample when the reward picks it, when gold picks it (the
ceiling) and the plain mean; also the within-prompt pairwise agreement and correlation with gold. Best-of-k
costs about log k − (k−1)/k nats of KL, so it bounds what a KL-regularised trainer on that reward can reach at
that budget: run it before tuning a trainer against a reward.

    python benchmarks/world_best_of_k.py --prompts 48 --samples 8 --reward proxy --reward preference_proxy
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (the largest k)")
    parser.add_argument("--reward", action="append", help="reward name or JSON spec (default: both world proxies)")
    parser.add_argument("--recipe", default="shapes-prdp", help="PRDP recipe whose sampler is used")
    parser.add_argument("--prompt-seed", type=int, default=7, help="seed of the held-out prompt set")
    parser.add_argument("--seed", type=int, default=3, help="noise seed")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args(argv)
    if args.samples < 2 or args.prompts < 1:
        parser.error(f"--samples: expected ≥ 2 and --prompts ≥ 1, got {args.samples} and {args.prompts}")

    from mmalign.config import load_recipe
    from mmalign.eval.best_of_k import best_of_k_table
    from mmalign.files import write_text_atomic
    from mmalign.models.pipelines import adapter_for, load_pipeline
    from mmalign.models.rollout import sample_trajectories
    from mmalign.prompts import PromptSource, load_prompts
    from mmalign.rewards import build

    recipe = load_recipe(args.recipe)
    given = args.reward or ['{"name": "proxy", "scale": 1.0}', '{"name": "preference_proxy", "scale": 1.0}']
    specs = [json.loads(r) if r.lstrip().startswith("{") else r for r in given]
    rewards = {(s if isinstance(s, str) else s["name"]): build(s) for s in specs}
    gold_reward = build("gold")
    pipe = load_pipeline(recipe.pipeline)
    adapter = adapter_for(pipe, recipe.guidance_scale)
    policy = adapter.make_policy(recipe.num_steps, recipe.eta)
    prompts = load_prompts(PromptSource(world="heldout", n=args.prompts, seed=args.prompt_seed))
    texts = [t for t, _ in prompts for _ in range(args.samples)]
    metadata = [{**m, "group": g} for g, (_, m) in enumerate(prompts) for _ in range(args.samples)]

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in ["gold", *rewards]}
    with torch.no_grad():
        for s in range(0, len(texts), args.batch):
            batch = sample_trajectories(adapter, policy, texts[s : s + args.batch], metadata[s : s + args.batch],
                                        generator, denoiser=pipe.unet).media()
            scores["gold"].append(gold_reward(batch).scores.float())
            for name, reward in rewards.items():
                scores[name].append(reward(batch).scores.float())
    table = {name: torch.cat(v).view(args.prompts, args.samples) for name, v in scores.items()}
    result = best_of_k_table({n: v for n, v in table.items() if n != "gold"}, table["gold"])
    ks = list(result["kl_nats"])
    result["seconds"] = round(time.perf_counter() - start, 1)

    print(f"{args.prompts} held-out prompts x {args.samples} samples; mean gold {result['gold_mean']:.3f}")
    print("picked by".ljust(16) + "".join(f"best-of-{k}".rjust(12) for k in ks))
    for name, row in result["best_of_k"].items():
        print(name.ljust(16) + "".join(f"{row[k]:12.3f}" for k in ks))
    for name in rewards:
        agreement = result[name]
        print(f"{name}: within-prompt pairwise accuracy {agreement['pairwise_accuracy']:.3f} "
              f"({agreement['pairs']} pairs), correlation {agreement['correlation']:.3f}")
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
