"""``mmalign demo``: gradio stays an optional import of the demos package alone; without it the command says in
one line how to install it; bad flags end in one line and status 2; the share flag prints its warning."""

import ast
import sys
from pathlib import Path

import pytest

import mmalign
from mmalign.cli import main

PACKAGE = Path(mmalign.__file__).parent


def test_only_the_demos_import_gradio():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("gradio", "gradio_client") for n in names):
                importers.append(path.relative_to(PACKAGE).parts[0])
    assert importers and set(importers) == {"demos"}


def test_without_gradio_the_command_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    assert main(["demo", "rewards"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("mmalign demo: the demos need gradio") and 'pip install "mmalign[demo]"' in err


@pytest.mark.parametrize(("argv", "message"), [
    (["demo", "compare"], "--run: the compare demo needs a training run folder"),
    (["demo", "rewards", "--allow-dir", "/no/such/folder"], "--allow-dir: expected an existing folder"),
    (["demo", "rewards", "--max-upload-mb", "-1"], "max_upload_mb: expected a size in MB > 0, got -1.0"),
    (["demo", "reno", "--pipeline", "none"], "--pipeline: the reno demo needs a generator"),
    (["demo", "nope"], "invalid choice: 'nope'"),
])
def test_bad_flags_end_in_one_line(argv, message, capsys):
    pytest.importorskip("gradio")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_share_and_open_hosts_print_a_warning(capsys):
    pytest.importorskip("gradio")
    from mmalign.demos.launch import SHARE_WARNING, LaunchSettings, launch

    class Recorder:
        def queue(self, **kwargs):
            self.queued = kwargs

        def launch(self, **kwargs):
            self.launched = kwargs

    blocks = Recorder()
    launch(blocks, LaunchSettings(host="0.0.0.0", share=True, concurrency=3, allowed_dirs=("/data",)))
    err = capsys.readouterr().err
    assert SHARE_WARNING in err and "--host 0.0.0.0" in err
    assert blocks.queued == {"default_concurrency_limit": 3, "max_size": 64}
    assert blocks.launched["share"] is True and blocks.launched["allowed_paths"] == ["/data"]
    assert blocks.launched["max_file_size"] == 10 * 1024 * 1024
    launch(blocks, LaunchSettings())
    assert capsys.readouterr().err == "" and blocks.launched["server_name"] == "127.0.0.1"
    assert blocks.launched["allowed_paths"] == [] and blocks.launched["share"] is False
