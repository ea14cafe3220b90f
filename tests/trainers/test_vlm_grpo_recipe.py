"""The vlm_grpo recipe: validation, the run folder and report, resume, LoRA export, data sources, the CLI."""

import json

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_vlm

from mmalign.config import RecipeError, load_recipe, validate_recipe
from mmalign.eval.generator import GeneratorEval
from mmalign.media import MediaBatch
from mmalign.trainers.vlm_grpo.evaluate import kind_changes
from mmalign.trainers.vlm_grpo.recipe import (
    DataSource,
    HubVQASource,
    VLMGRPOConfig,
    VLMGRPORecipeTrainer,
    load_rows,
)
from mmalign.world.vqa import world_vqa_rows


def _config(out, steps=2, **overrides):
    values = dict(
        model="tiny",
        data={"world": {"n": 16, "seed": 0}},
        rewards=[{"name": "world_accuracy"}, {"name": "format", "think": False}],
        grpo={"num_generations": 2, "per_device_train_batch_size": 4, "max_steps": steps, "max_completion_length": 6,
              "learning_rate": 1e-2, "save_steps": 2},
        output_dir=str(out),
        report={"data": {"world": {"split": "heldout", "n": 6, "seed": 1}}, "batch_size": 4, "max_new_tokens": 6},
    )
    return VLMGRPOConfig(**{**values, **overrides})


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_recipe_errors_name_the_field():
    base = {"task": "vlm_grpo", "rewards": ["format"]}
    with pytest.raises(RecipeError, match="'num_generation' is not a trl.GRPOConfig field \\(did you mean 'num_generations'\\?\\)"):
        validate_recipe({**base, "grpo": {"num_generation": 4}})
    with pytest.raises(RecipeError, match="'output_dir' is set by the recipe's `output_dir`"):
        validate_recipe({**base, "grpo": {"output_dir": "x"}})
    with pytest.raises(RecipeError, match="grpo.num_generations: GRPO needs at least 2 completions per prompt, got 1"):
        validate_recipe({**base, "grpo": {"num_generations": 1}})
    with pytest.raises(RecipeError, match="dynamic_sampling_rounds: per_device_train_batch_size × steps_per_generation \\(6\\)"):
        validate_recipe({**base, "dynamic_sampling_rounds": 1, "grpo": {"num_generations": 4, "per_device_train_batch_size": 6}})
    with pytest.raises(RecipeError, match="expected exactly one of `world: \\{...\\}` or `hub: \\{...\\}`"):
        validate_recipe({**base, "data": {"instruction": "x"}})
    with pytest.raises(RecipeError, match="rewards: `weight` has no meaning when `aggregate`"):
        validate_recipe({**base, "rewards": [{"name": "format", "weight": 2}], "aggregate": {"mode": "wco"}})
    with pytest.raises(RecipeError, match="rewards: List should have at least 1 item"):
        validate_recipe({"task": "vlm_grpo", "rewards": []})
    with pytest.raises(RecipeError, match="'learning_rate': expected a number, got 'fast'"):
        validate_recipe({**base, "grpo": {"learning_rate": "fast"}})
    recipe = load_recipe("shapes-vlm-grpo", ["grpo.multi_objective_aggregation=normalize_then_sum",
                                             "grpo.learning_rate=1e-4"])  # YAML reads 1e-4 as a string
    assert recipe.grpo_kwargs()["multi_objective_aggregation"] == "normalize_then_sum"
    assert recipe.grpo_kwargs()["learning_rate"] == 1e-4


