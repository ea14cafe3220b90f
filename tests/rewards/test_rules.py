import math

import pytest
import torch

from mmalign import MediaBatch
from mmalign.rewards.rules import (
    AnswerAccuracy,
    BoxIoU,
    LengthPenalty,
    StrictFormat,
    answer_matches,
    box_iou,
    choice_index,
    completion_length,
    extract_answer,
    format_ok,
    length_penalty,
    normalize_text,
    parse_box,
    parse_number,
    rescale_box,
)

CHOICES = ["a red circle", "the blue square", "green triangle"]


def batch(completions, metadata):
    n = len(completions)
    return MediaBatch(torch.zeros(n, 3, 4, 4), [""] * n, metadata, completions)


@pytest.mark.parametrize(
    "completion, require_tags, expected",
    [
        ("<think>hmm</think><answer> B </answer>", False, "B"),
        ("<answer>A</answer> then <answer>C</answer>", False, "C"),  # the last pair
        ("<think>it is 3</think> 4", False, "4"),  # no answer tags: think block dropped
        ("<think>it is 3</think> 4", True, None),
        ("<answer>B", False, "B"),  # truncated: the stray tag is dropped
        ("<answer>B", True, None),
        ("<answer>   </answer>", False, None),
        ("", False, None),
        ("   ", True, None),
    ],
)
def test_extract_answer(completion, require_tags, expected):
    assert extract_answer(completion, require_tags) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Red  Circle.", "red circle"),
        ("an apple, a pear!", "apple pear"),
        ("red-circle", "red circle"),
        ("«Thea»", "thea"),  # unicode punctuation; 'the' inside a word stays
        ("", ""),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3", 3.0),
        ("3.0", 3.0),
        ("-2.5", -2.5),
        ("There are 1,000 dots", 1000.0),
        ("1e3", 1000.0),
        (".5", 0.5),
        ("Three", 3.0),
        ("2 red and 4 blue", 4.0),  # the last number
        ("twenty", 20.0),
        ("twenty-one", None),  # only single words zero..twenty
        ("v2", None),
        ("NaN", None),
        ("inf", None),
        ("1e999", None),
        ("", None),
        ("none", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", 1),
        ("b", 1),
        ("(B)", 1),
        ("B.", 1),
        ("b)", 1),
        ("(c) green triangle", 2),
        ("C. green", 2),  # the letter wins over the text
        ("A red circle", 0),  # no separator: read as text
        ("Blue square", 1),
        ("D", None),  # out of range
        ("purple", None),
        ("", None),
    ],
)
def test_choice_index(text, expected):
    assert choice_index(text, CHOICES) == expected


@pytest.mark.parametrize(
    "answer, gold, mode, tolerance, expected",
    [
        ("Paris", "Paris", "exact", 0.0, True),
        ("paris", "Paris", "exact", 0.0, False),
        ("The Paris.", "paris", "normalized", 0.0, True),
        ("Lyon", ["Paris", "lyon"], "normalized", 0.0, True),  # any gold of a list
        ("3.0", 3, "numeric", 0.0, True),
        ("three", "3", "numeric", 0.0, True),
        ("3.1", 3, "numeric", 0.0, False),
        ("3.1", 3, "numeric", 0.2, True),
        ("NaN", 3, "numeric", 1e9, False),
        ("(B)", "B", "choice", 0.0, True),
        ("the blue square", 1, "choice", 0.0, True),
        ("B", "blue square", "choice", 0.0, True),
        ("A", "B", "choice", 0.0, False),
        (None, "B", "choice", 0.0, False),
        (None, "x", "exact", 0.0, False),
    ],
)
def test_answer_matches(answer, gold, mode, tolerance, expected):
    assert answer_matches(answer, gold, mode, CHOICES, tolerance) is expected


