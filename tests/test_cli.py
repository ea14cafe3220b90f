import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.config import recipes_dir

EXAMPLES = recipes_dir().parent / "examples" / "shapes"


def test_help_of_the_installed_command():
    exe = Path(sys.executable).parent / "mmalign"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "mmalign"]
    out = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True).stdout
    assert "recipes" in out and "score" in out


def test_recipes_lists_shipped(capsys):
    assert main(["recipes"]) == 0
    assert "score-example" in capsys.readouterr().out


def test_score_recipe_with_override_writes_csv(tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert main(["score", "score-example", f"out={out}", "batch_size=3", "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8 and rows[0]["file"] == "00_red_circle.png"
    assert float(rows[0]["jpeg_compressibility"]) == -float(rows[0]["jpeg_incompressibility"])
    printed = capsys.readouterr().out
    assert "jpeg_compressibility" in printed and "wrote 8 rows" in printed


def test_score_flags_write_json(tmp_path):
    out = tmp_path / "scores.json"
    code = main(
        ["score", "--images", str(EXAMPLES), "--reward", '{"name": "jpeg_compressibility", "quality": 50}',
         "--out", str(out), "--quiet"]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 8 and data["summary"]["jpeg_compressibility"]["non_finite"] == 0
    mean = sum(r["jpeg_compressibility"] for r in data["rows"]) / 8
    assert data["summary"]["jpeg_compressibility"]["mean"] == pytest.approx(mean, rel=1e-5)


def test_score_clip_on_a_local_model(tmp_path, tiny_open_clip_dir):
    out = tmp_path / "clip.csv"
    spec = json.dumps({"name": "clip", "model": str(tiny_open_clip_dir)})
    assert main(["score", "--images", str(EXAMPLES), "--reward", spec, "--out", str(out), "--quiet"]) == 0
    assert "clip/cosine" in out.read_text().splitlines()[0]


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["score", "score-example", "batch_sise=3"]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err
    assert main(["score", "--images", str(tmp_path), "--reward", "jpeg_compressibility", "--quiet"]) == 2
    assert "found none" in capsys.readouterr().err
    assert main(["score", "--images", str(EXAMPLES), "--reward", "{bad json"]) == 2
    assert "--reward: expected a reward name or a JSON object" in capsys.readouterr().err
    assert main([]) == 2  # argparse's errors too: one line
    assert capsys.readouterr().err == "mmalign: the following arguments are required: COMMAND\n"


def test_rewards_lists_names(capsys):
    assert main(["rewards"]) == 0
    out = capsys.readouterr().out
    assert "clip" in out and "jpeg_compressibility" in out and "ensemble" in out


def test_eval_reward_on_jpeg_labelled_pairs(tmp_path, capsys):
    """Pairs labelled by file size independently (PIL): compressibility agrees with all, its negation with none."""
    import io

    from PIL import Image

    files = sorted(EXAMPLES.glob("*.png"))

    def kb(path):
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=95)
        return buffer.tell()

    rows = []
    for a, b in zip(files[:-1], files[1:]):
        if kb(a) != kb(b):
            rows.append({"prompt": "p", "a": str(a), "b": str(b), "label": "a" if kb(a) < kb(b) else "b"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "acc.json"
    code = main(["eval", "reward", "--pairs", str(tmp_path / "pairs.jsonl"), "--reward", "jpeg_compressibility",
                 "--reward", "jpeg_incompressibility", "--out", str(out), "--quiet"])
    assert code == 0
    table = json.loads(out.read_text())["accuracy"]
    assert table["jpeg_compressibility"] == {"hpdv2": 1.0, "pickapic": 1.0, "imagereward": 1.0}
    assert table["jpeg_incompressibility"]["imagereward"] == 0.0
    assert f"{len(rows)} records" in capsys.readouterr().out


def test_train_then_eval_generator(tmp_path, tiny_sd_factory, capsys):
    """`mmalign train` on a saved tiny pipeline ends with a report; `mmalign eval generator --run` reads the run."""
    tiny_sd_factory(seed=0).save_pretrained(tmp_path / "pipe")
    recipe = tmp_path / "tiny-prdp.yaml"
    recipe.write_text(
        f"# mmalign train {recipe}\ntask: prdp\npipeline: {tmp_path / 'pipe'}\nprompts: {{world: train, n: 8}}\n"
        "reward: [jpeg_incompressibility]\n"
        "log_rewards: [gold]\nepochs: 1\nprompts_per_epoch: 2\nsamples_per_prompt: 2\nprompts_per_update: 2\n"
        f"num_steps: 2\nlora: {{rank: 2, alpha: 2}}\noutput_dir: {tmp_path / 'run'}\n"
        "report: {prompts: {world: heldout, n: 2, seed: 1}, samples_per_prompt: 2, rewards: [gold]}\n"
    )
    assert main(["train", str(recipe), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["before"]["gold"]["n"] == 4 and "gold" in summary["change"]
    paired = summary["paired_change"]["gold"]  # same prompts and seeds: the mean of the differences is the change
    assert paired["n"] == 4 and paired["mean"] == pytest.approx(summary["change"]["gold"])
    for name in ("grid.png", "curves.png", "metrics.jsonl", "lora/pytorch_lora_weights.safetensors"):
        assert (tmp_path / "run" / name).is_file(), name
    assert "run folder" in capsys.readouterr().out
    out = tmp_path / "eval.json"
    assert "diversity/vendi" not in summary["before"]  # jpeg has no image encoder: pixel metrics only
    assert summary["before"]["diversity/color_entropy"]["n"] == 2 and "diversity/brightness" in summary["paired_change"]
    assert main(["eval", "generator", "--run", str(tmp_path / "run"), "--n", "2", "--samples-per-prompt", "2",
                 "--diversity-encoder", "proxy", "--out", str(out), "--quiet"]) == 0
    evaluated = json.loads(out.read_text())
    assert evaluated["steps"] == 2 and evaluated["summary"]["gold"]["n"] == 4
    assert evaluated["summary"]["diversity/vendi"]["n"] == 2 and evaluated["diversity_encoder"] == "proxy"
    assert all(1 - 1e-6 <= v <= 2 + 1e-6 for v in evaluated["diversity_per_prompt"]["diversity/vendi"])
    assert "diversity/vendi" in capsys.readouterr().out
    assert main(["eval", "generator", "--n", "2"]) == 2  # neither --run nor --pipeline
