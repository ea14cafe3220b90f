"""VLMGRPOTrainer on a tiny random Qwen2-VL: a few GRPO steps, the reference model, dynamic sampling, video."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from tiny_models import make_tiny_qwen25_vl, make_tiny_vlm

from mmalign.media import MediaBatch
from mmalign.rewards.base import Reward, RewardOutput
from mmalign.trainers.vlm_grpo.rewards import RewardFunction, reward_functions
from mmalign.trainers.vlm_grpo.trainer import VLMGRPOTrainer, load_checkpoint_weights, with_video_part
from mmalign.world.vqa import world_vqa_rows

RUNNER = Path(__file__).with_name("vlm_grpo_run.py")


class Spread(Reward):
    """0, 1, 2 … by position in the call (always spread within a group), except ``flat_kind`` rows: ``flat_value``."""

    name = "spread"

    def __init__(self, flat_kind: str = "colour", flat_value: float = 1.0) -> None:
        super().__init__()
        self.flat_kind, self.flat_value = flat_kind, flat_value

    def forward(self, batch: MediaBatch) -> RewardOutput:
        scores = [self.flat_value if m["kind"] == self.flat_kind else float(i) for i, m in enumerate(batch.metadata)]
        return RewardOutput(torch.tensor(scores))


def _args(tmp_path, **overrides):
    from trl import GRPOConfig

    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
        max_steps=2, logging_steps=1, report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False,
        save_strategy="no", learning_rate=1e-2, beta=0.0, seed=0, disable_tqdm=True,
    )
    return GRPOConfig(**{**values, **overrides})


def _length_rewards():
    return reward_functions([{"name": "world_accuracy"}, {"name": "length_penalty", "target": 0, "limit": 40, "unit": "chars"}])


def test_a_few_steps_train_against_a_frozen_copy_of_an_in_memory_policy(tmp_path):
    model, processor = make_tiny_vlm(seed=0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    functions, weights = _length_rewards()
    trainer = VLMGRPOTrainer(
        model, functions, _args(tmp_path, beta=0.1, max_steps=3, reward_weights=weights),
        train_dataset=Dataset.from_list(world_vqa_rows(16, seed=0)), processing_class=processor,
    )
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert ref is not model and not any(p.requires_grad for p in ref.parameters())
    assert all(f.device == trainer.accelerator.device and f.group_size == 2 for f in functions)
    trainer.train()
    steps = [row for row in trainer.state.log_history if "loss" in row]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(row["loss"])) for row in steps)
    assert steps[0]["kl"] == 0.0 and steps[-1]["kl"] > 0  # the reference is the initial policy
    assert {"rewards/length_penalty/mean", "rewards/length_penalty/length", "rewards/world_accuracy/nonfinite"} <= set(steps[0])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "no parameter changed"
    assert all(torch.equal(v, initial[k]) for k, v in ref.state_dict().items())


def test_an_explicit_reference_model_is_used(tmp_path):
    model, processor = make_tiny_vlm(seed=0)
    other, _ = make_tiny_vlm(seed=1)
    functions, _ = _length_rewards()
    trainer = VLMGRPOTrainer(
        model, functions[1:], _args(tmp_path, beta=0.1, max_steps=1), processing_class=processor,
        train_dataset=Dataset.from_list(world_vqa_rows(8, seed=0)), ref_model=other,
    )
    assert trainer.accelerator.unwrap_model(trainer.ref_model) is other and trainer.beta == 0.1
    trainer.train()
    first = next(row for row in trainer.state.log_history if "loss" in row)
    assert first["kl"] > 0  # a different reference, already at the first step
    with pytest.raises(ValueError, match="ref_model: a reference model was given but args.beta is 0.0"):
        VLMGRPOTrainer(model, functions, _args(tmp_path), processing_class=processor,
                       train_dataset=Dataset.from_list(world_vqa_rows(4)), ref_model=other)


def _dynamic_trainer(tmp_path, train_kinds, rounds=2, reward=None):
    model, processor = make_tiny_vlm(seed=0)
    function = RewardFunction(reward or Spread())
    trainer = VLMGRPOTrainer(
        model, [function], _args(tmp_path), processing_class=processor, dynamic_sampling_rounds=rounds,
        train_dataset=Dataset.from_list(world_vqa_rows(8, seed=1, kinds=train_kinds)),
    )
    trainer.model.train()
    return trainer


def test_dynamic_sampling_replaces_flat_groups_with_fresh_prompts(tmp_path):
    trainer = _dynamic_trainer(tmp_path, ["shape", "count"])
    colour, shape = world_vqa_rows(2, seed=5, kinds=["colour", "shape"])
    out = trainer._generate_and_score_completions([colour, colour, shape, shape])
    assert out["prompt_ids"].shape[0] == 4 and torch.all(out["advantages"] != 0)
    final = list(trainer._logs["prompt"])[-4:]
    texts = [part["text"] for prompt in final for part in prompt[0]["content"] if part["type"] == "text"]
    assert colour["question"] not in texts and texts[:2] == [shape["question"]] * 2  # kept first, then the refill
    metrics = trainer._metrics["train"]
    assert metrics["dynamic_sampling/rounds"] == [2.0]  # one refill round found a group with spread
    assert metrics["dynamic_sampling/zero_spread_groups"] == [0.25]  # the colour group of four seen
    assert metrics["dynamic_sampling/flat_groups_kept"] == [0.0]
    assert metrics["frac_reward_zero_std"] == [0.0]


def test_dynamic_sampling_keeps_flat_groups_when_rounds_run_out(tmp_path):
    trainer = _dynamic_trainer(tmp_path, ["colour"], rounds=2)
    (colour,) = world_vqa_rows(1, seed=5, kinds=["colour"])
    out = trainer._generate_and_score_completions([colour] * 4)
    assert out["prompt_ids"].shape[0] == 4 and torch.all(out["advantages"] == 0)
    metrics = trainer._metrics["train"]
    assert metrics["dynamic_sampling/rounds"] == [3.0] and metrics["dynamic_sampling/flat_groups_kept"] == [1.0]


def test_dynamic_sampling_checks_its_setup(tmp_path):
    model, processor = make_tiny_vlm()
    data = Dataset.from_list(world_vqa_rows(4))
    with pytest.raises(ValueError, match="dynamic_sampling_rounds: expected None \\(off\\) or an int >= 1, got 0"):
        VLMGRPOTrainer(model, [RewardFunction(Spread())], _args(tmp_path), train_dataset=data,
                       processing_class=processor, dynamic_sampling_rounds=0)
    # one process holds the whole generation batch, which TRL already makes a multiple of num_generations;
    # with two, a process of 2 rows would split groups of 4
    two_processes = SimpleNamespace(per_device_train_batch_size=2, steps_per_generation=1, num_generations=4)
    with pytest.raises(ValueError, match="× steps_per_generation = 2 is not divisible by num_generations = 4"):
        VLMGRPOTrainer._check_dynamic_sampling(1, two_processes, data, {})
    with pytest.raises(ValueError, match="dynamic_sampling_rounds: not supported together with tools"):
        VLMGRPOTrainer._check_dynamic_sampling(1, _args(tmp_path), data, {"tools": [len]})
    with pytest.raises(ValueError, match="map-style datasets.Dataset, got train_dataset of type IterableDataset"):
        VLMGRPOTrainer(model, [RewardFunction(Spread())], _args(tmp_path), train_dataset=data.to_iterable_dataset(),
                       processing_class=processor, dynamic_sampling_rounds=1)


def test_unscorable_completions_get_zero_advantage(tmp_path):
    model, processor = make_tiny_vlm()
    trainer = VLMGRPOTrainer(
        model, [RewardFunction(Spread(flat_value=float("nan")))], _args(tmp_path), processing_class=processor,
        train_dataset=Dataset.from_list(world_vqa_rows(4)),
    )
    trainer.model.train()
    colour, shape = world_vqa_rows(2, seed=5, kinds=["colour", "shape"])
    out = trainer._generate_and_score_completions([colour, colour, shape, shape])
    assert torch.equal(out["advantages"][:2], torch.zeros(2)) and torch.all(out["advantages"][2:] != 0)
    assert trainer._metrics["train"]["rewards/spread/nonfinite"] == [0.5]


# -------------------------------------------------------------------------------------------- resuming
def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_checkpoint_weights_come_back_through_the_models_conversions(tmp_path):
    """save_pretrained writes Qwen2-VL's hub layout (visual.*, model.*); every weight loads back under the model's
    names, and a checkpoint short of one is an error that names it."""
    from safetensors.torch import load_file, save_file

    saved, _ = make_tiny_vlm(seed=0)
    saved.save_pretrained(tmp_path / "ckpt")
    on_disk = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert any(k.startswith("visual.") for k in on_disk) and not set(on_disk) & set(saved.state_dict())
    model, _ = make_tiny_vlm(seed=1)
    load_checkpoint_weights(model, tmp_path / "ckpt")
    assert _same_state(saved, model)

    del on_disk["visual.merger.mlp.0.bias"]
    (tmp_path / "short").mkdir()
    save_file(on_disk, tmp_path / "short" / "model.safetensors")
    with pytest.raises(ValueError, match=r"short does not hold .* 1 of the model's missing \['model.visual.merger.mlp.0.bias'\]"):
        load_checkpoint_weights(model, tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint: .* has no model.safetensors"):
        load_checkpoint_weights(model, tmp_path)


def test_checkpoint_weights_go_through_the_models_converters(tmp_path):
    """A conversion that changes a tensor, not only its name (a transpose of a square weight, which a shape check
    cannot catch), is undone on load as from_pretrained undoes it."""
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )
    from transformers.core_model_loading import Transpose, WeightConverter

    class TransposedOProj(Qwen2VLForConditionalGeneration):
        pass

    register_checkpoint_conversion_mapping("TransposedOProj", [
        *get_checkpoint_conversion_mapping("Qwen2VLForConditionalGeneration"),
        WeightConverter("self_attn.o_proj.weight", "self_attn.o_proj.weight", [Transpose(0, 1)]),
    ], overwrite=True)
    tiny, _ = make_tiny_vlm(seed=0)
    saved = TransposedOProj(tiny.config)
    saved.load_state_dict(tiny.state_dict())
    saved.save_pretrained(tmp_path)
    weight = saved.model.language_model.layers[0].self_attn.o_proj.weight
    assert torch.equal(load_file(tmp_path / "model.safetensors")["model.layers.0.self_attn.o_proj.weight"], weight.T)
    model = TransposedOProj(make_tiny_vlm(seed=1)[0].config)
    load_checkpoint_weights(model, tmp_path)
    assert _same_state(saved, model)


# ----------------------------------------------------------------------------------------------- video
def test_video_rows_put_the_frames_in_the_user_turn():
    (row,) = world_vqa_rows(1, frames=3)
    prompt = with_video_part(row)["prompt"]
    assert prompt[0]["content"][0] == {"type": "video", "video": row["video"]}
    assert prompt[0]["content"][1] == {"type": "text", "text": row["question"]}
    with pytest.raises(ValueError, match="video: a row with a 'video' column cannot also have 'image'"):
        with_video_part({**row, "image": None})
    with pytest.raises(ValueError, match="prompt: video rows need conversational prompts"):
        with_video_part({**row, "prompt": "text"})


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_video_log_probs_match_a_direct_forward_pass(tmp_path, family):
    model, processor = make_tiny_vlm(seed=2) if family == "qwen2-vl" else make_tiny_qwen25_vl(seed=2)
    rows = world_vqa_rows(2, frames=4, seed=0)
    trainer = VLMGRPOTrainer(model, [RewardFunction(Spread())], _args(tmp_path, beta=0.1),
                             processing_class=processor, train_dataset=Dataset.from_list(rows))
    prompts = [with_video_part(r)["prompt"] for r in rows]
    prompt_ids, images, fields = trainer._tokenize_prompts(prompts)
    assert images is None and fields["video_grid_thw"].tolist() == [[2, 8, 8], [2, 8, 8]]  # 4 frames, 2 per patch
    if family == "qwen2.5-vl":  # seconds per temporal patch, which Qwen2.5-VL's M-RoPE reads, travel per row
        assert "second_per_grid_ts" in trainer._video[0]
    completion = processor.tokenizer("<answer>red</answer>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids[0] + completion])
    trainer._video = trainer._video[:1]  # the first row only
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids[:, :], torch.ones_like(ids), len(completion)
    )
    # by hand: the processor's own inputs for prompt + completion, the model's logits, log-softmax
    text = processor.apply_chat_template([[{"role": "user", "content": [{"type": "video"},
                                         {"type": "text", "text": rows[0]["prompt"][0]["content"]}]}]],
                                         tokenize=False, add_generation_prompt=True)[0]
    encoded = processor(text=[text + "<answer>red</answer>"], videos=[rows[0]["video"]], return_tensors="pt")
    assert encoded["input_ids"][0].tolist() == ids[0].tolist()
    with torch.no_grad():
        logits = model(**encoded).logits[0, -len(completion) - 1 : -1].float()
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
    assert torch.allclose(logps[0], expected, atol=1e-5), (logps[0], expected)


@pytest.mark.parametrize(("family", "frames"), [("qwen2-vl", 2), ("qwen2.5-vl", 4), ("qwen2.5-vl", None)])
def test_a_few_steps_on_video_or_image_rows(tmp_path, family, frames):
    model, processor = make_tiny_vlm(seed=0) if family == "qwen2-vl" else make_tiny_qwen25_vl(seed=0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    functions, weights = _length_rewards()
    trainer = VLMGRPOTrainer(
        model, functions, _args(tmp_path, beta=0.1, reward_weights=weights, steps_per_generation=2),
        train_dataset=Dataset.from_list(world_vqa_rows(8, frames=frames, seed=0)), processing_class=processor,
        dynamic_sampling_rounds=1,
    )
    trainer.train()
    steps = [row for row in trainer.state.log_history if "loss" in row]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in steps)
    assert any(not torch.equal(v, initial[k]) for k, v in model.state_dict().items())


# -------------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_cpu_processes_train_the_same_weights(tmp_path):
    """Two gloo processes under accelerate launch: groups are gathered for advantages, DDP averages gradients."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(RUNNER), str(tmp_path / "ddp"), "2", "--dynamic-sampling"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    done = [json.loads((tmp_path / "ddp" / f"done-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(d["world_size"] == 2 and d["distributed_type"] == "DistributedType.MULTI_CPU" and d["steps"] == 2
               for d in done)
    ranks = [torch.load(tmp_path / "ddp" / f"final-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    initial = make_tiny_vlm(seed=0)[0].state_dict()
    assert any(not torch.equal(ranks[0][k], initial[k]) for k in initial)
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # written by the main process only
    assert all("dynamic_sampling/rounds" in r for r in rows)
    assert (tmp_path / "ddp" / "checkpoints" / "checkpoint-2").is_dir()