@pytest.mark.parametrize(
    "gold, mode, choices, error",
    [
        ("many", "numeric", None, "answer: expected a finite number"),
        (float("nan"), "numeric", None, "answer: expected a finite number"),
        ("E", "choice", CHOICES, "answer: expected an option"),
        (5, "choice", CHOICES, "answer: expected an option"),
        ("A", "choice", None, "choices: expected a non-empty list"),
        ("x", "fuzzy", None, "mode: expected one of"),
    ],
)
def test_answer_matches_rejects_bad_gold(gold, mode, choices, error):
    with pytest.raises(ValueError, match=error):
        answer_matches("3", gold, mode, choices)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[10, 20, 30, 40]", (10.0, 20.0, 30.0, 40.0)),
        ('{"bbox_2d": [10,200,30.5,400], "label": "cat"}', (10.0, 200.0, 30.5, 400.0)),
        ("box (1, 2) to (3, 4)", (1.0, 2.0, 3.0, 4.0)),  # exactly four numbers
        ("10 20 30 40", (10.0, 20.0, 30.0, 40.0)),
        ("[1, 2, 3, 4] and [5, 6, 7, 8]", (1.0, 2.0, 3.0, 4.0)),  # the first bracketed list
        ("[30, 40, 10, 20]", (30.0, 40.0, 10.0, 20.0)),  # inverted: parsed as written, IoU scores it 0
        ("[1, 2, 3]", None),
        ("1 2 3 4 5", None),
        ("[NaN, 2, 3, 4]", None),
        ("[1e999, 2, 3, 4]", None),
        ("no box", None),
        ("", None),
    ],
)
def test_parse_box(text, expected):
    assert parse_box(text) == expected


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
        ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),
        ((0, 0, 10, 10), (5, 5, 15, 15), 25 / 175),
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),  # disjoint
        ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),  # touching
        ((0, 0, 10, 10), (2, 2, 4, 4), 4 / 100),  # contained
        ((10, 10, 0, 0), (0, 0, 10, 10), 0.0),  # inverted
        ((0, 0, 0, 10), (0, 0, 0, 10), 0.0),  # zero area
        ((0, 0, math.nan, 10), (0, 0, 10, 10), 0.0),
        ((0, 0, math.inf, 10), (0, 0, 10, 10), 0.0),
    ],
)
def test_box_iou(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


def test_rescale_box_and_bad_sizes():
    assert rescale_box((14, 28, 140, 280), (280, 560), (100, 400)) == (5.0, 20.0, 50.0, 200.0)
    with pytest.raises(ValueError, match=r"processor_size: expected \(width, height\)"):
        rescale_box((0, 0, 1, 1), (0, 10), (10, 10))
    with pytest.raises(ValueError, match=r"image_size: expected \(width, height\)"):
        rescale_box((0, 0, 1, 1), (10, 10), "10x10")


@pytest.mark.parametrize(
    "completion, think, expected",
    [
        ("<think>look</think><answer>B</answer>", True, True),
        ("  <think>look\nmore</think>\n<answer>B</answer>\n", True, True),
        ("<think>look</think>", True, False),
        ("<answer>B</answer>", True, False),
        ("<answer>B</answer><think>look</think>", True, False),  # wrong order
        ("<think>look</think><answer>B</answer> extra", True, False),
        ("so <think>look</think><answer>B</answer>", True, False),
        ("<think>look</think><answer>B</answer><answer>C</answer>", True, False),  # two answers
        ("<think>a</think><think>b</think><answer>B</answer>", True, False),
        ("<think><answer>x</answer></think><answer>B</answer>", True, False),  # nested tags
        ("<think> </think><answer>B</answer>", True, False),  # blank think
        ("<think>look</think><answer></answer>", True, False),  # blank answer
        ("<THINK>look</THINK><ANSWER>B</ANSWER>", True, False),
        ("", True, False),
        ("<answer>B</answer>", False, True),
        ("<think>look</think><answer>B</answer>", False, False),
        ("B", False, False),
    ],
)
def test_format_ok(completion, think, expected):
    assert format_ok(completion, think) is expected


@pytest.mark.parametrize(
    "length, target, limit, expected",
    [(0, 10, 20, 0.0), (10, 10, 20, 0.0), (15, 10, 20, -0.5), (20, 10, 20, -1.0), (99, 10, 20, -1.0)],
)
def test_length_penalty(length, target, limit, expected):
    assert length_penalty(length, target, limit) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, unit, expected", [("a bb  ccc\n", "words", 3), ("a bb  ccc\n", "chars", 10), ("", "words", 0)]
)
def test_completion_length(text, unit, expected):
    assert completion_length(text, unit) == expected


