"""Report pieces: the smoothed curve, the x-axis named by what it counts, labels without missing glyphs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from mmalign.eval.grid import image_grid, label_font
from mmalign.eval.report import X_LABELS, curves_figure, plot_curves, read_metrics, save_grids, smooth


def test_smooth_is_the_debiased_moving_average():
    values = [1.0, 3.0, float("nan"), 2.0]
    w = 0.6
    first = 1.0
    second = (w * (1 - w) * 1 + (1 - w) * 3) / (w * (1 - w) + (1 - w))
    fourth = (w * w * (1 - w) * 1 + w * (1 - w) * 3 + (1 - w) * 2) / (w * w * (1 - w) + w * (1 - w) + (1 - w))
    assert smooth(values, w) == pytest.approx([first, second, second, fourth])


def test_curves_count_what_their_rows_count(tmp_path, monkeypatch):
    rows = [{"step": s, "epoch": 0.1 * s, "reward": float(s)} for s in range(1, 6)]
    labels = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.set_xlabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda ax, text, *a, **k: (labels.append(text), original(ax, text))[1])
    assert plot_curves(rows, ["reward"], tmp_path / "c.png", x="step").is_file()
    assert labels == [X_LABELS["step"]]


def test_curves_skip_null_values(tmp_path):
    rows = [{"step": 1, "r/mean": None, "r/std": None}, {"step": 2, "r/mean": 0.5, "r/std": 0.1}]
    figure = curves_figure(rows, ["r"], x="step")
    assert [list(line.get_ydata()) for line in figure.axes[0].lines][0][1] == 0.5  # the null is a gap, not an error


def test_read_metrics_keeps_the_last_row_of_a_repeated_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "v": 1}, {"step": 2, "v": 2}, {"step": 2, "v": 3}]))
    assert [r["v"] for r in read_metrics(path, "step")] == [1, 3]


def _missing_glyphs(text: str, font) -> list[str]:
    """Characters ``font`` draws as its missing-glyph box."""
    box = np.asarray(font.getmask("\U0010fffd"))
    return sorted(c for c in set(text) if np.array_equal(np.asarray(font.getmask(c)), box))


def test_labels_render_without_missing_glyph_boxes():
    from mmalign.eval.grid import _wrap

    question = "What colour is the shape?\r\nAnswer with one word.\t(→ ×2, é ≥ 1)"
    assert "→" in _missing_glyphs(question, ImageFont.load_default())  # Pillow's default font: boxes
    font = label_font()
    lines = _wrap(question, font, 1000, ImageDraw.Draw(Image.new("RGB", (1, 1))))
    assert lines == ["What colour is the shape?", "Answer with one word. (→ ×2, é ≥ 1)"]
    assert all(_missing_glyphs(line, font) == [] for line in lines)
    assert image_grid(torch.rand(1, 3, 8, 8), [question], columns=1).size[1] > 8 * 4


def test_the_grid_shows_one_sample_of_each_prompt(tmp_path, monkeypatch):
    """Three prompts × two samples, limit 2: the first sample of prompts 0 and 1, before above after."""
    import mmalign.eval.grid
    from mmalign.eval.generator import GeneratorEval
    from mmalign.media import MediaBatch

    shown = {}

    def capture(images, labels, columns):
        shown.update(images=images, labels=labels, columns=columns)
        return image_grid(images, labels, columns)

    monkeypatch.setattr(mmalign.eval.grid, "image_grid", capture)
    pixels = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 8, 8) / 10
    meta = [{"group": g} for g in (0, 0, 1, 1, 2, 2)]
    prompts = [f"prompt {g}" for g in (0, 0, 1, 1, 2, 2)]
    before = GeneratorEval(MediaBatch(pixels, prompts, meta), {})
    after = GeneratorEval(MediaBatch(1 - pixels, prompts, meta), {})
    assert save_grids(before, after, tmp_path / "grid.png", limit=2).is_file()
    assert shown["columns"] == 2
    torch.testing.assert_close(shown["images"][:, 0, 0, 0], torch.tensor([0.0, 0.2, 1.0, 0.8]))
    assert shown["labels"] == ["before: prompt 0", "before: prompt 1", "after: prompt 0", "after: prompt 1"]
