"""The trainer comparison's table builder on fake run folders: paired changes against the base, gold per sample,
the curves' samples axis and CIs, unfinished runs left out, the files written."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "world_trainer_comparison.py"


@pytest.fixture(scope="module")
def comparison():
    spec = importlib.util.spec_from_file_location("world_trainer_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _eval_file(path: Path, rng: np.random.Generator, shift: float) -> dict:
    scores = {k: list(rng.uniform(0, 1, 8) + shift) for k in ("gold", "preference_proxy/cosine", "proxy/cosine")}
    data = {"scores": scores, "diversity": {"diversity/vendi": list(rng.uniform(1, 3, 2) + shift)}}
    path.write_text(json.dumps(data))
    return data


def _run_folder(run: Path, rng: np.random.Generator, shift: float) -> dict:
    run.mkdir(parents=True)
    ci = {"mean": 0.01, "ci_low": -0.01, "ci_high": 0.03, "n": 8}
    (run / "summary.json").write_text(json.dumps({
        "before": {"gold": {"mean": 0.7}}, "paired_change": {"gold": ci, "reward": ci}, "diversity_ratio": 0.9}))
    rows = [{"eval": True, "epoch": 0, "eval/gold": 0.70, "eval/gold/std": 0.2, "eval/reward": 0.4},
            {"epoch": 0, "reward/mean": 0.5},
            {"eval": True, "epoch": 20, "eval/gold": 0.72, "eval/gold/std": 0.1, "eval/reward": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "timing.json").write_text(json.dumps({"wall_s": 120.0, "cpu_s": 90.0, "attempts": 2}))
    return _eval_file(run / "common_eval.json", rng, shift)


def test_table_is_paired_against_the_base_and_leaves_unfinished_runs_out(comparison, tmp_path):
    rng = np.random.default_rng(0)
    base = _eval_file(tmp_path / "base_common_eval.json", rng, 0.0)
    shipped = comparison.Setting("nft", "DiffusionNFT", "shapes-nft")
    screened = comparison.Setting("nft-beta0.3", "DiffusionNFT", "shapes-nft", ("beta=0.3",), 20, "β 0.3")
    unfinished = comparison.Setting("ddpo", "DDPO", "shapes-ddpo")
    after = _run_folder(tmp_path / "nft", rng, 0.05)
    _run_folder(tmp_path / "nft-beta0.3", rng, 0.02)
    (tmp_path / "ddpo").mkdir()  # started, no summary.json
    _run_folder(tmp_path / "earlier" / "ddpo", rng, -0.01)

    rows = comparison.write_table(tmp_path, [shipped, screened, unfinished], tmp_path / "curves.png",
                                  tmp_path / "earlier")

    assert [(r["name"], r["source"]) for r in rows] == [("nft", "this grid"), ("nft-beta0.3", "this grid"),
                                                        ("ddpo", "earlier run")]
    differences = np.subtract(after["scores"]["gold"], base["scores"]["gold"])
    gold = rows[0]["common"]["gold"]
    half = 1.96 * differences.std(ddof=1) / math.sqrt(len(differences))
    assert gold["mean"] == pytest.approx(differences.mean())
    assert gold["ci_high"] - gold["mean"] == pytest.approx(half)
    assert rows[0]["samples"] == 2560 and rows[1]["samples"] == 1280
    assert rows[0]["gold_per_1k_samples"] == pytest.approx(differences.mean() / 2.56)
    assert rows[0]["vendi_ratio"] == pytest.approx(np.mean(after["diversity"]["diversity/vendi"])
                                                   / np.mean(base["diversity"]["diversity/vendi"]))
    assert [p["samples"] for p in rows[0]["curve"]] == [0, 20 * 64]  # the training row is not a curve point
    assert rows[0]["curve"][1]["ci"] == pytest.approx(1.96 * 0.1 / math.sqrt(32))
    assert rows[0]["wall_s"] == 120.0 and "epochs=40" in rows[0]["command"] and "beta=0.3" in rows[1]["command"]

    table = (tmp_path / "comparison.md").read_text()
    assert "`nft-beta0.3`" in table and "| DDPO (`ddpo`) | shipped | earlier run |" in table
    assert json.loads((tmp_path / "comparison.json").read_text())["runs"][1]["lever"] == "β 0.3"
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_change_refuses_unpaired_lengths(comparison):
    with pytest.raises(ValueError, match="8 values after against 7 before"):
        comparison._paired([0.0] * 8, [0.0] * 7)
