"""Serving a demo on a free localhost port for ``gradio_client`` or a browser. A module of its own, not the
conftest: tests that import at run time would get whichever ``conftest`` pytest loaded last."""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(blocks, **settings):
    """``blocks`` launched through ``mmalign.demos.launch`` on a free port; yields its local URL."""
    from mmalign.demos.launch import LaunchSettings, launch

    _, url, _ = launch(blocks, LaunchSettings(port=free_port(), **settings), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        blocks.close()
