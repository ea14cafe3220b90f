"""The artifact classifier: training from two folders separates them, the saved head loads by name and gives the
figure training reported, gradients reach the pixels (finite differences, float64), bad inputs are named; the
`mmalign reward train-artifact` command."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pixel_gradients import assert_pixel_gradient

from mmalign import MediaBatch
from mmalign.cli import main
from mmalign.eval.agreement import auroc
from mmalign.eval.artifact import train_artifact_classifier
from mmalign.rewards import build
from mmalign.rewards.artifact import ArtifactHead, load_artifact_head, save_artifact_head
from mmalign.rewards.corruptions import corrupt


def _save(image: torch.Tensor, path) -> None:
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Smooth mid-grey images, and the same kind of images with a strong checkerboard: a toy task a linear head
    on any reasonable image features must solve."""
    root = tmp_path_factory.mktemp("artifact_folders")
    generator = torch.Generator().manual_seed(0)
    for name in ("clean", "artifact"):
        (root / name).mkdir()
    for i in range(20):
        clean = 0.4 + 0.2 * torch.rand(3, 32, 32, generator=generator)
        _save(clean, root / "clean" / f"{i:02d}.png")
        other = 0.4 + 0.2 * torch.rand(3, 32, 32, generator=generator)
        _save(corrupt(other, "checkerboard", 1.0), root / "artifact" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def trained(folders, tiny_open_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "head"
    figures = train_artifact_classifier(folders / "clean", folders / "artifact", out, str(tiny_open_clip_dir),
                                        steps=100, progress=False)
    return out, figures


def test_training_separates_the_folders(trained):
    out, figures = trained
    assert figures["heldout_auroc"] >= 0.9 and figures["train_auroc"] >= 0.9
    assert (figures["clean"]["train"], figures["clean"]["heldout"]) == (16, 4)
    assert json.loads((out / "config.json").read_text())["training"] == figures
    head, config = load_artifact_head(out)
    assert config["encoder"]["pretrained"] is None and not torch.equal(head.scale, torch.ones_like(head.scale))


def test_saved_head_loads_by_name_and_scores_as_training_reported(trained, folders):
    out, figures = trained
    reward = build({"name": "artifact_classifier", "path": str(out)})
    scores = {}
    for name in ("clean", "artifact"):
        files = figures[name]["heldout_files"]
        images = [Image.open(folders / name / f) for f in files]
        result = reward(MediaBatch.from_pil(images, [""] * len(files)))
        torch.testing.assert_close(result.scores + result.components["p_artifact"], torch.ones(len(files)))
        scores[name] = result.scores
    assert auroc(scores["clean"], scores["artifact"]) == figures["heldout_auroc"]
    assert scores["clean"].mean() > 0.5 > scores["artifact"].mean()


@pytest.mark.parametrize("hidden", [0, 8])
def test_gradients_reach_the_pixels(hidden, tiny_open_clip_dir, tmp_path):
    torch.manual_seed(hidden)
    head = ArtifactHead(32, hidden)
    save_artifact_head(tmp_path / "head", head, {"backend": "open_clip", "model": str(tiny_open_clip_dir),
                                                 "pretrained": None, "processor": None}, {})
    reward = build({"name": "artifact_classifier", "path": str(tmp_path / "head"), "dtype": "float64"})

    def total(p):
        return reward(MediaBatch(p, ["", ""])).scores.double().sum()

    assert_pixel_gradient(total, batch=2, seed=3)


def test_bad_inputs_are_named(folders, tiny_open_clip_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    _save(torch.rand(3, 32, 32), tmp_path / "one" / "a.png")
    (tmp_path / "broken").mkdir()
    for f in ("a.png", "b.png"):
        (tmp_path / "broken" / f).write_bytes((folders / "clean" / "00.png").read_bytes())
    (tmp_path / "broken" / "c.png").write_text("not an image")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")

    def train(clean=folders / "clean", artifact=folders / "artifact", out=tmp_path / "head", **options):
        return train_artifact_classifier(clean, artifact, out, **{"encoder": str(tiny_open_clip_dir), "steps": 2,
                                                                  "progress": False, **options})

    cases = [
        ({"clean": tmp_path / "missing"}, "clean: folder: expected a directory of images"),
        ({"artifact": tmp_path / "empty"}, "artifact: folder: expected images"),
        ({"artifact": folders / "clean"}, "clean, artifact: expected two different folders"),
        ({"artifact": tmp_path / "one"}, "artifact: expected at least 2 images"),
        ({"clean": tmp_path / "broken"}, "broken/c.png"),
        ({"out": tmp_path / "other"}, "out: expected a new folder or a saved artifact classifier"),
        ({"steps": 0}, "steps: expected an int >= 1, got 0"),
        ({"hidden": -1}, "hidden: expected an int >= 0"),
        ({"heldout": 1.0}, "heldout: expected a fraction in (0, 1)"),
        ({"encoder": {"modle": "x"}}, "encoder: expected a dict with a 'model'"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError) as err:
            train(**options)
        assert message in str(err.value), (options, str(err.value))
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me" and not (tmp_path / "head").exists()
    with pytest.warns(UserWarning, match="c.png"):
        figures = train(clean=tmp_path / "broken", on_error="skip")
    assert figures["clean"]["train"] + figures["clean"]["heldout"] == 2

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    for path, message in [(tmp_path / "missing", "which is not a folder"),
                          (tmp_path / "half", "which lacks head.safetensors")]:
        with pytest.raises(ValueError, match="path: expected an artifact classifier folder") as err:
            build({"name": "artifact_classifier", "path": str(path)})
        assert message in str(err.value)


def test_cli_prints_the_heldout_auroc(folders, tiny_open_clip_dir, tmp_path, capsys):
    out = tmp_path / "head"
    argv = ["reward", "train-artifact", "--clean", str(folders / "clean"), "--artifact", str(folders / "artifact"),
            "--out", str(out), "--encoder", str(tiny_open_clip_dir), "--steps", "50", "--quiet"]
    assert main(argv) == 0
    heldout = json.loads((out / "config.json").read_text())["training"]["heldout_auroc"]
    assert f"held-out AUROC {heldout:.4f}" in capsys.readouterr().out
    argv[argv.index("--clean") + 1] = str(tmp_path / "missing")
    assert main(argv) == 2
    assert "clean: folder: expected a directory of images" in capsys.readouterr().err
