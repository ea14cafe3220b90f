import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from diffusion_run import Brightness  # noqa: E402

from mmalign.rewards import register  # noqa: E402
from mmalign.trainers.bench import (  # noqa: E402
    DEFAULT_VARIANTS,
    SavedTensorMeter,
    bench_algorithms,
    bench_prdp_update,
    format_algorithm_rows,
    format_train_rows,
)


def test_meter_counts_tensors_saved_for_backward():
    a = torch.randn(1000, requires_grad=True)
    b = torch.randn(1000, requires_grad=True)
    with SavedTensorMeter() as meter:
        z = (a * b).sum()  # mul saves both operands: 2 × 4000 bytes
    assert meter.peak == 8000 and meter.current == 8000
    z.backward()
    del z
    assert meter.current == 0


def test_per_timestep_backward_holds_one_step(tiny_sd_factory):
    rows = bench_prdp_update(tiny_sd_factory(seed=0), group_sizes=(2,), num_steps=3)
    light, whole = rows
    assert (light.path, whole.path) == ("per-timestep", "whole-graph")
    assert 0.25 < light.peak_saved_mb / whole.peak_saved_mb < 0.45  # ≈ 1/T with T = 3
    table = format_train_rows(rows)
    assert "against whole-graph" in table and "mem ×" in table


@pytest.fixture(scope="module")
def algorithm_rows():
    from tiny_models import make_tiny_sd_pipeline

    register("brightness", Brightness)
    return bench_algorithms(lambda: make_tiny_sd_pipeline(seed=0), prompts=2, samples_per_prompt=2, num_steps=2,
                            epochs=2, differentiable_reward="brightness")


def test_the_algorithms_run_side_by_side_at_equal_batch(algorithm_rows):
    rows = algorithm_rows
    assert [r.task for r in rows] == list(DEFAULT_VARIANTS)
    assert DEFAULT_VARIANTS[:3] == ("prdp", "ddpo", "diffusion_grpo")
    for r in rows:
        figures = (r.seconds, r.samples_per_s, r.update.seconds, r.update.samples_per_s, r.update.grad_norm)
        assert r.samples == r.update.samples == 4 and all(math.isfinite(x) and x > 0 for x in figures), r
        assert math.isfinite(r.peak_saved_mb) and r.peak_saved_mb >= 0
        if not r.task.endswith("+ckpt"):  # inside checkpoints the meter sees nothing (the module docstring)
            assert r.peak_saved_mb > 0
    table = format_algorithm_rows(rows)
    assert all(r.task in table for r in rows)
    updates = format_train_rows([r.update for r in rows], "prdp")
    assert "against prdp" in updates and "grad norm" in updates and "nan" not in updates


@pytest.mark.parametrize("variant", ["draft-all", "direct-align"])
def test_checkpointing_gives_the_same_gradient_in_less_memory(algorithm_rows, variant):
    rows = {r.task: r for r in algorithm_rows}
    plain, checkpointed = rows[variant].update, rows[variant + "+ckpt"].update
    assert checkpointed.grad_norm == pytest.approx(plain.grad_norm, rel=1e-6)
    assert checkpointed.peak_saved_mb < plain.peak_saved_mb


def test_the_update_table_adds_cuda_columns_where_measured():
    from mmalign.trainers.bench import TrainBenchRow

    rows = [TrainBenchRow("prdp", 8, 2.0, 10.0, 400.0, 1.0), TrainBenchRow("draft-all", 8, 1.0, 50.0, 1000.0, 2.0)]
    table = format_train_rows(rows, "prdp")
    assert "CUDA ×" in table and "2.50x" in table and "5.00x" in table and "2.00x" in table  # CUDA, saved, speed