def test_answer_accuracy_reward_scores_a_batch():
    completions = [
        "<think>two and one</think><answer>3</answer>",
        "<answer>three.</answer>",
        "<answer>4</answer>",
        "",
        "<answer>NaN</answer>",
    ]
    out = AnswerAccuracy(mode="numeric")(batch(completions, [{"answer": 3}] * 5))
    assert out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))
    choice = AnswerAccuracy(mode="choice", require_tags=True)
    meta = [{"answer": "B", "choices": CHOICES}] * 3
    scores = choice(batch(["<answer>(B)</answer>", "B", "<answer>blue square</answer>"], meta)).scores
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0, 1.0]))


def test_box_iou_reward_rescales_and_thresholds():
    meta = {"box": [0, 0, 100, 100], "image_size": (200, 400), "processor_size": (100, 100)}
    completions = [
        "<answer>[0, 0, 50, 25]</answer>",
        "[0, 0, 50, 12.5]",
        "<answer>[50, 25, 0, 0]</answer>",
        "x",
    ]
    out = BoxIoU()(batch(completions, [meta] * 4))
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.5, 0.0, 0.0]))
    assert set(out.components) == set()
    thresholded = BoxIoU(threshold=0.5)(batch(completions, [meta] * 4))
    torch.testing.assert_close(thresholded.scores, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(thresholded.components["iou"], out.scores)
    in_pixels = BoxIoU()(batch(["[0, 0, 100, 50]"], [{"box": [0, 0, 100, 100]}]))  # no processor_size
    torch.testing.assert_close(in_pixels.scores, torch.tensor([0.5]))


def test_format_and_length_rewards():
    completions = ["<think>a b</think><answer>c</answer>", "<answer>c</answer>", "one two three four five"]
    data = batch(completions, [{}] * 3)
    torch.testing.assert_close(StrictFormat()(data).scores, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(StrictFormat(think=False)(data).scores, torch.tensor([0.0, 1.0, 0.0]))
    out = LengthPenalty(target=2, limit=6)(data)
    torch.testing.assert_close(out.components["length"], torch.tensor([2.0, 1.0, 5.0]))  # whitespace words
    torch.testing.assert_close(out.scores, torch.tensor([0.0, 0.0, -0.75]))
    assert LengthPenalty(target=4).limit == 8


@pytest.mark.parametrize(
    "reward, metadata, error",
    [
        (AnswerAccuracy(), {}, r"metadata\[1\]: answer: expected the gold 'answer'"),
        (AnswerAccuracy(mode="choice"), {"answer": "A"}, r"metadata\[1\]: choices: expected the gold"),
        (BoxIoU(), {"box": [10, 10, 0, 0]}, r"metadata\[1\]: box: expected \[x1, y1, x2, y2\]"),
        (BoxIoU(), {"box": [0, 0, 1]}, r"metadata\[1\]: box: expected"),
        (BoxIoU(), {"box": [0, 0, 1, 1], "processor_size": (10, 10)}, r"metadata\[1\]: image_size: expected"),
    ],
)
def test_bad_gold_names_the_sample_and_key(reward, metadata, error):
    good = {"answer": "A", "choices": CHOICES, "box": [0, 0, 1, 1]}
    with pytest.raises(ValueError, match=error):
        reward(batch(["[0, 0, 1, 1]", "[0, 0, 1, 1]"], [good, metadata]))


def test_rewards_need_completions_and_valid_options():
    with pytest.raises(
        ValueError, match="completions: answer_accuracy scores VLM text, expected batch.completions"
    ):
        AnswerAccuracy()(MediaBatch(torch.zeros(1, 3, 4, 4), [""]))
    with pytest.raises(
        ValueError, match="mode: expected one of exact, normalized, numeric, choice, got 'fuzzy'"
    ):
        AnswerAccuracy(mode="fuzzy")
    with pytest.raises(ValueError, match="tolerance: expected a number >= 0"):
        AnswerAccuracy(tolerance=-1)
    with pytest.raises(ValueError, match=r"threshold: expected a number in \(0, 1\]"):
        BoxIoU(threshold=1.5)
    with pytest.raises(ValueError, match="target, limit: expected integers with 0 <= target < limit"):
        LengthPenalty(target=10, limit=10)
    with pytest.raises(ValueError, match="unit: expected 'words' or 'chars'"):
        LengthPenalty(target=10, unit="tokens")
    assert (AnswerAccuracy.scope, AnswerAccuracy.differentiable) == ("sample", False)
