"""``mmalign world ...`` subcommands, the prompt parser they use and the image grid."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.eval.grid import image_grid
from mmalign.world.captions import prompt_set, scene_from_prompt
from mmalign.world.commands import add_world_parser
from mmalign.world.render import render


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mmalign")
    add_world_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def _stated(scene):
    """What a prompt states about a scene (layouts differ)."""
    objects = [(o.colour, o.shape, o.scale, o.position, o.size) for o in scene.objects]
    return objects, scene.relation, scene.background_stated, scene.background if scene.background_stated else None


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_caption_parses_back_to_its_scene(split):
    for prompt in prompt_set(split, 300, 2):
        assert _stated(scene_from_prompt(prompt.text, seed=1)) == _stated(prompt.scene), prompt.text


@pytest.mark.parametrize("text", ["a red zebra", "two blue", "a red circle on a pink background", "",
                                  "a red circle and a blue box and a green disc and a cyan box"])
def test_prompts_outside_the_grammar_are_rejected(text):
    with pytest.raises(ValueError, match="prompt"):
        scene_from_prompt(text)


def test_render_then_verify(tmp_path, capsys):
    prompt = "a large yellow triangle at the top on a black background"
    assert run("world", "render", "--prompt", prompt, "--n", "2", "--out", str(tmp_path / "r.png")) == 0
    assert Image.open(tmp_path / "r.png").size[0] > 2 * 128
    image = render(scene_from_prompt(prompt, seed=3), 32, 1.0, rng=3)
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / "one.png")
    capsys.readouterr()
    assert run("world", "verify", str(tmp_path / "one.png"), "--prompt", prompt) == 0
    assert "one.png: 1.000" in capsys.readouterr().out
    wrong = "a small blue circle at the bottom on a white background"
    run("world", "verify", str(tmp_path / "one.png"), "--prompt", wrong)
    assert "one.png: 0.167" in capsys.readouterr().out  # only the count (one object) holds


def test_sample_writes_a_grid_with_verdicts(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert run("world", "sample", "--prompt", "a red circle", "--n", "2", "--steps", "3", "--out", str(out)) == 0
    assert out.is_file() and "mean gold" in capsys.readouterr().out


def test_build_command_smoke(tmp_path):
    assert run("world", "build", "--only", "proxy", "--steps", "1", "--out", str(tmp_path), "--eval-prompts", "0",
               "--quiet") == 0
    assert (tmp_path / "proxy" / "open_clip_config.json").is_file()


def test_build_command_builds_the_vlm_alone(tmp_path, monkeypatch):
    import mmalign.world.build as build_module

    built = []

    def fake_build_vlm(folder, steps, progress):  # the real build is tested in test_vlm.py
        built.append(steps)
        folder.mkdir()

    monkeypatch.setattr(build_module, "build_vlm", fake_build_vlm)
    assert run("world", "build", "--only", "vlm", "--steps", "2", "--out", str(tmp_path), "--quiet") == 0
    assert built == [2] and (tmp_path / "vlm").is_dir() and not (tmp_path / "proxy").exists()


def test_grid_layout():
    images = torch.rand(5, 3, 32, 32)
    sheet = image_grid(images, ["a long caption that has to wrap onto several lines\ngold 0.50"] * 5, columns=2)
    assert sheet.width == 2 * (128 + 4) + 4 and sheet.height > 3 * 128
    tile = torch.from_numpy(np.asarray(sheet)[4:132, 4:132].copy()).permute(2, 0, 1).float() / 255
    assert torch.allclose(tile[:, ::4, ::4], images[0], atol=1 / 255)  # nearest-neighbour enlargement
    with pytest.raises(ValueError, match="labels"):
        image_grid(images, ["x"])
