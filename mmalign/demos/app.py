"""A demo by name, its models loaded from what the user named (``mmalign demo NAME`` and the tests share this):
the embedded world by default, any pipeline, run folder or reward spec when given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmalign.demos import DEMOS
from mmalign.demos.launch import DEFAULT_LIMITS, Limits
from mmalign.demos.scoring import load_sampler
from mmalign.eval.scoring import build_rewards
from mmalign.rewards import build

__all__ = ["build_demo"]


def build_demo(name: str, pipeline: str = "world", runs: Sequence[str] = (), rewards: Sequence[Any] = (),
               device: str = "cpu", limits: Limits = DEFAULT_LIMITS, allowed_dirs: Sequence[str] = (),
               steps: int | None = None, guidance_scale: float | None = None, max_iterations: int = 50):
    """The ``gr.Blocks`` of demo ``name``. ``pipeline``: 'world', a hub id or folder ('none': the rewards demo
    scores uploads only); ``runs``: the compare demo's run folders; ``rewards``: reward specs (the rewards demo
    scores with all, ReNO optimises their weighted sum); ``steps`` / ``guidance_scale``: the sampler's."""
    if name == "rewards":
        from mmalign.demos.rewards_demo import DEFAULT_REWARDS, build_rewards_demo

        sampler = None if pipeline == "none" else load_sampler(pipeline, device=device, num_steps=steps,
                                                                guidance_scale=guidance_scale)
        return build_rewards_demo(sampler, build_rewards(list(rewards) or DEFAULT_REWARDS, device), limits,
                                  allowed_dirs)
    if name == "reno":
        from mmalign.demos.reno_demo import DEFAULT_REWARD, build_reno_demo

        if pipeline == "none":
            raise ValueError("--pipeline: the reno demo needs a generator, got 'none'")
        specs = list(rewards) or [DEFAULT_REWARD]
        reward = build(specs if len(specs) > 1 else specs[0]).to(device)
        sampler = load_sampler(pipeline, device=device, guidance_scale=5.0 if guidance_scale is None else guidance_scale)
        return build_reno_demo(sampler, reward, max_iterations, num_steps=steps or 4)
    if name == "compare":
        from mmalign.demos.compare_demo import build_compare_demo

        if not runs:
            raise ValueError("--run: the compare demo needs a training run folder (e.g. runs/shapes-backprop)")
        return build_compare_demo(runs, device, limits.max_images)
    raise ValueError(f"demo: expected one of {', '.join(DEMOS)}, got {name!r}")
