"""The gold verdict drawn on a world image: a box per detected object (green when every check of the scene
object it was matched to passed, red otherwise, grey for an object the prompt did not ask for) with its label,
and a band above listing the score and the failed checks. What ``mmalign world sample`` prints, made visible.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont

from mmalign.world.verify import GoldResult

__all__ = ["EXTRA_RGB", "FAILED_RGB", "PASSED_RGB", "display_scale", "draw_verdict", "to_pil", "verdict_rows"]

PASSED_RGB, FAILED_RGB, EXTRA_RGB = (40, 200, 80), (230, 40, 40), (150, 150, 150)
_DISPLAY = 256  # images are enlarged (nearest neighbour) to about this side, so 32-pixel world images read


def display_scale(height: int, width: int) -> int:
    """Integer enlargement of an image for display: about ``_DISPLAY`` pixels a side, never below 1."""
    return max(1, _DISPLAY // max(height, width))


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """``(3, H, W)`` in [0, 1] as an RGB image, enlarged ``scale`` times by nearest neighbour (pixels stay exact)."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0) * 255).round().byte().cpu().numpy()
    pil = Image.fromarray(array, "RGB")
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _failed(result: GoldResult, prefix: str) -> list[str]:
    return [name.removeprefix(prefix) for name, ok in result.checks.items() if name.startswith(prefix) and not ok]


def verdict_rows(result: GoldResult) -> list[dict]:
    """One row per check: ``{"check", "passed"}``, in the verifier's order."""
    return [{"check": name, "passed": bool(ok)} for name, ok in result.checks.items()]


def draw_verdict(image: torch.Tensor, result: GoldResult, scale: int | None = None) -> Image.Image:
    """``image`` ``(3, H, W)`` enlarged, with ``result``'s detected objects boxed and labelled and a band below
    with the gold score and the failed checks."""
    _, height, width = image.shape
    scale = display_scale(height, width) if scale is None else scale
    picture = to_pil(image, scale)
    font = _font(max(10, picture.width // 22))
    failed_objects = {j: _failed(result, f"object{i}.") for i, j in enumerate(result.matches) if j is not None}
    scene_of = {j: i for i, j in enumerate(result.matches) if j is not None}
    draw = ImageDraw.Draw(picture)
    for j, obj in enumerate(result.objects):
        side = obj.scale * picture.width
        cx, cy = obj.x * picture.width, (obj.y - obj.skew * obj.scale) * picture.height
        box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
        if j in scene_of:
            colour = FAILED_RGB if failed_objects[j] else PASSED_RGB
            label = f"{scene_of[j]}: {obj.colour} {obj.shape}" + (
                f" FAIL {','.join(failed_objects[j])}" if failed_objects[j] else " ok")
        else:
            colour, label = EXTRA_RGB, f"extra {obj.colour} {obj.shape}"
        draw.rectangle(box, outline=colour, width=max(1, scale // 3))
        x = min(max(0.0, box[0]), picture.width - draw.textlength(label, font=font) - 2)
        draw.text((max(0.0, x), max(0.0, box[1] - font.size - 2)), label, fill=colour, font=font,
                  stroke_width=1, stroke_fill=(0, 0, 0))
    missing = [f"object{i} missing" for i, j in enumerate(result.matches) if j is None]
    others = [f"FAIL {name}" for name, ok in result.checks.items() if not name.startswith("object") and not ok]
    lines = [f"gold {result.score:.2f}  ({sum(result.checks.values())}/{len(result.checks)} checks)",
             "  ".join(missing + others) or "all checks passed"]
    band = Image.new("RGB", (picture.width, (font.size + 4) * len(lines) + 4), (255, 255, 255))
    ImageDraw.Draw(band).multiline_text((4, 2), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=4)
    out = Image.new("RGB", (picture.width, picture.height + band.height), (255, 255, 255))
    out.paste(band, (0, 0))  # above the image: galleries lay their captions over the bottom
    out.paste(picture, (0, band.height))
    return out
