"""The ``rewards`` demo: a prompt generates images at shown seeds (or the user uploads images), every configured
reward scores them with its components and uncertainty, world images carry their gold verdict, and two images
can be compared reward by reward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from mmalign.demos import require_gradio
from mmalign.demos.launch import DEFAULT_LIMITS, Limits, user_errors
from mmalign.demos.scoring import Sampler, Scored, compare_pair, sample, score_images
from mmalign.demos.uploads import image_files, load_uploads
from mmalign.demos.verdict_drawing import display_scale, draw_verdict, to_pil, verdict_rows
from mmalign.media import MediaBatch
from mmalign.rewards import Reward

__all__ = ["DEFAULT_REWARDS", "build_rewards_demo", "gallery", "report", "uploads_as_pixels"]

#: the rewards the demo scores with unless ``--reward`` names others: the truth, the two learned proxies and
#: an ensemble of them, whose members' spread is the uncertainty
DEFAULT_REWARDS: list[Any] = [
    "gold",
    {"name": "proxy", "scale": 1.0},
    {"name": "preference_proxy", "scale": 1.0},
    {"name": "ensemble", "standardize": False,
     "members": [{"name": "proxy", "scale": 1.0}, {"name": "preference_proxy", "scale": 1.0}]},
]


def uploads_as_pixels(images: Sequence, size: int) -> torch.Tensor:
    """``(B, 3, H, W)`` of PIL images: as they are when they share one size, else each fitted (centre crop) to a
    ``size`` square, since a batch holds one size."""
    from PIL import ImageOps

    if not images:
        raise ValueError("images: expected at least one uploaded image, got none")
    if len({im.size for im in images}) > 1:
        images = [ImageOps.fit(im, (size, size)) for im in images]
    return MediaBatch.from_pil(images, [""] * len(images)).pixels


def gallery(scored: Scored) -> list[tuple[Any, str]]:
    """``(image, caption)`` per image: the verdict drawn on world images, the seed and every reward's score."""
    scale = display_scale(*scored.pixels.shape[-2:])
    items = []
    for i, image in enumerate(scored.pixels):
        picture = draw_verdict(image, scored.verdicts[i], scale) if scored.verdicts else to_pil(image, scale)
        parts = [f"#{i}"] + ([f"seed {scored.seeds[i]}"] if scored.seeds[i] is not None else [])
        parts += [f"{name} {float(values[i]):.3f}" for name, values in scored.columns.items() if "/" not in name]
        items.append((picture, " · ".join(parts)))
    return items


def report(scored: Scored) -> dict[str, Any]:
    """The JSON of a scoring: per image its seed, columns and gold verdict (checks, detected objects)."""
    verdicts = None
    if scored.verdicts is not None:
        verdicts = [{"image": i, "seed": scored.seeds[i], "score": v.score, "checks": verdict_rows(v),
                     "objects": [asdict(o) for o in v.objects], "background": v.background,
                     "matches": list(v.matches)} for i, v in enumerate(scored.verdicts)]
    return {"prompt": scored.prompt, "seeds": scored.seeds, "scores": scored.rows(), "verdicts": verdicts,
            "notes": scored.notes}


def build_rewards_demo(sampler: Sampler | None, rewards: Mapping[str, Reward], limits: Limits = DEFAULT_LIMITS,
                       allowed_dirs: Sequence[str] = (), upload_size: int = 256, example: str = "two red circles"):
    """The demo as a ``gr.Blocks``: generation needs ``sampler`` (None: uploads only); ``allowed_dirs`` adds a
    picker of their image files; uploads of mixed sizes are fitted to ``upload_size`` squares."""
    import pandas as pd

    gr = require_gradio()
    offered = image_files(allowed_dirs) if allowed_dirs else []

    def outputs_of(scored: Scored):
        table = pd.DataFrame(scored.rows())
        return gallery(scored), table, report(scored), scored

    @user_errors
    def generate(prompt: str, n: float, seed: float):
        count = int(n)
        if not 1 <= count <= limits.max_images:
            raise ValueError(f"images: expected 1 to {limits.max_images}, got {n!r}")
        pixels, seeds = sample(sampler, prompt, count, int(seed))
        return outputs_of(score_images(rewards, pixels, prompt, seeds))

    @user_errors
    def score_uploads(prompt: str, files: list | None, picked: list | None):
        files = list(files or [])
        chosen = list(picked or [])
        outside = [p for p in chosen if p not in offered]
        if outside:
            raise ValueError(f"files: {outside[0]!r} is not an image of the allowed folders")
        images = load_uploads([getattr(f, "name", f) for f in files] + chosen, limits)
        if not images:
            raise ValueError("images: upload at least one image (or pick one from the allowed folders)")
        return outputs_of(score_images(rewards, uploads_as_pixels(images, upload_size), prompt or ""))

    @user_errors
    def pairwise(scored: Scored | None, a: float, b: float):
        if scored is None:
            raise ValueError("compare: generate or upload images first")
        rows = compare_pair(scored, int(a), int(b))
        pair = [item for k, item in enumerate(gallery(scored)) if k in (int(a), int(b))]
        return pd.DataFrame(rows), pair

    with gr.Blocks(title="mmalign · rewards", analytics_enabled=False) as demo:
        gr.Markdown("## Rewards\nEvery configured reward scores the images: its components and uncertainty in the "
                    "table, the gold verdict (detected objects, passed and failed checks) drawn on world images. "
                    f"Rewards: {', '.join(rewards)}.")
        prompt = gr.Textbox(label="prompt", value=example, max_length=500)
        with gr.Tab("generate", visible=sampler is not None):
            with gr.Row():
                n = gr.Slider(1, limits.max_images, value=min(4, limits.max_images), step=1, label="images")
                seed = gr.Number(0, precision=0, label="first seed")
            go = gr.Button("Generate", variant="primary")
        with gr.Tab("upload"):
            files = gr.File(file_count="multiple", file_types=["image"], label=(
                f"images (at most {limits.max_images}, {limits.max_upload_mb:g} MB and {limits.max_image_side} "
                "pixels a side each)"))
            picked = gr.Dropdown(offered, multiselect=True, label="images from the allowed folders",
                                 visible=bool(offered))
            score = gr.Button("Score uploads", variant="primary")
        images = gr.Gallery(label="images", show_label=False, columns=4, height=380, object_fit="contain", format="png")
        table = gr.Dataframe(label="scores (components, uncertainty)", wrap=True)
        details = gr.JSON(label="verdicts and notes")
        state = gr.State(None)
        with gr.Row():
            a = gr.Number(0, precision=0, label="image a")
            b = gr.Number(1, precision=0, label="image b")
            compare = gr.Button("Compare a and b")
        pair = gr.Gallery(label="a and b", show_label=False, columns=2, height=380, object_fit="contain", format="png")
        comparison = gr.Dataframe(label="a against b", headers=["column", "a", "b", "a_minus_b", "prefers"])
        outputs = [images, table, details, state]
        if sampler is not None:
            go.click(generate, [prompt, n, seed], outputs, api_name="generate")
        score.click(score_uploads, [prompt, files, picked], outputs, api_name="score_uploads")
        compare.click(pairwise, [state, a, b], [comparison, pair], api_name="compare_pair")
    return demo
