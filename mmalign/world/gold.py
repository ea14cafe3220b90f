"""The ``gold`` reward: the shapes world's verifier as a reward, the ground truth a learned proxy is judged by.

It reads the structured scene of each sample from ``batch.metadata[i]["scene"]`` (a ``Scene`` or its dict,
as ``read_prompts`` and ``MediaBatch.from_folder`` with a ``prompts.jsonl`` provide it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mmalign.media import MediaBatch
from mmalign.rewards.base import Reward, RewardOutput
from mmalign.world.verify import verify_batch

__all__ = ["ATTRIBUTE_KINDS", "GoldReward", "kind_components"]

#: Kinds of checks, the names of the reward's components.
ATTRIBUTE_KINDS: tuple[str, ...] = ("colour", "shape", "position", "size", "count", "relation", "background")


class GoldReward(Reward):
    """Gold verifier: fraction of the prompt's attributes (colour, shape, position, count, ...) an image satisfies.

    Components hold, per kind of attribute, the fraction of that kind's checks passed; a sample whose prompt
    states none of a kind (no position, say) gets 1 there, as nothing of that kind is wrong. ``info`` holds
    ``{kind}_rate``, the pass rate over the samples that state the kind, which is what to log.
    """

    name = "gold"
    scope = "sample"
    differentiable = False

    def forward(self, batch: MediaBatch) -> RewardOutput:
        if batch.is_video:
            raise ValueError(
                f"batch: the gold reward scores images, got videos of shape {tuple(batch.pixels.shape)}"
            )
        scenes = []
        for i, meta in enumerate(batch.metadata):
            if "scene" not in meta:
                raise ValueError(
                    f"metadata['scene']: the gold reward needs each sample's scene (a Scene or Scene.to_dict()), "
                    f"sample {i} has only the keys {sorted(meta)}"
                )
            scenes.append(meta["scene"])
        pixels = batch.pixels.detach().float()
        results = verify_batch(pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels, scenes)
        components, info = kind_components([r.checks for r in results], ATTRIBUTE_KINDS, batch.device)
        scores = torch.tensor([r.score for r in results], dtype=torch.float32, device=batch.device)
        return RewardOutput(scores, components, info=info)


def kind_components(checks: Sequence[Mapping[str, float]], kinds: Sequence[str], device: torch.device | str):
    """``(components, info)`` of per-sample checks named ``...{kind}`` (each a pass, or a pass rate in [0, 1]):
    per kind the ``(B,)`` mean over that sample's checks of the kind (1 where it states none), and
    ``{kind}_rate`` over the samples that state the kind."""
    tallies = [{kind: [0.0, 0] for kind in kinds} for _ in checks]  # [passed, stated]
    for sample, tally in zip(checks, tallies):
        for name, ok in sample.items():
            counts = tally[name.split(".")[-1]]
            counts[0] += float(ok)
            counts[1] += 1
    components, info = {}, {}
    for kind in kinds:
        rates = [t[kind][0] / t[kind][1] if t[kind][1] else 1.0 for t in tallies]
        components[kind] = torch.tensor(rates, dtype=torch.float32, device=device)
        stated = sum(t[kind][1] for t in tallies)
        if stated:
            info[f"{kind}_rate"] = sum(t[kind][0] for t in tallies) / stated
    return components, info
