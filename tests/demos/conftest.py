"""Demo fixtures: the world generator and rewards loaded once, and a tiny real training run folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def world_sampler():
    from mmalign.demos.scoring import load_sampler

    return load_sampler("world", num_steps=8)


@pytest.fixture(scope="session")
def demo_rewards():
    from mmalign.demos.rewards_demo import DEFAULT_REWARDS
    from mmalign.eval.scoring import build_rewards

    return build_rewards(DEFAULT_REWARDS)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A real run folder of ``mmalign train shapes-backprop``, shrunk to seconds: two epochs of two prompts, a
    high learning rate so that the aligned model differs from its base, a two-prompt report."""
    from mmalign.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny-backprop"
    status = main(["train", "--quiet", "shapes-backprop", "epochs=2", "prompts_per_epoch=2", "samples_per_prompt=2",
                   "prompts_per_update=2", "num_steps=4", "grad_steps=2", "learning_rate=0.05", "eval_every=null",
                   "report.prompts.n=2", "report.samples_per_prompt=2", "report.grid_prompts=2",
                   f"output_dir={out}"])
    assert status == 0
    return out
