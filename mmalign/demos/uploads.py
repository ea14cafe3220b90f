"""Checking what users upload before any model sees it: a file that is not an image, one too large (bytes or
pixels), or in a mode the rewards cannot read ends with a message naming the file and the limit, not a traceback.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

from mmalign.demos.launch import Limits

__all__ = ["READABLE_MODES", "image_files", "load_upload", "load_uploads"]

#: PIL modes with a faithful 8-bit RGB reading (alpha is dropped); 16-bit, float and CMYK images are refused
#: rather than silently rescaled.
READABLE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _name(path) -> str:
    return Path(getattr(path, "name", path)).name


def load_upload(path: str | Path, limits: Limits) -> Image.Image:
    """The RGB image in the uploaded file ``path``, checked against ``limits``; ``ValueError`` otherwise."""
    name = _name(path)
    size = Path(path).stat().st_size
    if size > limits.max_upload_bytes:
        raise ValueError(f"upload {name!r}: {size / 2**20:.2f} MB is too large, expected at most "
                         f"{limits.max_upload_mb:g} MB (--max-upload-mb)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if max(width, height) > limits.max_image_side:
                    raise ValueError(f"upload {name!r}: {width}×{height} pixels is too large, expected at most "
                                     f"{limits.max_image_side} pixels a side (--max-image-side)")
                if image.mode not in READABLE_MODES:
                    raise ValueError(f"upload {name!r}: image mode {image.mode!r} is not supported, expected one "
                                     f"of {', '.join(READABLE_MODES)} (8-bit RGB, grey or palette)")
                image = ImageOps.exif_transpose(image)
                return image.convert("RGB")
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"upload {name!r}: not a readable image ({type(err).__name__}: {err}); expected a PNG, "
                         "JPEG, WebP or BMP file") from None


def load_uploads(paths: Sequence[str | Path] | None, limits: Limits) -> list[Image.Image]:
    """Every uploaded file as an RGB image (at most ``limits.max_images``); ``ValueError`` for the first bad one."""
    paths = list(paths or [])
    if len(paths) > limits.max_images:
        raise ValueError(f"uploads: {len(paths)} files, expected at most {limits.max_images} per request")
    return [load_upload(p, limits) for p in paths]


def image_files(folders: Sequence[str | Path], limit: int = 500) -> list[str]:
    """Image files under ``folders`` (recursively, sorted, at most ``limit``): what a demo may offer from disk."""
    found = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                found.append(str(path))
                if len(found) >= limit:
                    return found
    return found