def test_a_run_writes_its_folder_report_and_model_then_resumes(tmp_path):
    model, processor = make_tiny_vlm(seed=0)
    runner = VLMGRPORecipeTrainer(_config(tmp_path / "run"), model, processor, progress=False)
    runner.train()
    summary = runner.report()
    exported = runner.export()
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "before.json", "after.json", "summary.json", "curves.png", "grid.png"):
        assert (run / name).is_file(), name
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2]
    assert "rewards/world_accuracy/mean" in _rows(run / "metrics.jsonl")[0]
    logs, g = runner.trainer._logs, 2  # the last batch's rewards and advantages, by a loop over pairs
    vectors = list(zip(*(logs["rewards"][n] for n in ("world_accuracy", "format"))))
    pairs = [(i, j) for i in range(0, len(vectors), g) for j in range(i + 1, i + g) if vectors[i] != vectors[j]]
    tied = [abs(logs["advantages"][i] - logs["advantages"][j]) <= 1e-6 for i, j in pairs]
    last = _rows(run / "metrics.jsonl")[-1]["advantages/merged_pairs"]
    assert last == pytest.approx(sum(tied) / len(tied)) if pairs else last != last
    assert summary["steps"] == 2 and summary["report_rows"] == 6
    assert {"world_accuracy", "format", "world_accuracy/iou", "world_accuracy/colour"} <= set(summary["before"])
    for tag in ("before", "after"):
        assert summary[tag]["world_accuracy"]["n"] == 6 and 0 <= summary[tag]["format"]["mean"] <= 1
    assert summary["before"]["world_accuracy/colour"]["n"] == 1  # six held-out questions, kinds in turn
    assert json.loads((run / "summary.json").read_text())["change"].keys() == summary["change"].keys()
    paired = summary["paired_change"]["world_accuracy"]
    assert paired["n"] == 6 and paired["mean"] == pytest.approx(summary["change"]["world_accuracy"])
    assert (run / "checkpoints" / "checkpoint-2").is_dir()
    by_kind = json.loads((run / "summary.json").read_text())["by_kind"]
    assert list(by_kind["kinds"]) == list(dict.fromkeys(r["kind"] for r in world_vqa_rows(6, "heldout", 1)))
    assert by_kind["overall"]["paired_change"] == pytest.approx(paired)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    reloaded = AutoModelForImageTextToText.from_pretrained(exported)
    AutoProcessor.from_pretrained(exported)
    trained = runner.trainer.accelerator.unwrap_model(runner.trainer.model).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in reloaded.state_dict().items())

    before = (run / "before.json").read_text()
    model, processor = make_tiny_vlm(seed=0)
    again = VLMGRPORecipeTrainer(_config(run, steps=3), model, processor, progress=False)
    again.train()
    assert again.trainer.state.global_step == 3
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2, 3]
    assert (run / "before.json").read_text() == before  # the untrained policy's answers are kept
    assert again.report()["steps"] == 3


def _eval(columns):
    n = len(next(iter(columns.values())))
    return GeneratorEval(MediaBatch(torch.zeros(n, 3, 2, 2), ["q"] * n), {k: torch.tensor(v) for k, v in columns.items()})


def test_kind_changes_call_a_kind_rose_or_fell_only_when_its_paired_interval_excludes_zero():
    nan = float("nan")
    kinds = ["shape"] * 6 + ["count"] * 6 + ["colour"] * 6
    before = [0, 0, 0, 0, 0, 1] + [1, 1, 1, 1, 1, 0] + [0, 1, 0, 1, 0, 1]
    after = [1, 1, 1, 1, 1, 1] + [0, 0, 0, 0, 1, 0] + [1, 0, 0, 1, 0, 1]
    def columns(values):
        return {"acc": values, **{f"acc/{k}": [v if kk == k else nan for v, kk in zip(values, kinds)]
                                                    for k in ("shape", "count", "colour")}}
    out = kind_changes(_eval(columns(before)), _eval(columns(after)), "acc", ["shape", "count", "colour"])

    def reference(index):  # mean ± 1.96 · sample std / sqrt(n) of the per-question differences
        d = np.array(after, float)[index] - np.array(before, float)[index]
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
        return d.mean() - half, d.mean() + half

    for kind, index in (("shape", slice(0, 6)), ("count", slice(6, 12)), ("colour", slice(12, 18))):
        change = out["kinds"][kind]["paired_change"]
        assert (change["ci_low"], change["ci_high"]) == pytest.approx(reference(index)) and change["n"] == 6
    assert out["kinds"]["shape"]["before"] == pytest.approx(1 / 6) and out["kinds"]["shape"]["after"] == 1
    assert [out["kinds"][k]["verdict"] for k in ("shape", "count", "colour")] == ["rose", "fell", "within noise"]
    assert out["rose"] == ["shape"] and out["fell"] == ["count"] and out["within_noise"] == ["colour"]
    assert out["overall"]["verdict"] == "within noise"
    assert "rose: shape +0.833" in out["text"] and "fell: count -0.667" in out["text"]
    assert "within noise: colour +0.000" in out["text"]
    with pytest.raises(ValueError, match=r"kinds: no score columns \['acc/grounding'\]"):
        kind_changes(_eval(columns(before)), _eval(columns(after)), "acc", ["shape", "grounding"])


