"""Atomic writes: a file or a folder is written under a temporary name beside its target and moved into place
with ``os.replace``, so a process killed at any instant leaves the old version or none, never half of the new
one under the final name. Run folders rely on it: a ``summary.json`` or an export that exists is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["folder_size", "write_atomic", "write_text_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` creates a file or a folder at ``tmp`` (``.tmp-<name>`` in the same folder, so the suffix is
    kept), whose contents are then synced to disk and moved onto ``path``, replacing what was there. A failed
    ``write`` leaves ``path`` as it was and removes the temporary; a killed one leaves a temporary that the next
    write of ``path`` removes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    _remove(tmp)
    try:
        write(tmp)
        for file in tmp.rglob("*") if tmp.is_dir() else [tmp]:
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if path.is_dir() and not path.is_symlink():  # rename(2) replaces only an empty folder
            old = path.with_name(f".old-{path.name}")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``path`` holds ``text`` (UTF-8), written atomically (``write_atomic``)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def folder_size(folder: str | os.PathLike) -> int:
    """Bytes of all files under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
