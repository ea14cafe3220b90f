"""Bad input at the world's commands and loaders: exit status 2 (or a named ValueError/TypeError) whose message
names the culprit (#24). Every case fails before a model is loaded or a grid is drawn."""

import pytest

from mmalign.cli import main
from mmalign.rewards import build
from mmalign.world.captions import scene_from_prompt
from mmalign.world.render import render
from mmalign.world.scenes import Scene, SceneObject

CASES = [
    # (arguments after `mmalign world`, text the message must hold); "{tmp}" is the test's folder
    (["render", "--prompt", ""], "prompt: expected a caption of the world grammar (e.g. 'a red circle'), got ''"),
    (["render", "--prompt", "a purple elephant"], "could not read 'a purple elephant' at word 2"),
    (["render", "--prompt", "a red circle", "--n", "0"], "--n: expected a positive number"),
    (["render", "--n", "-1"], "--n: expected a positive number of images or prompts, got -1"),
    (["render", "--prompt", "a red circle", "--size", "4"], "size: expected an int of at least 8 pixels, got 4"),
    (["render", "--prompt", "a red circle", "--jitter", "2"], "jitter: expected a float in [0, 1], got 2.0"),
    (["render", "--prompt", "a red circle", "--out", "{tmp}/grid.txt"], "--out: expected an image file name"),
    (["sample", "--prompt", "", "--n", "1"], "prompt: expected a caption of the world grammar"),
    (["sample", "--prompt", "a red circle", "--n", "1", "--pipeline", "{tmp}/missing"], "pipeline: expected a pipeline folder"),
    (["sample", "--prompt", "a red circle", "--n", "1", "--device", "nodevice"], "device: expected a torch device"),
    (["sample", "--prompt", "a red circle", "--n", "1", "--steps", "0"], "argument --steps: expected an int >= 1, got '0'"),
    (["build", "--threads", "0"], "argument --threads: expected an int >= 1, got '0'"),
    (["build", "--eval-prompts", "-1"], "argument --eval-prompts: expected an int >= 0, got '-1'"),
    (["verify", "{tmp}/missing.png", "--prompt", "a red circle"], "missing.png"),
    (["verify", "{tmp}/broken.png", "--prompt", "a red circle"], "broken.png"),
    (["verify", "{tmp}/grid.png", "--scene", ""], "--scene: expected a scene as JSON"),
    (["verify", "{tmp}/grid.png", "--scene", "{bad"], "--scene: expected a scene as JSON"),
    (["verify", "{tmp}/grid.png", "--scene", '{"objects": [{"shap": "circle", "colour": "red"}]}'], "objects[0]: expected a dict with 'shape'"),
    (["verify", "{tmp}/grid.png", "--scene", '{"objects": [{"shape": "circle", "colour": "red", "x": "left"}]}'],
     "x: expected a number"),
]


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_world_command_bad_input_is_one_line_and_status_2(argv, expected, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = [] if "--out" in argv or argv[0] == "verify" else ["--out", str(tmp_path / "grid.png")]
    assert main(["world", *argv, *out]) == 2
    err = capsys.readouterr().err.strip()
    assert expected.replace("{tmp}", str(tmp_path)) in err
    assert err.startswith(("mmalign world: ", f"mmalign world {argv[0]}: ")) and len(err.splitlines()) == 1, err


def test_render_out_makes_its_folder(tmp_path):
    assert main(["world", "render", "--prompt", "a red circle", "--n", "1", "--out", str(tmp_path / "new" / "g.png")]) == 0
    assert (tmp_path / "new" / "g.png").is_file()


API = [
    (lambda: scene_from_prompt(3), TypeError, "prompt: expected a caption \\(a string\\), got int"),
    (lambda: scene_from_prompt("   "), ValueError, "prompt: expected a caption of the world grammar"),
    (lambda: Scene.from_dict({"objects": ["red circle"]}), ValueError, "objects\\[0\\]: expected a dict with 'shape'"),
    (lambda: SceneObject("circle", "red", scale="big"), ValueError, "scale: expected a number .* got 'big'"),
    (lambda: render("a red circle"), TypeError, "scene: expected a Scene, got str"),
    (lambda: build({"name": "gold", "threshold": 1}), ValueError, "reward 'gold': unknown option 'threshold'; accepted: none"),
]


@pytest.mark.parametrize(("call", "error", "message"), API, ids=[m[:40] for _, _, m in API])
def test_world_api_bad_input_raises_a_named_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
