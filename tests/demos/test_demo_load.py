"""The load benchmark runs end to end on a few requests: every request succeeds (timings are printed, never
asserted)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("gradio")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "demo_load.py"


def test_concurrent_requests_all_succeed(capsys):
    spec = importlib.util.spec_from_file_location("demo_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--requests", "4", "--images", "1", "--steps", "4"])
    assert result["failed"] == 0 and result["succeeded"] == 4
    assert "latency p50" in capsys.readouterr().out
