"""The ``compare`` demo: a training run's aligned model beside its base, the same prompts and seeds, with gold,
the trained reward and the prompt's diversity (Vendi) under each; the run's own curves and report beside them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.demos import require_gradio
from mmalign.demos.launch import allowed_folders, user_errors
from mmalign.demos.scoring import Sampler, Scored, load_sampler, sample, score_images
from mmalign.eval.diversity import diversity_scores, image_encoder
from mmalign.rewards import Reward, build

__all__ = ["RunModels", "compare_run", "build_compare_demo", "load_run", "summary_rows"]


@dataclass
class RunModels:
    """What a run folder gives the demo: base and aligned samplers (one sampler setting), the rewards that
    score both (gold and the trained one), the diversity encoder (None: no Vendi) and the folder."""

    folder: Path
    base: Sampler
    aligned: Sampler
    rewards: dict[str, Reward]
    encoder: Any
    encoder_name: str | None


def _encoder(config: dict, trained: Reward):
    """The run's report encoder, else the trained reward's image encoder, else the world proxy's on the world."""
    spec = (config.get("report") or {}).get("diversity_encoder")
    if spec:
        return image_encoder(build(spec)), json.dumps(spec) if not isinstance(spec, str) else spec
    try:
        return image_encoder(trained), trained.name
    except ValueError:
        pass
    if config.get("pipeline") == "world":
        return image_encoder(build("proxy")), "proxy"
    return None, None


def load_run(folder: str | Path, device: str = "cpu") -> RunModels:
    """Load a diffusion training run folder (``config.json`` and its ``lora/`` or ``pipeline/`` export)."""
    folder = Path(folder).resolve()
    aligned = load_sampler(run=str(folder), device=device)
    config = json.loads((folder / "config.json").read_text())
    if not config.get("reward"):
        raise ValueError(f"run: {str(folder)!r} names no trained 'reward' in config.json; the compare demo shows "
                         "diffusion training runs")
    settings = aligned.settings
    base = load_sampler(pipeline=settings["pipeline"], device=device, num_steps=settings["num_steps"],
                        eta=settings["eta"], guidance_scale=settings["guidance_scale"])
    specs = config["reward"]
    trained = build(specs if len(specs) > 1 else specs[0]).to(device)
    rewards = {"gold": build("gold")}
    rewards.setdefault(trained.name, trained)
    encoder, encoder_name = _encoder(config, trained)
    return RunModels(folder, base, aligned, rewards, encoder, encoder_name)


def compare_run(models: RunModels, prompt: str, n: int, seed: int) -> dict[str, tuple[Scored, float | None]]:
    """``{"base": (scored, vendi), "aligned": (scored, vendi)}``: ``n`` images of ``prompt`` from each, image
    ``i`` from seed ``seed + i`` in both; Vendi over the ``n`` images (None without an encoder or with one image)."""
    out = {}
    for tag, sampler in (("base", models.base), ("aligned", models.aligned)):
        pixels, seeds = sample(sampler, prompt, n, seed)
        scored = score_images(models.rewards, pixels, prompt, seeds)
        vendi = None
        if models.encoder is not None and n > 1:
            with torch.no_grad():
                vendi = float(diversity_scores(pixels, [0] * n, models.encoder)["diversity/vendi"][0])
        out[tag] = (scored, vendi)
    return out


def summary_rows(folder: Path) -> list[dict[str, Any]]:
    """The run's own report (``summary.json``): before, after and the paired change of each reward's mean."""
    path = folder / "summary.json"
    if not path.is_file():
        return []
    summary = json.loads(path.read_text())
    paired = summary.get("paired_change", {})
    return [{"column": name, "before": round(b["mean"], 4), "after": round(summary["after"][name]["mean"], 4),
             "paired_change": round(paired[name]["mean"], 4) if name in paired else None}
            for name, b in summary.get("before", {}).items() if name in summary.get("after", {})]


