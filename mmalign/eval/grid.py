"""A contact sheet of small images with a few lines of text under each (prompt, gold verdict).

32 px images are unreadable at their own size, so each is enlarged with nearest-neighbour sampling (which
keeps the pixels the verifier saw) before the text is written beneath it. Text is set in DejaVu Sans (shipped
with matplotlib, which the reports already need) rather than Pillow's default font, whose few glyphs draw
arrows, ×, accents and stray control characters as boxes; tabs and carriage returns become spaces and lines.
"""

from __future__ import annotations

import functools
import textwrap
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["VIDEO_SUFFIXES", "filmstrips", "image_grid", "label_font", "mp4_available", "save_video_grid"]

#: the file types ``save_video_grid`` writes
VIDEO_SUFFIXES = (".gif", ".mp4")

_PAD = 4
#: the height up to which small images are enlarged (nearest neighbour)
MAX_ENLARGED = 256


@functools.lru_cache(maxsize=1)
def label_font(size: int = 10):
    """DejaVu Sans at ``size`` px (through matplotlib's font manager), else Pillow's default font."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), size)
    except (ImportError, ValueError, OSError):
        return ImageFont.load_default()


def _clean(text: str) -> str:
    """Line breaks as ``\n``, tabs as spaces, other control characters dropped: none of them has a glyph."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return "".join(c for c in text if c == "\n" or unicodedata.category(c)[0] != "C")


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Lines of ``text`` that fit ``width`` pixels (at least one word per line)."""
    lines: list[str] = []
    for paragraph in _clean(text).split("\n"):
        chars = max(1, len(paragraph))
        while chars > 1 and any(draw.textlength(line, font=font) > width
                                for line in textwrap.wrap(paragraph, chars) or [""]):
            chars -= 1
        lines.extend(textwrap.wrap(paragraph, chars) or [""])
    return lines


def filmstrips(videos: torch.Tensor, frames: int = 4) -> torch.Tensor:
    """``(B, 3, H, n·W)``: ``n = min(frames, T)`` frames of each video ``(B, T, 3, H, W)``, evenly spaced from the
    first to the last, side by side (how a grid shows videos)."""
    picked = torch.linspace(0, videos.shape[1] - 1, min(frames, videos.shape[1])).round().long()
    return videos[:, picked.to(videos.device)].permute(0, 2, 3, 1, 4).flatten(3)


def image_grid(
    images: torch.Tensor, labels: Sequence[str] | None = None, columns: int = 4, scale: int = 4
) -> Image.Image:
    """One RGB image holding ``images`` ``(B, 3, H, W)`` in [0, 1] in rows of ``columns``, each enlarged
    ``scale`` times but to no more than ``MAX_ENLARGED`` px high (a 512 px image stays at its own size, so a sheet
    of large samples stays within what Pillow opens), with ``labels[i]`` (newlines allowed) written under image
    ``i``. Videos ``(B, T, 3, H, W)`` are shown as ``filmstrips``."""
    if isinstance(images, torch.Tensor) and images.ndim == 5 and images.shape[2] == 3:
        images = filmstrips(images)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a (B, 3, H, W) tensor or (B, T, 3, H, W) videos, got {got}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"labels: expected one label per image ({len(images)}), got {len(labels)}")
    if columns < 1 or scale < 1:
        raise ValueError(f"columns, scale: expected positive ints, got {columns}, {scale}")
    scale = max(1, min(scale, MAX_ENLARGED // images.shape[-2]))
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    cell = images.shape[-1] * scale
    font = label_font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(text, font, cell, probe) for text in labels] if labels else [[] for _ in images]
    line_height = probe.textbbox((0, 0), "Ag", font=font)[3] + 2
    text_height = max(len(lines) for lines in wrapped) * line_height
    cell_h = images.shape[-2] * scale + text_height + _PAD
    sheet = Image.new("RGB", (columns * (cell + _PAD) + _PAD, rows * (cell_h + _PAD) + _PAD), "white")
    draw = ImageDraw.Draw(sheet)
    pixels = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round()
    for i, (array, lines) in enumerate(zip(pixels.astype(np.uint8), wrapped)):
        x = _PAD + (i % columns) * (cell + _PAD)
        y = _PAD + (i // columns) * (cell_h + _PAD)
        tile = Image.fromarray(array).resize((cell, images.shape[-2] * scale), Image.NEAREST)
        sheet.paste(tile, (x, y))
        for k, line in enumerate(lines):
            draw.text((x, y + tile.height + 2 + k * line_height), line, fill="black", font=font)
    return sheet


def save_video_grid(videos: torch.Tensor, path, labels: Sequence[str] | None = None, columns: int = 4,
                    scale: int = 4, ms: int = 200):
    """``videos`` ``(B, T, 3, H, W)`` in [0, 1] played as one sheet: frame ``t`` is the ``image_grid`` of every
    video's frame ``t``, labels under each. ``path`` ending ``.gif``: a looping GIF (Pillow); ``.mp4``: H.264 at
    ``1000 / ms`` frames a second (diffusers' ``export_to_video``, which needs ``mmalign[video]``), the sheet padded
    white to a multiple of 16 pixels so that the encoder does not rescale it. Returns the path."""
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[2] != 3:
        got = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"videos: expected a (B, T, 3, H, W) tensor, got {got}")
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"path: expected a .gif or .mp4 file name, got {str(path)!r}")
    sheets = [image_grid(videos[:, t], labels, columns, scale) for t in range(videos.shape[1])]
    if suffix == ".gif":
        sheets[0].save(path, save_all=True, append_images=sheets[1:], duration=ms, loop=0)
        return path
    if not mp4_available():
        raise ImportError('writing MP4 needs imageio and imageio-ffmpeg: pip install "mmalign[video]"')
    from diffusers.utils import export_to_video

    width, height = (-(-side // 16) * 16 for side in sheets[0].size)
    padded = []
    for sheet in sheets:
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(sheet, (0, 0))
        padded.append(canvas)
    export_to_video(padded, str(path), fps=1000 / ms)
    return path


def mp4_available() -> bool:
    """Whether ``save_video_grid`` can write MP4 here (imageio and its ffmpeg binary are installed)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("imageio", "imageio_ffmpeg"))
