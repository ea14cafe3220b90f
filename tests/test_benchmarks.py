"""The benchmark scripts run end to end on tiny sizes, so a refactor that moves what they import cannot break
them unnoticed (they import inside ``main`` and nothing else imports them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_world_best_of_k_prints_its_table(tmp_path, capsys):
    result = _script("world_best_of_k").main(["--prompts", "2", "--samples", "2", "--batch", "4",
                                             "--out", str(tmp_path / "table.json")])
    assert result["prompts"] == 2 and set(result["best_of_k"]) == {"gold", "proxy", "preference_proxy"}
    assert (tmp_path / "table.json").is_file() and "best-of-2" in capsys.readouterr().out


def test_world_reward_agreement_scores_every_member(tmp_path):
    result = _script("world_reward_agreement").main(["--out", str(tmp_path), "--prompts", "8", "--samples", "3",
                                                    "--members", "2", "--proxy-steps", "1"])
    assert {"gold", "proxy_seed1", "proxy_seed2", "ensemble_mean"} <= set(result["accuracy"])


def test_world_seed_dependence_counts_every_check(capsys):
    result = _script("world_seed_dependence").main(["--prompts", "3", "--samples", "2", "--batch", "6"])
    checks = sum(sum(row.values()) for row in result["checks"].values())
    assert checks > 0 and set(next(iter(result["checks"].values()))) == {"always", "never", "seed"}
    assert "by seed" in capsys.readouterr().out


def test_world_artifact_classifier_scores_every_kind(tmp_path, capsys):
    from mmalign.rewards.corruptions import CORRUPTIONS

    result = _script("world_artifact_classifier").main(["--train-kinds", "grid", "banding", "--train-images", "8",
                                                       "--test-images", "2", "--steps", "2", "--work", str(tmp_path)])
    assert set(result["kinds"]) == set(CORRUPTIONS) and result["kinds"]["grid"]["trained"]
    assert not result["kinds"]["duplicate"]["trained"] and (tmp_path / "head" / "head.safetensors").is_file()
    assert "held out  AUROC" in capsys.readouterr().out


def test_vlm_grpo_overhead_times_both_trainers_and_finds_the_same_weights(capsys):
    result = _script("vlm_grpo_overhead").main(["--steps", "2", "--repeats", "1", "--batch", "8",
                                               "--generations", "4"])
    assert result["steps_timed"] == {"stock": 1, "mmalign": 1}
    assert result["ratio"] == result["seconds_per_step"]["mmalign"] / result["seconds_per_step"]["stock"]
    assert result["max_weight_difference"] == 0.0  # with its additions off, the subclass trains what TRL trains
    assert "ratio mmalign / stock" in capsys.readouterr().out
