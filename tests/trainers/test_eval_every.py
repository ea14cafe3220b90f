"""``eval_every``: held-out evaluations during training (over-optimisation curves), on the tiny pipeline."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from brightness import Brightness  # noqa: E402
from diffusion_run import config  # noqa: E402

from mmalign.eval import report as report_module  # noqa: E402
from mmalign.eval.report import curves_figure, plot_curves, read_metrics  # noqa: E402
from mmalign.rewards import register  # noqa: E402
from mmalign.trainers.lora import trainable_state  # noqa: E402
from mmalign.trainers.prdp import PRDPConfig, PRDPTrainer  # noqa: E402

EVAL = {"prompts": {"world": "heldout", "n": 3, "seed": 1}, "samples_per_prompt": 2, "rewards": ["brightness"]}


def eval_config(out: Path, epochs: int, **overrides) -> PRDPConfig:
    """The tiny PRDP run (trained on ``jpeg_incompressibility``), brightness as the eval reward."""
    register("brightness", Brightness)
    return PRDPConfig.model_validate({**config(str(out), epochs).model_dump(), "eval": EVAL, **overrides})


def train(cfg: PRDPConfig, tiny_sd_factory) -> PRDPTrainer:
    trainer = PRDPTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
    trainer.train()
    return trainer


def lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_eval_rows_and_training_is_the_same_with_eval_on_or_off(tmp_path, tiny_sd_factory):
    common = {"ema_decay": 0.9}  # the evaluation swaps the EMA weights in and back
    off = train(eval_config(tmp_path / "off", 2, **common), tiny_sd_factory)
    on = train(eval_config(tmp_path / "on", 2, eval_every=1, **common), tiny_sd_factory)
    weights_off, weights_on = trainable_state(off.loop.raw_denoiser), trainable_state(on.loop.raw_denoiser)
    assert weights_off.keys() == weights_on.keys()
    for name in weights_off:
        assert torch.equal(weights_off[name], weights_on[name]), name

    assert not any("eval" in r for r in lines(tmp_path / "off"))
    rows = lines(tmp_path / "on")
    # before the first epoch, then after each: separate rows, marked, between the training rows
    assert [(r.get("eval", False), r["epoch"], r["step"]) for r in rows] == [
        (True, 0, 0), (False, 0, 2), (True, 1, 2), (False, 1, 4), (True, 2, 4)]
    strip = lambda r: {k: v for k, v in r.items() if k != "samples_per_s"}  # noqa: E731
    assert [strip(r) for r in read_metrics(tmp_path / "on" / "metrics.jsonl")] == [
        strip(r) for r in read_metrics(tmp_path / "off" / "metrics.jsonl")]  # the training rows are unchanged
    evals = read_metrics(tmp_path / "on" / "metrics.jsonl", "step", "eval")
    assert [r["step"] for r in evals] == [0, 2, 4]
    for row in evals:
        for key in ("eval/reward", "eval/reward/std", "eval/brightness", "eval/brightness/std",
                    "eval/distance_to_reference"):
            assert torch.isfinite(torch.tensor(float(row[key]))), (key, row[key])
    assert evals[0]["eval/distance_to_reference"] == 0.0  # the base policy is π_ref: the same samples
    assert evals[-1]["eval/distance_to_reference"] > 0.0
    assert evals[0]["eval/kl_to_reference"] == 0.0 < evals[-1]["eval/kl_to_reference"]  # LoRA B = 0 at the start
    assert evals[-1]["eval/reward"] != evals[0]["eval/reward"]
    assert all(r["eval/diversity/color_entropy"] > 0 for r in evals)  # pixel metrics: no image tower here
    assert not any("eval/diversity/vendi" in r for r in evals)


def test_eval_cadence_and_sources(tmp_path, tiny_sd_factory):
    trainer = PRDPTrainer(eval_config(tmp_path / "run", 5, eval_every=2), pipeline=None, progress=False)
    assert [e for e in range(6) if trainer.loop._eval_due(e)] == [0, 2, 4, 5]  # every 2, and the last
    off = PRDPTrainer(eval_config(tmp_path / "run", 5), pipeline=None, progress=False)
    assert not any(off.loop._eval_due(e) for e in range(6))
    with pytest.raises(ValueError, match="eval_every: needs eval.prompts"):
        eval_config(tmp_path / "run", 5, eval_every=2, eval={"samples_per_prompt": 2})
    report = {"prompts": {"world": "heldout", "n": 4, "seed": 1}, "rewards": ["brightness"]}
    cfg = eval_config(tmp_path / "run", 5, eval_every=2, eval={"max_prompts": 2}, report=report)
    assert cfg.eval.prompts is None and cfg.eval.rewards is None  # the report's prompts (the first 2) and rewards


def test_a_resumed_run_keeps_one_eval_row_per_step_and_the_report_plots_them(tmp_path, tiny_sd_factory, monkeypatch):
    report = {"prompts": {"world": "heldout", "n": 2, "seed": 1}, "samples_per_prompt": 2, "rewards": [],
              "grid_prompts": 0}
    cfg = eval_config(tmp_path / "run", 3, eval_every=1, lora=None, learning_rate=3e-3, report=report)
    first = PRDPTrainer(cfg, pipeline=tiny_sd_factory(seed=0), progress=False)
    first.setup()
    save = first.loop.save_checkpoint

    def save_then_crash(epoch: int) -> None:
        if epoch == 2:  # epoch 2 trained, logged and evaluated, but not checkpointed
            raise RuntimeError("killed")
        save(epoch)

    first.loop.save_checkpoint = save_then_crash
    with pytest.raises(RuntimeError, match="killed"):
        first.train()
    second = train(cfg, tiny_sd_factory)  # resumes after epoch 1: epoch 2 and its evaluation again
    rows = lines(tmp_path / "run")
    assert [(r.get("eval", False), r["epoch"]) for r in rows] == [
        (True, 0), (False, 0), (True, 1), (False, 1), (True, 2), (False, 2), (True, 3), (False, 2), (True, 3)]
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert [r["epoch"] for r in read_metrics(metrics)] == [0, 1, 2]
    evals = read_metrics(metrics, "step", "eval")
    assert [r["epoch"] for r in evals] == [0, 1, 2, 3] and [r["step"] for r in evals] == [0, 2, 4, 6]
    assert evals[0]["eval/distance_to_reference"] == 0.0 < evals[-1]["eval/distance_to_reference"]  # full FT

    titles = []
    figure = report_module.curves_figure

    def spy(*args, **kwargs):
        fig = figure(*args, **kwargs)
        titles.append([ax.get_title() for ax in fig.axes])
        return fig

    monkeypatch.setattr(report_module, "curves_figure", spy)
    summary = second.report()
    assert summary["curves"] == "curves.png" and (tmp_path / "run" / "curves.png").is_file()
    assert titles and "held-out eval: rewards" in titles[0] and "held-out: distance to reference" in titles[0]


def test_the_eval_panel_marks_where_gold_peaked(tmp_path):
    """Synthetic rows: the proxy climbs, gold peaks at step 20 and turns."""
    train_rows = [{"epoch": e, "step": 10 * (e + 1), "reward/mean": 0.5 + 0.01 * e, "loss": 1.0} for e in range(6)]
    gold = [0.70, 0.74, 0.76, 0.73, 0.70, 0.66, 0.62]
    eval_rows = [{"eval": True, "epoch": e, "step": 10 * e, "eval/reward": 0.50 + 0.02 * e, "eval/reward/std": 0.05,
                  "eval/gold": g, "eval/gold/std": 0.1, "eval/gold/background": g, "eval/proxy": 0.6 + 0.01 * e,
                  "eval/proxy/std": 0.05, "eval/distance_to_reference": 0.01 * e, "eval/diversity/vendi": 2 - 0.1 * e}
                 for e, g in enumerate(gold)]
    fig = curves_figure(train_rows, ["reward", "loss"], "epoch", eval_rows)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["reward", "loss", "held-out eval: trained reward vs gold", "held-out: distance to reference",
                      "held-out: diversity (Vendi)"]
    with_kl = [{**row, "eval/kl_to_reference": 0.5 * e * e} for e, row in enumerate(eval_rows)]
    kl_panel = curves_figure(train_rows, ["reward"], "epoch", with_kl).axes[2]
    assert kl_panel.get_title() == "held-out eval: trained reward vs gold, against KL"
    assert kl_panel.get_xlabel().startswith("KL") and list(kl_panel.get_lines()[1].get_xdata()) == [
        0.5 * e * e for e in range(len(gold))]
    assert "gold peak: 2 nats (0.76)" in [t.get_text() for t in kl_panel.get_legend().get_texts()]
    panel = fig.axes[2]
    legend = [t.get_text() for t in panel.get_legend().get_texts()]
    assert legend == ["reward (trained): 0.5 → 0.62", "gold: 0.7 → 0.62", "proxy: 0.6 → 0.66",
                      "gold peak: step 20 (0.76)"]
    gold_line = panel.get_lines()[1]
    assert list(gold_line.get_ydata()) == pytest.approx([(g - 0.70) / 0.1 for g in gold])  # in base SDs
    import matplotlib.pyplot as plt

    plt.close(fig)
    path = plot_curves(train_rows, ["reward", "loss"], tmp_path / "curves.png", "epoch", eval_rows)
    assert path.is_file()
    assert plot_curves([], ["reward"], tmp_path / "only-eval.png", "epoch", eval_rows).is_file()
    assert plot_curves([], ["reward"], tmp_path / "none.png") is None


def test_kl_to_reference_is_the_chains_log_ratio_under_both_gaussians(tiny_sd_factory):
    """``evaluate_generator``'s per-sample KL against Σ_t log N(x_{t−1}; μ_θ, σ_t) − log N(x_{t−1}; μ_ref, σ_t) by
    ``torch.distributions`` on the same seeds' trajectories, with the reference a different UNet."""
    from contextlib import nullcontext

    from mmalign.eval.generator import evaluate_generator
    from mmalign.models.ddim import DDIMPolicy
    from mmalign.models.rollout import sample_trajectories
    from mmalign.models.stable_diffusion import StableDiffusionAdapter

    pipe, reference = tiny_sd_factory(seed=0), tiny_sd_factory(seed=0).unet
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    adapter = StableDiffusionAdapter(pipe, 3.0)
    policy = DDIMPolicy(pipe.scheduler.config, 4, 1.0)
    prompts = [("a red circle", {}), ("a blue square", {})]
    result = evaluate_generator(adapter, policy, prompts, {}, 2, seed=7, progress=False,
                                reference=lambda: nullcontext(reference))
    rows = [text for text, _ in prompts for _ in range(2)]
    trajectory = sample_trajectories(adapter, policy, rows, None, torch.Generator().manual_seed(7))
    expected = torch.zeros(len(rows), dtype=torch.float64)
    with torch.no_grad():
        for t in range(policy.num_steps):
            x, prev = trajectory.latents[:, t], trajectory.latents[:, t + 1]
            timestep = trajectory.timesteps[t]
            means = [policy.step(adapter.model_output(unet, x, timestep, trajectory.embeds), x, t, prev_sample=prev).mean
                     for unet in (pipe.unet, reference)]
            std = policy.stds[t]
            for mean, sign in zip(means, (1, -1)):
                normal = torch.distributions.Normal(mean.double(), std)
                expected += sign * normal.log_prob(prev.double()).flatten(1).sum(1)
    kl = result.scores["kl_to_reference"].double()
    assert kl.shape == (4,) and bool((kl != 0).all())
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-3)
    # a deterministic sampler has no chain densities: no KL column
    deterministic = evaluate_generator(adapter, DDIMPolicy(pipe.scheduler.config, 4, 0.0), prompts, {}, 1,
                                       progress=False, reference=lambda: nullcontext(reference))
    assert "kl_to_reference" not in deterministic.scores
