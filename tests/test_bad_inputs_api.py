"""Bad input at the Python API: MediaBatch and its constructors, recipes and overrides, reward specs and
forwards. Each raises ValueError or TypeError with a message that names the culprit (#24)."""

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.config import check_device, load_recipe, parse_overrides, recipes_dir, validate_recipe
from mmalign.eval.scoring import ScoreRecipe
from mmalign.media import MediaBatch, open_image
from mmalign.rewards import WeightedSum, build

EXAMPLES = recipes_dir().parent / "examples" / "shapes"
IMAGE = torch.zeros(1, 3, 8, 8)


def _unreadable(tmp_path):
    (tmp_path / "a.png").write_text("not an image")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    return tmp_path


CASES = [
    # (call, exception type, regex the message must match); a call takes the test's tmp_path
    (lambda t: MediaBatch.from_folder(_unreadable(t)), ValueError, r"image: .*a\.png'.*on_error='skip'"),
    (lambda t: MediaBatch.from_folder(_unreadable(t), on_error="skip"), ValueError, r"could read none of \['a.png'\]"),
    (lambda t: MediaBatch.from_folder(EXAMPLES, on_error="ignore"), ValueError, "on_error: expected 'stop' or 'skip', got 'ignore'"),
    (lambda t: MediaBatch.from_folder(EXAMPLES, size=0), ValueError, "size: expected a positive int"),
    (lambda t: MediaBatch.from_folder(EXAMPLES, size="big"), ValueError, "size: expected a positive int.*'big'"),
    (lambda t: MediaBatch.from_folder(None), TypeError, "folder: expected a path"),
    (lambda t: MediaBatch.from_folder(EXAMPLES, prompts=3), TypeError, "prompts: expected a list of strings.*got int"),
    (lambda t: (t / "p.jsonl").write_text("{bad\n") and MediaBatch.from_folder(EXAMPLES, prompts=t / "p.jsonl"),
     ValueError, "prompts: line 1 of p.jsonl: expected a JSON object"),
    (lambda t: (t / "p.jsonl").write_text("\n[1]\n") and MediaBatch.from_folder(EXAMPLES, prompts=t / "p.jsonl"),
     ValueError, "prompts: line 2 of p.jsonl needs 'file' and 'prompt'"),
    (lambda t: open_image(t / "missing.png"), ValueError, "image: expected a readable image file, got '.*missing.png'"),
    (lambda t: MediaBatch(torch.zeros(1, 3, 0, 8), ["a"]), ValueError, r"pixels: expected non-empty samples, got shape \(1, 3, 0, 8\)"),
    (lambda t: MediaBatch(IMAGE, ["a"], None, 3), TypeError, "completions: expected a list of strings or None, got int"),
    (lambda t: MediaBatch.from_uint8(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), None), TypeError, "prompts: expected a list of strings, got NoneType"),
    (lambda t: MediaBatch.from_numpy(np.zeros((1, 8, 8, 3), np.uint8), "a"), TypeError, "prompts: expected a list of strings, got str"),
    (lambda t: MediaBatch.from_numpy([], []), ValueError, "arrays: expected at least one sample"),
    (lambda t: MediaBatch.from_pil(None, ["a"]), TypeError, "images: expected a list of PIL images, got NoneType"),
    (lambda t: MediaBatch.from_pil(Image.new("RGB", (8, 8)), ["a"]), TypeError, "images: expected a list of PIL images, got Image"),
    (lambda t: MediaBatch.concat([MediaBatch(IMAGE, ["a"]), IMAGE]), TypeError, r"batches: expected MediaBatch objects.*\[1\]"),
    (lambda t: build({"name": "jpeg_compressibility", "weight": "x"}), ValueError,
     r"reward spec \{'name': 'jpeg_compressibility', 'weight': 'x'\}: weight: expected a finite number, got 'x'"),
    (lambda t: build([{"name": "jpeg_compressibility", "weight": float("nan")}]), ValueError, "weight: expected a finite number, got nan"),
    (lambda t: build({"name": "jpeg_compressibility", "weight": True}), ValueError, "weight: expected a finite number, got True"),
    (lambda t: build({"name": None}), ValueError, "name: expected a reward name.*got None"),
    (lambda t: build([]), ValueError, "spec: expected .* non-empty list .* got \\[\\]"),
    (lambda t: build(["jpeg_compressibility", 3]), ValueError, r"spec\[1\]: expected a reward name or a dict"),
    (lambda t: build({"name": "goal_baseline"}), ValueError, "reward 'goal_baseline': expected the option\\(s\\) 'baseline'"),
    (lambda t: WeightedSum([build("jpeg_compressibility")], ["x"]), ValueError, r"weights\[0\]: expected a finite number, got 'x'"),
    (lambda t: build("jpeg_compressibility")(IMAGE), TypeError, "batch: expected a MediaBatch, got Tensor"),
    (lambda t: build("format")(MediaBatch(IMAGE, ["a"])), ValueError, "completions: format scores VLM text"),
    (lambda t: parse_overrides(["a=[1"]), ValueError, "override a: expected a YAML value, got '\\[1'"),
    (lambda t: parse_overrides(["a..b=1"]), ValueError, "override: expected key=value.*'a..b=1'"),
    (lambda t: parse_overrides([3]), ValueError, "override: expected key=value.*got 3"),
    (lambda t: parse_overrides("batch_size=3"), TypeError, "overrides: expected a list of 'key=value' strings"),
    (lambda t: load_recipe(None), TypeError, "recipe: expected a shipped recipe's name or a YAML file, got NoneType"),
    (lambda t: load_recipe("score-example", ["rewards.x.weight=2"]), ValueError, "override rewards.x: index 'x' is not valid"),
    (lambda t: load_recipe("score-example", ["out=scores.txt"]), ValueError, "out: expected a .csv or .json file, got 'scores.txt'$"),
    (lambda t: load_recipe("score-example", ["rewards=[[3]]"]), ValueError, "rewards.0: expected a reward name, a dict"),
    (lambda t: validate_recipe({"images": ".", "rewards": ["clip"], "device": "gpu"}, ScoreRecipe), ValueError,
     "device: expected a torch device such as 'cpu'.*got 'gpu'"),
    (lambda t: check_device("cuda:99", "--device"), ValueError, "--device: expected 'cpu' or one of the .* got 'cuda:99'"),
]


@pytest.mark.parametrize(("call", "error", "message"), CASES, ids=[f"{i:02d}-{c[2][:40]}" for i, c in enumerate(CASES)])
def test_bad_input_raises_a_named_error(call, error, message, tmp_path):
    with pytest.raises(error, match=message):
        call(tmp_path)
