"""Bad input at the ``mmalign`` command: exit status 2 and one line on stderr that names the culprit (#24).

Every case fails at validation, before a model is trained or a folder is scored.
"""

import json
import re
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.config import recipes_dir

EXAMPLES = str(recipes_dir().parent / "examples" / "shapes")


def _folders(root: Path) -> None:
    (root / "unreadable").mkdir()
    (root / "unreadable" / "a.png").write_text("not an image")
    (root / "unreadable" / "prompts.txt").write_text("a red circle\n")
    (root / "half").mkdir()
    (root / "half" / "config.json").write_text('{"pipeline": "world"')
    (root / "noconfig").mkdir()
    (root / "listconfig").mkdir()
    (root / "listconfig" / "config.json").write_text("[1]")
    (root / "nobase" / "lora").mkdir(parents=True)
    (root / "nobase" / "config.json").write_text("{}")
    (root / "bad.yaml").write_text("task: score\n  images: [\n")


SCORE = ["score", "--images", EXAMPLES, "--quiet", "--out"]  # + an output file, then the case's own flags
CASES = [
    # (arguments, text the message must hold); "{tmp}" is the test's folder, "{out}" an output file in it
    (["score", "--images", "{tmp}/unreadable", "--reward", "jpeg_compressibility", "--quiet", "--out", "{out}"],
     "unreadable/a.png"),
    (["score", "--images", "{tmp}/unreadable", "--reward", "jpeg_compressibility", "--quiet", "--out", "{out}",
      "--skip-unreadable"], "could read none of ['a.png']"),
    (["score", "--images", "{tmp}/missing", "--reward", "jpeg_compressibility", "--quiet"], "folder: expected a directory"),
    ([*SCORE, "{out}", "--reward", '{"name": "jpeg_compressibility", "weight": "x"}'], "weight: expected a finite number, got 'x'"),
    ([*SCORE, "{out}", "--reward", '[{"name": "jpeg_compressibility", "weight": null}]'], "weight: expected a finite number, got None"),
    ([*SCORE, "{out}", "--reward", '{"name": 3}'], "name: expected a reward name"),
    ([*SCORE, "{out}", "--reward", "[]"], "non-empty list"),
    ([*SCORE, "{out}", "--reward", "[3]"], "rewards.0: expected a reward name, a dict"),
    ([*SCORE, "{out}", "--reward", "{bad json"], "--reward: expected a reward name or a JSON object"),
    ([*SCORE, "{out}", "--reward", "nosuch"], "unknown reward 'nosuch'"),
    ([*SCORE, "{out}", "--reward", '{"name": "jpeg_compressibility", "qualty": 50}'], "did you mean 'quality'"),
    ([*SCORE, "{out}", "--reward", '{"name": "length_penalty"}'], "expected the option(s) 'target'"),
    ([*SCORE, "{out}", "--reward", "jpeg_compressibility", "--device", "nodevice"], "device: expected a torch device"),
    ([*SCORE, "{out}", "--reward", "jpeg_compressibility", "--device", "cuda:99"], "got 'cuda:99'"),
    ([*SCORE, "{out}", "--reward", "jpeg_compressibility", "--size", "0"], "size: Input should be greater than or equal to 1"),
    ([*SCORE, "{tmp}/scores.txt", "--reward", "jpeg_compressibility"], "out: expected a .csv or .json file, got"),
    ([*SCORE, "{out}", "--reward", "jpeg_compressibility", "--prompts", "{tmp}/missing.txt"], "prompts: expected a .txt or .jsonl file"),
    (["score", "score-example", "batch_size=[1"], "override batch_size: expected a YAML value, got '[1'"),
    (["score", "score-example", "rewards.5.weight=2"], "override rewards.5: index '5' is not valid"),
    (["score", "score-example", "a..b=1"], "override: expected key=value"),
    (["score", "score-example", "batch_sise=3"], "did you mean 'batch_size'"),
    (["score", "{tmp}/bad.yaml"], "not valid YAML"),
    (["score", "nosuch-recipe"], "recipe: 'nosuch-recipe' is neither a YAML file nor a shipped recipe"),
    (["train", "score-example"], "is not a training task"),
    (["train", "shapes-prdp", "epochs=-1"], "epochs: Input should be greater than or equal to 1"),
    (["optimize", "score-example"], "is not noise optimisation"),
    (["eval", "generator"], "give exactly one of --run"),
    (["eval", "generator", "--run", "{tmp}/missing"], "'{tmp}/missing' which is not a directory"),
    (["eval", "generator", "--run", "{tmp}/noconfig"], "no config.json"),
    (["eval", "generator", "--run", "{tmp}/half"], "half/config.json' is not valid JSON"),
    (["eval", "generator", "--run", "{tmp}/listconfig"], "expected a JSON object, got list"),
    (["eval", "generator", "--run", "{tmp}/nobase"], "names no base 'pipeline'"),
    (["eval", "generator", "--pipeline", "{tmp}/missing"], "pipeline: expected a pipeline folder"),
    (["eval", "reward", "--pairs", "{tmp}/missing.jsonl", "--reward", "jpeg_compressibility"], "missing.jsonl"),
    (["eval", "generator", "--pipeline", "world", "--n", "0"], "argument --n: expected an int >= 1, got '0'"),
    (["eval", "generator", "--pipeline", "world", "--steps", "0"], "argument --steps: expected an int >= 1, got '0'"),
    (["bench", "rewards", "--batch-sizes", "8", "0"], "argument --batch-sizes: expected an int >= 1, got '0'"),
    (["bench", "rewards", "--model", "{tmp}/missing"],
     "--model: expected an OpenCLIP folder (open_clip_config.json and weights), got '{tmp}/missing'"),
    (["bench", "train", "--prompts", "0"], "argument --prompts: expected an int >= 1, got '0'"),
    (["bench", "train", "--steps", "ten"], "argument --steps: expected an int >= 1, got 'ten'"),
]


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_and_status_2(argv, expected, tmp_path, capsys):
    _folders(tmp_path)
    fill = {"{tmp}": str(tmp_path), "{out}": str(tmp_path / "scores.csv")}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    assert main([filled(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert filled(expected) in err
    assert re.match(rf"mmalign {argv[0]}( \w+)?: ", err) and "Traceback" not in err  # the (sub)command
    assert len(err.splitlines()) == 1, err


def test_skip_unreadable_scores_the_rest_and_names_what_it_left_out(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("00_red_circle.png", "01_blue_square.png"):
        (images / name).write_bytes((Path(EXAMPLES) / name).read_bytes())
    (images / "02_broken.png").write_bytes(b"\x89PNG truncated")
    (images / "prompts.txt").write_text("a red circle\na blue square\nbroken\n")
    out = tmp_path / "scores.json"
    argv = ["score", "--images", str(images), "--reward", "jpeg_compressibility", "--quiet", "--out", str(out)]
    assert main(argv) == 2
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable file\(s\).*02_broken.png"):
        assert main([*argv, "--skip-unreadable"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["file"], r["prompt"]) for r in rows] == [("00_red_circle.png", "a red circle"),
                                                         ("01_blue_square.png", "a blue square")]
