"""The attention benchmark's tooling, in its CPU smoke mode (GPU numbers need a GPU)."""

import json

import pytest
import torch

from mmalign.kernels.bench import SMOKE_CASES, Case, main


def test_flop_count():
    case = Case("s", "n", batch=2, heads=3, n_q=5, n_k=7, head_dim=8)
    assert case.flops(backward=False) == 4 * 2 * 3 * 5 * 7 * 8
    assert case.flops(backward=True) == 3.5 * case.flops(backward=False)
    assert Case("s", "n", 2, 3, 5, 7, 8, causal=True).flops(False) == case.flops(False) / 2


def test_smoke_run_writes_tagged_results(tmp_path, capsys):
    assert main(["--smoke", "--warmup", "0", "--reps", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "smoke cross d80 64x77" in printed and "UNet train step tiny" in printed
    csv_path, json_path = sorted(tmp_path.iterdir())
    assert csv_path.suffix == ".csv" and json_path.suffix == ".json"
    result = json.loads(json_path.read_text())
    assert result["environment"]["device"] and result["environment"]["torch"]
    assert [row["name"] for row in result["rows"]] == [case.name for case in SMOKE_CASES]
    assert all(row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 for row in result["rows"])
    assert [row["backend"] for row in result["end_to_end"]] == ["stock-sdpa", "mmalign-sdpa"]
    assert len(csv_path.read_text().splitlines()) == 1 + len(SMOKE_CASES)


def test_smoke_run_with_the_kernel(flash, tmp_path):
    if not flash.INTERPRETED:
        pytest.skip("smoke mode runs on the CPU, where only the interpreter runs the kernel")
    argv = ["--smoke", "--no-e2e", "--warmup", "0", "--reps", "1", "--out", str(tmp_path)]
    assert main([*argv, "--backend", "mmalign-triton"]) == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert all(row["backend"] == "mmalign-triton" and row["max_abs_diff_vs_sdpa"] < 1e-5 for row in result["rows"])


def test_refuses_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["--no-e2e"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