def build_compare_demo(runs: Sequence[str | Path], device: str = "cpu", max_images: int = 8,
                       example: str = "a green box to the right of a purple triangle"):
    """The demo as a ``gr.Blocks`` over the run folders ``runs`` (the only folders it reads), each loaded on
    first use."""
    import pandas as pd
    from PIL import Image

    from mmalign.demos.rewards_demo import gallery

    gr = require_gradio()
    resolved = [Path(p) for p in allowed_folders(runs, "--run")]
    names = [p.name for p in resolved]
    folders = dict(zip(names if len(set(names)) == len(names) else map(str, resolved), resolved))
    if not folders:
        raise ValueError("runs: expected at least one training run folder (--run), got none")
    loaded: dict[str, RunModels] = {}
    lock = threading.Lock()

    def models_of(name: str) -> RunModels:
        if name not in folders:
            raise ValueError(f"run: expected one of {', '.join(folders)}, got {name!r}")
        with lock:
            if name not in loaded:
                loaded[name] = load_run(folders[name], device)
        return loaded[name]

    def run_files(name: str):
        folder = folders[name]
        curves = folder / "curves.png"
        image = Image.open(curves).convert("RGB") if curves.is_file() else None
        return image, pd.DataFrame(summary_rows(folder))

    @user_errors
    def compare(name: str, prompt: str, n: float, seed: float):
        count = int(n)
        if not 1 <= count <= max_images:
            raise ValueError(f"images: expected 1 to {max_images}, got {n!r}")
        models = models_of(name)
        result = compare_run(models, prompt, count, int(seed))
        details = {"run": str(models.folder), "settings": models.aligned.settings, "prompt": prompt,
                   "diversity_encoder": models.encoder_name}
        labels = []
        for tag, (scored, vendi) in result.items():
            details[tag] = {"seeds": scored.seeds, "vendi": vendi, "notes": scored.notes,
                            **{name: [float(v) for v in scored.columns[name]] for name in models.rewards
                               if name in scored.columns}}
            means = "  ".join(f"{r} {float(scored.columns[r].mean()):.3f}" for r in models.rewards
                              if r in scored.columns)
            labels.append(f"**{tag}**: mean {means}  ·  Vendi {'–' if vendi is None else f'{vendi:.2f}'} "
                          f"over {count} images")
        curves, table = run_files(name)
        return (gallery(result["base"][0]), gallery(result["aligned"][0]), labels[0], labels[1], details,
                curves, table)

    with gr.Blocks(title="mmalign · compare", analytics_enabled=False) as demo:
        gr.Markdown("## Base against aligned\nThe run's aligned model beside its base: the same prompt, seeds and "
                    "sampler; gold and the trained reward under each image, Vendi diversity under each side.")
        with gr.Row():
            run = gr.Dropdown(list(folders), value=next(iter(folders)), label="run")
            prompt = gr.Textbox(label="prompt", value=example, max_length=500)
        with gr.Row():
            n = gr.Slider(1, max_images, value=min(4, max_images), step=1, label="images")
            seed = gr.Number(0, precision=0, label="first seed")
        go = gr.Button("Compare", variant="primary")
        with gr.Row():
            with gr.Column():
                base_label = gr.Markdown("**base**")
                base = gr.Gallery(label="base", show_label=False, columns=2, height=700, object_fit="contain", format="png")
            with gr.Column():
                aligned_label = gr.Markdown("**aligned**")
                aligned = gr.Gallery(label="aligned", show_label=False, columns=2, height=700, object_fit="contain", format="png")
        curves = gr.Image(label="the run's curves.png", type="pil", format="png")
        with gr.Row():
            table = gr.Dataframe(label="the run's report (summary.json)")
            details = gr.JSON(label="scores")
        go.click(compare, [run, prompt, n, seed], [base, aligned, base_label, aligned_label, details, curves, table],
                 api_name="compare")
    return demo
