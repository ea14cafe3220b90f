"""How well the world's proxy, and ensembles of proxies, agree with the gold verifier on generated images.

Samples the shipped generator on held-out prompts and labels every pair of samples of one prompt by gold
(``write_gold_pairs``), trains extra proxies from other seeds as ensemble members (a deep ensemble; cached in
the output folder), then prints the pairwise accuracy of each member, of the ensemble in its mean / UWO / WCO
modes and of Ctrl-U weighting, under the HPDv2, Pick-a-Pic and ImageReward protocols. ``gold`` itself is
scored as a check: it must agree with its own labels. With ``--judges`` it adds the preference proxy and the
VLM judges on the world's VLM, and prints each reward's AUROC of matched (image, own prompt) against
mismatched (image, the next prompt's prompt, where that prompt does not hold by gold) beside its accuracy.

    python benchmarks/world_reward_agreement.py --out outputs/world-reward-agreement
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch


def member_folders(out: Path, members: int, steps: int | None) -> list[str]:
    """The shipped proxy, then proxies trained from seeds 2, 3, … (built once, then reused)."""
    from mmalign.world.assets import proxy_path
    from mmalign.world.proxy import ProxyRecipe, build_proxy

    folders = [proxy_path()]
    for seed in range(2, members + 1):
        folder = out / "proxies" / f"seed{seed}"
        if not (folder / "open_clip_model.safetensors").is_file():
            recipe = ProxyRecipe(seed=seed) if steps is None else replace(ProxyRecipe(seed=seed), steps=steps)
            build_proxy(folder, recipe)
        folders.append(str(folder))
    return folders


def judge_specs() -> dict:
    """The VLM judges on the world's VLM, asked in its own markup (``<answer>yes``)."""
    from mmalign.world.questions import JUDGE_TEMPLATE
    from mmalign.world.vlm import vlm_path

    world = {"model": vlm_path(), "answer_prefix": "<answer>"}
    return {
        "vqascore": {"name": "vqascore", "template": JUDGE_TEMPLATE.format("{prompt}"), "answer": "yes", **world},
        "vqascore_default_template": {"name": "vqascore", **world},
        "checklist": {"name": "vlm_checklist", "answer": "yes", **world},
        "prompt_echo": {"name": "prompt_echo", **world},
    }


def matched_auroc(records, rewards: dict, batch_size: int = 64) -> dict[str, float]:
    """AUROC per reward of each distinct image with its own prompt against the next prompt's (dropped where
    that prompt's scene holds for the image by gold)."""
    from mmalign.eval.agreement import auroc
    from mmalign.eval.reward_accuracy import records_batch
    from mmalign.eval.scoring import score_batch
    from mmalign.media import MediaBatch
    from mmalign.rewards import build

    batch = records_batch(records)
    seen, keep = set(), []
    for i, meta in enumerate(batch.metadata):
        key = (batch.prompts[i], meta["file"])
        if key not in seen:
            seen.add(key)
            keep.append(i)
    own = batch[keep]
    prompts = list(dict.fromkeys(own.prompts))
    scene = {p: m for p, m in zip(own.prompts, own.metadata)}
    nxt = [prompts[(prompts.index(p) + 1) % len(prompts)] for p in own.prompts]
    other = MediaBatch(own.pixels, nxt, [scene[p] for p in nxt])
    holds = build("gold")(other).scores == 1.0
    mismatched = other[[i for i in range(len(other)) if not holds[i]]]
    pos = score_batch(rewards, own, batch_size, False)
    neg = score_batch(rewards, mismatched, batch_size, False)
    return {name: auroc(torch.as_tensor(pos[name]), torch.as_tensor(neg[name])) for name in rewards}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/world-reward-agreement")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts sampled")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (pairs: C(samples, 2) each)")
    parser.add_argument("--members", type=int, default=3, help="proxies in the ensemble (the shipped one first)")
    parser.add_argument("--proxy-steps", type=int, help="training steps of the extra proxies (default: the shipped recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judges", action="store_true", help="also the preference proxy and the VLM judges, with "
                        "their AUROC on matched vs mismatched prompts")
    args = parser.parse_args(argv)

    from mmalign.eval.preference import read_pairs
    from mmalign.eval.reward_accuracy import format_accuracy, records_batch, reward_accuracy
    from mmalign.eval.scoring import score_batch
    from mmalign.rewards import build
    from mmalign.world.pairs import write_gold_pairs

    torch.manual_seed(args.seed)
    out = Path(args.out)
    start, load = time.perf_counter(), os.getloadavg()
    pairs = out / "pairs" / "pairs.jsonl"
    if not pairs.is_file():
        write_gold_pairs(pairs.parent, args.prompts, args.samples, "heldout", args.seed)
    folders = member_folders(out, args.members, args.proxy_steps)
    members = [{"name": "proxy", "model": folder, "scale": 1.0} for folder in folders]
    specs = {"gold": "gold"}
    specs.update({f"proxy_seed{i + 1}": member for i, member in enumerate(members)})
    specs.update({
        "ensemble_mean": {"name": "ensemble", "members": members, "mode": "mean"},
        "ensemble_uwo_0.5": {"name": "ensemble", "members": members, "mode": "uwo", "lam": 0.5},
        "ensemble_uwo_2": {"name": "ensemble", "members": members, "mode": "uwo", "lam": 2.0},
        "ensemble_wco": {"name": "ensemble", "members": members, "mode": "wco"},
        "ctrl_u_0.1": {"name": "uncertainty_weighted", "lam": 0.1,
                       "reward": {"name": "ensemble", "members": members, "mode": "mean"}},
    })
    if args.judges:
        specs.update({"preference_proxy": "preference_proxy", **judge_specs()})
    rewards = {name: build(spec) for name, spec in specs.items()}
    records = read_pairs(pairs)
    if not records:
        raise SystemExit(f"{pairs}: no pair of samples differs in gold; sample more --prompts or --samples")
    # Ensembles standardise members with running statistics: fit them on every image first, so that the
    # first scored batch is not standardised by its own statistics alone.
    warm = {name: reward for name, reward in rewards.items() if "ensemble" in name or "ctrl_u" in name}
    score_batch(warm, records_batch(records), 64, False)
    table = reward_accuracy(records, rewards, batch_size=64)
    print(f"{len(records)} gold-labelled pairs from {args.prompts} held-out prompts x {args.samples} samples")
    print(format_accuracy(table))
    aurocs = {}
    if args.judges:
        judged = ["gold", "proxy_seed1", "preference_proxy", *judge_specs()]
        aurocs = matched_auroc(records, {name: rewards[name] for name in judged})
        print(f"{'reward':<28} {'pairwise (hpdv2)':>16} {'AUROC matched':>14}")
        for name in judged:
            print(f"{name:<28} {table[name]['hpdv2']:>16.3f} {aurocs[name]:>14.3f}")
    result = {"auroc_matched": aurocs, "pairs": len(records), "prompts": args.prompts, "samples_per_prompt": args.samples,
              "members": folders, "accuracy": table, "seconds": round(time.perf_counter() - start, 1),
              "load_average": [load, os.getloadavg()]}
    (out / "agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
