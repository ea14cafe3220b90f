import json
import math

import pytest
import torch

from mmalign.eval.preference import (
    PreferenceRecord,
    pairwise_accuracy,
    ranking_accuracy,
    read_pairs,
    tune_tie_threshold,
)

# differences s_a − s_b: 2, −1, 0, 1, 0, NaN
SCORES_A = [3.0, 1.0, 2.0, 2.0, 5.0, math.nan]
SCORES_B = [1.0, 2.0, 2.0, 1.0, 5.0, 0.0]
LABELS = ["a", "a", "tie", "tie", "b", "a"]


@pytest.mark.parametrize(
    "protocol, threshold, expected",
    [
        ("hpdv2", 0.0, 4 / 6),  # wrong: the discordant pair and the NaN pair
        ("pickapic", 0.0, 2 / 6),  # tie predicted only for equal scores
        ("pickapic", 1.0, 3 / 6),  # |Δ| <= 1 predicts a tie
        ("pickapic", 5.0, 2 / 6),
        ("imagereward", 0.0, 1 / 4),  # gold ties left out; the score tie and the NaN pair are wrong
    ],
)
def test_pairwise_accuracy_protocols(protocol, threshold, expected):
    assert pairwise_accuracy(SCORES_A, SCORES_B, LABELS, protocol, threshold) == pytest.approx(expected)


def test_pairwise_accuracy_takes_tensors_with_gradients():
    a = torch.tensor(SCORES_A, requires_grad=True)
    assert pairwise_accuracy(a, torch.tensor(SCORES_B), LABELS, "hpdv2") == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    "scores_a, scores_b, labels, expected",
    [
        (SCORES_A, SCORES_B, LABELS, 1.0),
        ([1.0, 2.0], [0.0, 0.0], ["a", "a"], 0.0),  # no ties: never predict one
        ([1.0, 2.0, 0.0], [0.0, 0.0, 3.0], ["tie", "a", "b"], 1.0),  # the smallest of the equally good
        ([1.0, 1.0], [0.0, 0.0], ["tie", "a"], 0.0),  # at |Δ| = t a pair is predicted a tie
        ([5.0, 0.0], [0.0, 0.5], ["tie", "tie"], 5.0),
        ([math.nan], [0.0], ["tie"], 0.0),
    ],
)
def test_tune_tie_threshold(scores_a, scores_b, labels, expected):
    best = tune_tie_threshold(scores_a, scores_b, labels)
    assert best == expected
    brute = max(
        pairwise_accuracy(scores_a, scores_b, labels, "pickapic", t) for t in [0.0, 0.5, 1.0, 2.0, 3.0, 5.0]
    )
    assert pairwise_accuracy(scores_a, scores_b, labels, "pickapic", best) == pytest.approx(brute)


# Group 1: ranks 1, 2, 3, 3 (the last two tied in gold); the reward inverts images 2 and 4 (Δ = −2).
# Group 2: the reward ties the gold pair (Δ = 0). Group 3 has a single image and no pairs.
GROUP_SCORES = [[9.0, 5.0, 1.0, 7.0], torch.tensor([1.0, 1.0, 0.0]), [0.3]]
GROUP_RANKS = [[1, 2, 3, 3], [2, 1, 3], [1]]


@pytest.mark.parametrize(
    "protocol, threshold, expected",
    [
        ("hpdv2", 0.0, (5 / 6 + 3 / 3) / 2),  # per prompt, then averaged (pooled would be 8/9)
        ("imagereward", 0.0, 6 / 8),  # pooled non-tie pairs: group 1 4/5, group 2 2/3
        ("pickapic", 0.0, 6 / 9),
        ("pickapic", 2.0, 3 / 9),
    ],
)
def test_ranking_accuracy(protocol, threshold, expected):
    assert ranking_accuracy(GROUP_SCORES, GROUP_RANKS, protocol, threshold) == pytest.approx(expected)


