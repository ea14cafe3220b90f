"""The reward adapter (mmalign Reward → TRL reward function), ensembles as one function, the world accuracy."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.media import MediaBatch
from mmalign.rewards.base import Reward, RewardOutput
from mmalign.trainers.vlm_grpo.rewards import (
    RewardFunction,
    completion_text,
    ensemble_function,
    prompt_text,
    reward_functions,
)
from mmalign.world.answer_reward import WorldAnswerAccuracy
from mmalign.world.vqa import world_vqa_rows


class Column(Reward):
    """Scores = the metadata column ``key``; components ``double``; uncertainty ``|score|``; info ``calls``."""

    def __init__(self, key: str = "value", name: str | None = None) -> None:
        super().__init__()
        self.key, self.name, self.calls = key, name or key, 0
        self.seen: MediaBatch | None = None

    def forward(self, batch: MediaBatch) -> RewardOutput:
        self.calls += 1
        self.seen = batch
        scores = torch.tensor([m[self.key] for m in batch.metadata], dtype=torch.float32)
        return RewardOutput(scores, {"double": 2 * scores}, scores.abs(), {"calls": self.calls, "tag": "x"})


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_adapter_returns_scores_none_for_nonfinite_and_logs_components():
    fn = RewardFunction(Column())
    logged: list[tuple[str, float]] = []
    values = [1.0, float("nan"), -3.0, float("inf")]
    out = fn(
        prompts=[_chat("q")] * 4, completions=[_reply("a")] * 4, value=values, completion_ids=[[1]] * 4,
        trainer_state=None, log_extra=None, log_metric=lambda k, v: logged.append((k, v)),
    )
    assert out == [1.0, None, -3.0, None]
    metrics = dict(logged)
    assert metrics["rewards/value/double"] == pytest.approx((2.0 - 6.0) / 2)  # finite entries only
    assert metrics["rewards/value/uncertainty"] == pytest.approx((1.0 + 3.0) / 2)
    assert metrics["rewards/value/nonfinite"] == pytest.approx(0.5)
    assert metrics["rewards/value/calls"] == 1.0
    assert "rewards/value/tag" not in metrics  # only numbers are logged
    assert fn.__name__ == "value" and not isinstance(fn, torch.nn.Module)  # TRL treats Modules as classifiers


def test_adapter_builds_the_media_batch_from_columns():
    fn = RewardFunction(Column())
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = 255
    images = [Image.fromarray(red), Image.fromarray(np.full((8, 8, 3), 51, dtype=np.uint8))]
    fn(prompts=[_chat("what colour?"), "plain prompt"], completions=[_reply("<answer>red</answer>"), "text"],
       image=images, value=[0.0, 1.0], answer=["red", "grey"])
    batch = fn.reward.seen
    assert batch.prompts == ["what colour?", "plain prompt"]
    assert batch.completions == ["<answer>red</answer>", "text"]
    assert batch.metadata == [{"value": 0.0, "answer": "red"}, {"value": 1.0, "answer": "grey"}]
    assert batch.pixels.shape == (2, 3, 8, 8)
    assert torch.equal(batch.pixels[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(batch.pixels[1], torch.full((3, 8, 8), 0.2))

    frames = [[Image.fromarray(red)] * 3, [Image.fromarray(red)] * 3]
    fn.group_size = 1
    fn(prompts=["a", "b"], completions=["x", "y"], video=frames, value=[0.0, 0.0])
    assert fn.reward.seen.pixels.shape == (2, 3, 3, 8, 8) and fn.reward.seen.is_video
    assert [m["group"] for m in fn.reward.seen.metadata] == [0, 1]

    fn.group_size = None
    fn(prompts=["a", "b"], completions=["x", "y"], value=[0.0, 0.0])  # text only: placeholder pixels
    assert fn.reward.seen.pixels.shape == (2, 3, 1, 1)


def test_adapter_image_sizes_must_agree_or_be_resized():
    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (16, 12))]
    with pytest.raises(ValueError, match="image_size: the 'image' column holds media of different sizes"):
        RewardFunction(Column())(prompts=["a", "b"], completions=["x", "y"], image=images, value=[0.0, 0.0])
    fn = RewardFunction(Column(), image_size=10)
    fn(prompts=["a", "b"], completions=["x", "y"], image=images, value=[0.0, 0.0])
    assert fn.reward.seen.pixels.shape == (2, 3, 10, 10)
    with pytest.raises(ValueError, match="image_size: expected a positive int or None, got 0"):
        RewardFunction(Column(), image_size=0)
    with pytest.raises(ValueError, match="answer: expected one value per completion \\(2\\), got 1"):
        RewardFunction(Column())(prompts=["a", "b"], completions=["x", "y"], value=[0.0, 0.0], answer=["z"])


def test_adapter_runs_rule_rewards_from_specs_on_its_device():
    fn = RewardFunction({"name": "answer_accuracy"}, device="cpu")
    assert fn.device == torch.device("cpu")
    out = fn(prompts=["q"] * 3, completions=[_reply("<answer>Red</answer>"), _reply("blue"), _reply("")],
             answer=["red", "red", "red"])
    assert out == [1.0, 0.0, 0.0]


def test_text_of_prompts_and_completions():
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "ab"
    assert prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                        {"role": "assistant", "content": "x"}, {"role": "user", "content": "q2"}]) == "q2"
    with pytest.raises(TypeError, match="completions: expected strings or lists of messages, got int"):
        completion_text(3)


def test_reward_functions_take_weights_and_unique_names():
    functions, weights = reward_functions([{"name": "format", "think": False, "weight": 0.5}, "format",
                                           {"name": "answer_accuracy"}])
    assert [f.__name__ for f in functions] == ["format", "format_2", "answer_accuracy"]
    assert weights == [0.5, 1.0, 1.0]
    (world,), _ = reward_functions(["world_accuracy"])
    assert isinstance(world.reward, WorldAnswerAccuracy)
    with pytest.raises(ValueError, match="rewards: expected a non-empty list of reward specs"):
        reward_functions([])
    with pytest.raises(ValueError, match="rewards.1.weight: ensemble members are not weighted"):
        reward_functions(["format", {"name": "format", "weight": 2}], aggregate={"mode": "wco"})
    with pytest.raises(ValueError, match="aggregate: unknown option \\['lambda'\\]"):
        reward_functions(["format"], aggregate={"mode": "uwo", "lambda": 1})


def _ensemble_call(fn, a, b):
    return fn(prompts=["q"] * len(a), completions=["c"] * len(a), a=a, b=b)


def test_uwo_and_wco_aggregate_the_ensemble_per_completion():
    a, b = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]
    # raw scores: mean 2 for every completion, population variance across the two members 1, 0, 1
    uwo = ensemble_function([Column("a"), Column("b")], mode="uwo", lam=0.5, standardize=False)
    assert _ensemble_call(uwo, a, b) == pytest.approx([2 - 0.5 * 1, 2.0, 2 - 0.5 * 1])
    wco = ensemble_function([Column("a"), Column("b")], mode="wco", standardize=False)
    assert _ensemble_call(wco, a, b) == pytest.approx([1.0, 2.0, 1.0])
    mean = ensemble_function([Column("a"), Column("b")], mode="mean", standardize=False)
    assert _ensemble_call(mean, a, b) == pytest.approx([2.0, 2.0, 2.0])

    # standardised: each member's first batch sets its running mean 2 and variance 2/3
    z = 1 / math.sqrt(2 / 3)
    logged = {}
    std_uwo = ensemble_function([Column("a"), Column("b")], mode="uwo", lam=0.5, name="judges")
    out = std_uwo(prompts=["q"] * 3, completions=["c"] * 3, a=a, b=b, log_metric=logged.__setitem__)
    assert out == pytest.approx([-0.5 * z**2, 0.0, -0.5 * z**2], abs=1e-6)  # mean of ±z is 0, variance z²
    assert logged["rewards/judges/a"] == pytest.approx(2.0) and logged["rewards/judges/a/z"] == pytest.approx(0.0, abs=1e-6)
    assert logged["rewards/judges/uncertainty"] == pytest.approx(2 * z / 3, abs=1e-6)  # per sample std: z, 0, z
    std_wco = ensemble_function([Column("a"), Column("b")], mode="wco")
    assert _ensemble_call(std_wco, a, b) == pytest.approx([-z, 0.0, -z], abs=1e-6)

    (one,), weights = reward_functions([{"name": "format"}, {"name": "answer_accuracy"}], aggregate={"mode": "wco"})
    assert weights == [1.0] and one.__name__ == "ensemble_wco"


def test_ensemble_member_nan_makes_the_completion_unscored():
    fn = ensemble_function([Column("a"), Column("b")], mode="uwo", standardize=False)
    assert _ensemble_call(fn, [1.0, float("nan")], [1.0, 2.0]) == [1.0, None]


def test_world_accuracy_grades_as_the_world_does():
    from mmalign.world.questions import question_set, score

    questions = question_set(56, "heldout", seed=3)
    rows = world_vqa_rows(56, "heldout", seed=3)
    assert [r["question"] for r in rows] == [q.text for q in questions]
    completions = []
    for q in questions:
        if q.kind == "grounding":
            x1, y1, x2, y2 = q.box
            completions.append([q.completion, f"<answer>[{x1 + 1}, {y1}, {x2 + 1}, {y2}]</answer>",
                                "<answer>[0, 0, 2, 2]</answer>", "no box"])
        elif q.kind == "count":
            completions.append([q.completion, f"<answer>{int(q.answer) + 1}</answer>", "there are 2", ""])
        else:
            completions.append([q.completion, f"<answer>The {q.answer.upper()}.</answer>", "<answer>green</answer>", "yes"])
    fn = RewardFunction(WorldAnswerAccuracy())
    columns = {k: [r[k] for r in rows] for k in ("answer", "kind", "box", "image_size", "image")}
    for j in range(4):
        got = fn(prompts=[r["prompt"] for r in rows], completions=[c[j] for c in completions], **columns)
        expected = [score(q, c[j]) for q, c in zip(questions, completions)]
        assert got == expected, j
    assert {q.kind for q in questions} == {"colour", "shape", "count", "position", "relation", "grounding", "yesno"}


def test_world_iou_scores_grounding_answers_by_their_overlap_and_leaves_other_kinds_out():
    rows = world_vqa_rows(14, "heldout", seed=3)
    completions, expected = [], []
    for r in rows:
        if r["kind"] == "grounding":
            x1, y1, x2, y2 = r["box"]
            completions.append(f"<answer>[{x1 + 1}, {y1}, {x2 + 1}, {y2}]</answer>")  # shifted one pixel right
            expected.append((x2 - x1 - 1) / (x2 - x1 + 1))  # overlap (w − 1)·h over union (w + 1)·h
        else:
            completions.append(f"<answer>{r['answer']}</answer>")
            expected.append(None)  # NaN → None: TRL leaves the reward out for this completion
    fn = RewardFunction("world_iou")
    columns = {k: [r[k] for r in rows] for k in ("answer", "kind", "box", "image_size", "image")}
    got = fn(prompts=[r["prompt"] for r in rows], completions=completions, **columns)
    assert sum(e is not None for e in expected) == 2
    assert [None if e is None else pytest.approx(e) for e in expected] == got
    unparsable = fn(prompts=[r["prompt"] for r in rows], completions=["<answer>[1, 1, 1</answer>"] * 14, **columns)
    assert [v for v in unparsable if v is not None] == [0.0, 0.0]


def test_world_rows_scale_boxes_and_render_videos():
    small, large = world_vqa_rows(7, seed=1), world_vqa_rows(7, seed=1, size=64, frames=2, instruction="Be brief.")
    grounding = [i for i, r in enumerate(small) if r["kind"] == "grounding"][0]
    assert large[grounding]["box"] == [2 * v for v in small[grounding]["box"]]
    assert large[grounding]["answer"] == "[{}, {}, {}, {}]".format(*large[grounding]["box"])
    assert large[0]["image_size"] == [64, 64] and len(large[0]["video"]) == 2 and large[0]["video"][0].size == (64, 64)
    assert large[0]["prompt"][0]["content"] == small[0]["question"] + " Be brief."
    with pytest.raises(ValueError, match="kinds: expected a non-empty subset"):
        world_vqa_rows(3, kinds=["colour", "caption"])
    with pytest.raises(ValueError, match="frames: expected None \\(images\\) or an int >= 1"):
        world_vqa_rows(3, frames=0)
    with pytest.raises(ValueError, match="metadata\\[0\\]: box: expected the gold box"):
        WorldAnswerAccuracy()(MediaBatch(torch.zeros(1, 3, 1, 1), ["q"], [{"kind": "grounding"}], ["[1, 2, 3, 4]"]))
