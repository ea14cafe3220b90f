"""`mmalign optimize` on the shipped world: the run folder, best-of-N at equal reward calls, ensembles held."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.config import load_recipe
from mmalign.inference.report import returned_so_far
from mmalign.inference.run import draw_seed, run_reno

SMALL = ["prompts.n=3", "iterations=3", "batch_size=2", "num_steps=2", "grid_prompts=3", "calibration_samples=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reno")
    recipe = load_recipe("shapes-reno", [*SMALL, f"output_dir={out}"])
    return out, run_reno(recipe, progress=False)


def test_run_folder_and_summary(run):
    out, summary = run
    for name in ("summary.json", "grid.png", "traces.png", "noise.safetensors", "config.json", "images/0002_reno.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary["rewards"]) == {"reward", "gold", "proxy", "preference_proxy"}
    assert summary["prompts"] == 3 and summary["iterations"] == 3 and len(summary["per_prompt"]) == 3
    for row in summary["per_prompt"]:
        assert row["reward/reno"] >= row["reward/initial"]
        assert row["reward/best_of_n"] >= row["reward/initial"] - 1e-5  # draw 0 is ReNO's initial noise
    traces = load_file(out / "traces.safetensors")
    assert traces["reward"].shape == traces["gold"].shape == (3, 3)  # (iterations, prompts)
    noise = load_file(out / "noise.safetensors")
    assert noise["initial"].shape == noise["best"].shape == (3, 12, 16, 16)


def test_initial_noise_does_not_depend_on_the_batch_layout(run, tmp_path):
    """The same prompts in batches of 1: the same initial noise (seeded per prompt) and initial reward."""
    out, summary = run
    recipe = load_recipe("shapes-reno", [*SMALL, "batch_size=1", "iterations=1", "best_of_n=false",
                                         "report_rewards=[]", f"output_dir={tmp_path}"])
    alone = run_reno(recipe, progress=False)
    assert torch.equal(load_file(tmp_path / "noise.safetensors")["initial"], load_file(out / "noise.safetensors")["initial"])
    for a, b in zip(alone["per_prompt"], summary["per_prompt"]):
        assert a["reward/initial"] == pytest.approx(b["reward/initial"], abs=1e-5)
    assert len({draw_seed(0, i, j) for i in range(4) for j in range(4)}) == 16


def test_a_single_reward_without_an_ensemble(tmp_path):
    recipe = load_recipe("shapes-reno", [*SMALL, "reward=[{name: preference_proxy, scale: 1.0}]", "report_rewards=[]",
                                         f"output_dir={tmp_path}"])
    summary = run_reno(recipe, progress=False)
    assert summary["rewards"]["reward"]["reno"]["mean"] >= summary["rewards"]["reward"]["initial"]["mean"]


def test_returned_so_far_follows_the_best_by_reward():
    reward = torch.tensor([[1.0, 5.0], [3.0, float("nan")], [2.0, 6.0]])
    gold = torch.tensor([[0.1, 0.5], [0.3, 0.9], [0.2, 0.6]])
    torch.testing.assert_close(returned_so_far(reward, gold), torch.tensor([[0.1, 0.5], [0.3, 0.5], [0.3, 0.6]]))


def test_cli_prints_the_table_and_refuses_other_tasks(tmp_path, capsys):
    assert main(["optimize", "shapes-reno", *SMALL, "report_rewards=[gold]", f"output_dir={tmp_path}", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "gold:" in printed and "best-of-N" in printed and "grid.png" in printed
    assert main(["optimize", "shapes-backprop"]) == 2
    assert "not noise optimisation" in capsys.readouterr().err


def test_bench_prints_both_modes_and_the_ratio(capsys):
    assert main(["bench", "optimize", "--prompts", "2", "--iterations", "2", "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "one prompt at a time" in printed and "batched / loop" in printed


def test_video_recipe_optimises_clips_and_writes_them(tmp_path):
    """shapes-video-reno, small: the noise keeps the frame axis, clips are saved as GIFs, the grid plays."""
    recipe = load_recipe("shapes-video-reno", ["prompts.n=2", "iterations=2", "batch_size=2", "num_steps=2",
                                                "video.num_frames=4", f"output_dir={tmp_path}"])
    summary = run_reno(recipe, progress=False)
    assert set(summary["rewards"]) == {"reward", "gold_video", "frame_aggregate", "motion_proxy"}
    for row in summary["per_prompt"]:
        assert row["reward/reno"] >= row["reward/initial"]
    assert load_file(tmp_path / "noise.safetensors")["best"].shape == (2, 12, 4, 16, 16)  # (B, C, F, h, w)
    for name in ("grid.png", "grid.gif", "images/0001_reno.gif", "images/0000_best_of_n.gif"):
        assert (tmp_path / name).is_file(), name
    from PIL import Image

    with Image.open(tmp_path / "images/0001_reno.gif") as clip:
        assert clip.n_frames == 4 and clip.size == (32, 32)  # the clip itself, frame by frame