def test_a_pair_is_a_group_of_two():
    groups = [[a, b] for a, b in zip(SCORES_A, SCORES_B)]
    ranks = [{"a": [1, 2], "b": [2, 1], "tie": [1, 1]}[label] for label in LABELS]
    for protocol in ("hpdv2", "pickapic", "imagereward"):
        assert ranking_accuracy(groups, ranks, protocol) == pytest.approx(
            pairwise_accuracy(SCORES_A, SCORES_B, LABELS, protocol)
        )


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: pairwise_accuracy([1.0], [1.0, 2.0], ["a"]), "expected equal lengths, got 1, 2, 1"),
        (lambda: pairwise_accuracy([1.0], [2.0], ["A"]), r"labels: expected 'a', 'b' or 'tie', got \['A'\]"),
        (lambda: pairwise_accuracy([1.0], [2.0], ["a"], "hps"), "protocol: expected one of hpdv2, pickapic"),
        (
            lambda: pairwise_accuracy([1.0], [2.0], ["a"], "hpdv2", 0.1),
            "only the pickapic protocol predicts ties",
        ),
        (
            lambda: pairwise_accuracy([1.0], [2.0], ["a"], "pickapic", -1.0),
            "tie_threshold: expected a number >= 0",
        ),
        (lambda: pairwise_accuracy([1.0], [2.0], ["tie"], "imagereward"), "every pair is a tie"),
        (lambda: pairwise_accuracy([], [], []), "expected at least one pair"),
        (lambda: pairwise_accuracy([[1.0]], [[2.0]], ["a"]), "scores_a: expected a 1-D sequence"),
        (
            lambda: ranking_accuracy([[1.0, 2.0]], [[1]]),
            r"ranks\[0\]: expected one rank per score \(2\), got 1",
        ),
        (lambda: ranking_accuracy([[1.0]], []), "expected one group each per prompt, got 1 and 0"),
        (lambda: ranking_accuracy([[1.0]], [[1]]), "expected at least one group with two or more images"),
    ],
)
def test_errors_name_the_argument(call, error):
    with pytest.raises(ValueError, match=error):
        call()


def test_read_pairs(tmp_path):
    rows = [
        {"prompt": "a red circle", "a": "img/0.png", "b": "/abs/1.png", "label": "b", "scene": {"n": 1}},
        {"prompt": "two squares", "images": ["x.png", "y.png", "z.png"], "ranks": [2, 1, 2]},
        {"prompt": "a tie", "a": "p.png", "b": "q.png", "label": "tie"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    first, group, tie = read_pairs(path)
    assert first == PreferenceRecord(
        "a red circle", [str(tmp_path / "img/0.png"), "/abs/1.png"], [2, 1], {"scene": {"n": 1}}
    )
    assert first.label == "b" and tie.label == "tie" and tie.ranks == [1, 1]
    assert group.ranks == [2, 1, 2] and group.images[2] == str(tmp_path / "z.png") and group.metadata == {}
    with pytest.raises(ValueError, match="label: defined for pairs, this record ranks 3 images"):
        _ = group.label


@pytest.mark.parametrize(
    "line, error",
    [
        ("{not json", "line 1: expected a JSON object, got invalid JSON"),
        ('["a", "b"]', "line 1: expected an object with a string 'prompt'"),
        ('{"a": "x", "b": "y", "label": "a"}', "expected an object with a string 'prompt'"),
        (
            '{"prompt": "p", "a": "x", "b": "y", "label": "left"}',
            "expected label 'a', 'b' or 'tie', got 'left'",
        ),
        ('{"prompt": "p", "a": "x", "b": "y"}', "expected label 'a', 'b' or 'tie', got None"),
        ('{"prompt": "p", "images": ["x", "y"]}', "expected integer 'ranks'"),
        ('{"prompt": "p", "images": ["x", "y"], "ranks": [1]}', r"expected one rank per image \(2\), got 1"),
        ('{"prompt": "p", "images": ["x"], "ranks": [1]}', "expected two or more image paths"),
        ('{"prompt": "p", "a": "x", "b": 3, "label": "a"}', "expected two or more image paths"),
        (
            '{"prompt": "p", "image": "x"}',
            r"expected 'a', 'b' and 'label', or 'images' and 'ranks'; got \['image'",
        ),
    ],
)
def test_read_pairs_errors_name_the_line(tmp_path, line, error):
    path = tmp_path / "pairs.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=f"pairs.jsonl {error}" if error.startswith("line") else error):
        read_pairs(path)
    with pytest.raises(ValueError, match="path: expected a pairs.jsonl file"):
        read_pairs(tmp_path / "missing.jsonl")