def test_lora_with_an_ensemble_reward_exports_an_adapter_and_checkpoints_the_statistics(tmp_path):
    model, processor = make_tiny_vlm(seed=0)
    config = _config(
        tmp_path / "lora", lora={"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        rewards=["world_accuracy", {"name": "length_penalty", "target": 0, "limit": 40, "unit": "chars"}],
        aggregate={"mode": "uwo", "lam": 0.5}, report=None,
    )
    runner = VLMGRPORecipeTrainer(config, model, processor, progress=False)
    runner.train()
    assert runner.report() is None
    out = runner.export()
    assert out.name == "lora" and (out / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "lora" / "checkpoints" / "checkpoint-2" / "reward_state.safetensors")
    ensemble = runner.functions[0].reward
    assert saved["0.count"].tolist() == ensemble.count.tolist() and ensemble.count[0] == 2 * 4  # 2 steps × 4 completions
    ensemble.count.zero_()
    runner._load_reward_state(tmp_path / "lora" / "checkpoints" / "checkpoint-2")
    assert torch.equal(ensemble.count, saved["0.count"])
    rows = _rows(tmp_path / "lora" / "metrics.jsonl")
    assert "rewards/ensemble_uwo/uncertainty" in rows[0] and "rewards/ensemble_uwo/world_accuracy" in rows[0]


def test_training_rows_that_are_report_rows_are_dropped(tmp_path):
    config = _config(tmp_path, data={"world": {"split": "heldout", "n": 10, "seed": 1}})
    runner = VLMGRPORecipeTrainer(config, progress=False)
    rows = load_rows(config.data)
    kept = runner._without_report_rows(rows)
    assert runner.dropped_as_report == 6 and kept == rows[6:]  # the report's six questions start the same draw
    other = VLMGRPORecipeTrainer(_config(tmp_path), progress=False)  # train split: nothing in common
    assert len(other._without_report_rows(load_rows(other.config.data))) == 16 and other.dropped_as_report == 0
    with pytest.raises(ValueError, match="data: every training row is also a report row"):
        runner._without_report_rows(rows[:6])


def test_balanced_world_rows_follow_the_balanced_question_set():
    from mmalign.world.questions import question_set

    source = DataSource(world={"split": "heldout", "n": 28, "seed": 3, "balanced": True})
    rows = load_rows(source)
    assert [r["question"] for r in rows] == [q.text for q in question_set(28, "heldout", 3, balanced=True)]
    assert [r["answer"] for r in rows if r["kind"] == "count"] != [
        r["answer"] for r in load_rows(DataSource(world={"split": "heldout", "n": 28, "seed": 3})) if r["kind"] == "count"]


def test_hub_rows_come_from_datasets(tmp_path):
    from datasets import Dataset

    rows = world_vqa_rows(5, seed=2)
    table = [{"q": r["question"], "a": r["answer"], "picture": r["image"], "kind": r["kind"]} for r in rows]
    Dataset.from_list(table).to_parquet(tmp_path / "vqa.parquet")
    source = DataSource(hub=HubVQASource(path="parquet", data_files=str(tmp_path / "vqa.parquet"), question="q",
                                         answer="a", image="picture", limit=4), instruction="Answer briefly.")
    loaded = load_rows(source)
    assert len(loaded) == 4
    assert loaded[1]["prompt"] == [{"role": "user", "content": rows[1]["question"] + " Answer briefly."}]
    assert loaded[1]["answer"] == rows[1]["answer"] and loaded[1]["kind"] == rows[1]["kind"]
    assert loaded[1]["image"].size == (32, 32)
    bad = DataSource(hub=HubVQASource(path="parquet", data_files=str(tmp_path / "vqa.parquet")))
    with pytest.raises(ValueError, match="data.hub: columns \\['question', 'answer', 'image'\\] not in 'parquet'"):
        load_rows(bad)


def test_mmalign_train_runs_the_shipped_recipe_on_a_saved_model(tmp_path, capsys):
    from mmalign.cli import main

    model, processor = make_tiny_vlm(seed=0)
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    status = main(["train", "shapes-vlm-grpo", f"model={tmp_path / 'vlm'}", f"output_dir={tmp_path / 'run'}",
                   "data.world.n=8", "grpo.max_steps=1", "grpo.per_device_train_batch_size=8",
                   "grpo.max_completion_length=4", "report.data.world.n=4", "report.max_new_tokens=4", "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "world_accuracy:" in printed and "format:" in printed and "(n=4)" in printed
    assert "per kind (paired 95% CI): world_accuracy " in printed and "within noise: " in printed
    assert (tmp_path / "run" / "model" / "config.json").is_file()
