"""Launching a demo with safe defaults: bound to localhost, a bounded queue, upload limits and no file served
outside the folders the user names. Every demo goes through ``launch`` so the defaults cannot drift apart.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mmalign.demos import require_gradio

__all__ = ["DEFAULT_LIMITS", "LOCAL_HOSTS", "SHARE_WARNING", "Limits", "LaunchSettings", "allowed_folders", "launch", "user_errors"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SHARE_WARNING = ("warning: --share opens a public gradio.live link: anyone with it can run the models on this "
                 "machine and upload files to it, until the demo stops")


@dataclass(frozen=True)
class Limits:
    """What one request may bring: uploaded bytes per file, the longest image side, images per request."""

    max_upload_mb: float = 10.0
    max_image_side: int = 2048
    max_images: int = 16

    def __post_init__(self) -> None:
        if not self.max_upload_mb > 0:
            raise ValueError(f"max_upload_mb: expected a size in MB > 0, got {self.max_upload_mb!r}")
        for name in ("max_image_side", "max_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


#: the limits of ``mmalign demo`` without flags
DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class LaunchSettings:
    """Where and how a demo serves: ``host`` (localhost unless asked), ``port`` (None: gradio picks from 7860),
    ``share`` (a public link), ``concurrency`` (requests run at once; the rest wait in a queue of
    ``max_queue``), ``allowed_dirs`` (the only folders gradio may serve files from) and the upload ``limits``."""

    host: str = "127.0.0.1"
    port: int | None = None
    share: bool = False
    concurrency: int = 2
    max_queue: int = 64
    allowed_dirs: tuple[str, ...] = ()
    limits: Limits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")


def allowed_folders(paths: Sequence[str | Path], flag: str = "--allow-dir") -> tuple[str, ...]:
    """Absolute, resolved folders from ``paths``; a ``ValueError`` naming ``flag`` for one that is not a folder."""
    out = []
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_dir():
            raise ValueError(f"{flag}: expected an existing folder, got {str(path)!r}")
        out.append(str(resolved))
    return tuple(dict.fromkeys(out))


def user_errors(fn: Callable) -> Callable:
    """``fn`` with its ``ValueError`` (bad input: a message naming what came and what was expected) shown to the
    user as a ``gr.Error``; works for plain and generator callbacks."""
    gr = require_gradio()

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except ValueError as err:
                raise gr.Error(str(err)) from None
        return generator

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            raise gr.Error(str(err)) from None
    return plain


def launch(blocks, settings: LaunchSettings, prevent_thread_lock: bool = False, quiet: bool = False):
    """Queue and launch ``blocks`` under ``settings``; prints a warning for ``share`` or a host other than
    localhost. Returns gradio's ``(app, local_url, share_url)``."""
    if settings.share:
        print(SHARE_WARNING, file=sys.stderr)
    if settings.host not in LOCAL_HOSTS:
        print(f"warning: --host {settings.host}: the demo is reachable from other machines on the network",
              file=sys.stderr)
    gr = require_gradio()
    # system fonts: the default theme's Google Fonts would make every page load reach out to the internet
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    blocks.queue(default_concurrency_limit=settings.concurrency, max_size=settings.max_queue)
    return blocks.launch(
        server_name=settings.host, server_port=settings.port, share=settings.share,
        max_file_size=settings.limits.max_upload_bytes, allowed_paths=list(settings.allowed_dirs),
        prevent_thread_lock=prevent_thread_lock, quiet=quiet, show_error=False, ssr_mode=False, theme=theme,
    )
