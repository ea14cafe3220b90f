import torch

from mmalign.trainers.bench import SavedTensorMeter, bench_prdp_update, format_train_rows


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
    assert "mem vs whole" in format_train_rows(rows)


def test_the_algorithms_run_side_by_side_at_equal_batch(tiny_sd_factory):
    from mmalign.trainers.bench import bench_algorithms, format_algorithm_rows

    rows = bench_algorithms(lambda: tiny_sd_factory(seed=0), prompts=2, samples_per_prompt=2, num_steps=2, epochs=2)
    assert [r.task for r in rows] == ["prdp", "ddpo", "diffusion_grpo"]
    assert all(r.samples == 4 and r.samples_per_s > 0 and r.peak_saved_mb > 0 for r in rows)
    table = format_algorithm_rows(rows)
    assert all(task in table for task in ("prdp", "ddpo", "diffusion_grpo"))
