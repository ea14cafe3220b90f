"""The world's proxy reward: a tiny OpenCLIP model trained contrastively on (render, caption) pairs.

It is the learned reward that trainers optimise, so it is meant to be imperfect: it sees only clean renders
of train-split scenes, for a short budget, and learns attributes only as far as the contrastive loss (plus
one hard negative caption per image, with one attribute changed) pushes it. Its agreement with the gold
verifier on generated images is measured by ``agreement``. The folder it is saved to is OpenCLIP's
``local-dir:`` layout, with the grammar's small CLIP tokenizer beside the weights, so
``open_clip.create_model_and_transforms("local-dir:" + folder)`` and ``open_clip.get_tokenizer`` load it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmalign.world.captions import caption, vocabulary
from mmalign.world.generator import IMAGE_SIZE, MAX_TOKENS, world_pairs
from mmalign.world.scenes import COLOURS, SHAPES, Scene
from mmalign.world.tokenizer import load_tokenizer, save_tokenizer

__all__ = ["ProxyRecipe", "proxy_config", "train_proxy", "clip_step", "save_proxy", "build_proxy", "paired_cosines",
           "proxy_scores"]

MEAN = STD = (0.5, 0.5, 0.5)


@dataclass
class ProxyRecipe:
    """Training settings of the proxy; the defaults build the shipped model."""

    seed: int = 1
    scenes: int = 16384
    steps: int = 600
    batch: int = 128
    lr: float = 2e-3
    hard_negatives: bool = True

    def __post_init__(self) -> None:
        for name in ("scenes", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")


def proxy_config(tokenizer) -> dict:
    """``open_clip_config.json`` content: a 3-layer ViT on 4 px patches and a 2-layer text transformer."""
    model_cfg = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 4, "width": 64, "layers": 3, "head_width": 32,
                       "mlp_ratio": 2.0},
        "text_cfg": {
            "context_length": MAX_TOKENS,
            "vocab_size": len(tokenizer),
            "width": 64,
            "heads": 2,
            "layers": 2,
            "mlp_ratio": 2.0,
            # any non-empty name selects HFTokenizer; under local-dir: it reads this very folder
            "hf_tokenizer_name": ".",
            "pool_type": "eos",
            "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id,
        },
    }
    preprocess_cfg = {"size": IMAGE_SIZE, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                      "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def _normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def _hard_negative(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of ``scene`` with one object's colour or shape changed (the attributes CLIP binds worst)."""
    changes = [(i, "colour", c) for i, o in enumerate(scene.objects) for c in COLOURS if c != o.colour]
    changes += [(i, "shape", s) for i, o in enumerate(scene.objects) for s in SHAPES if s != o.shape]
    for k in rng.permutation(len(changes)):
        i, attribute, value = changes[k]
        objects = list(scene.objects)
        objects[i] = replace(objects[i], **{attribute: value})
        try:
            return caption(replace(scene, objects=tuple(objects)), rng)
        except ValueError:  # the change made two stated objects identical; try another
            continue
    raise ValueError(f"scene: no single colour or shape change gives a valid scene: {scene.to_dict()}")


def train_proxy(tokenizer, images: torch.Tensor, captions: list[str], scenes: Sequence[Scene],
                recipe: ProxyRecipe, progress: bool = True):
    """An OpenCLIP ``CLIP`` trained with the symmetric InfoNCE loss (plus hard negatives on the image side)."""
    from open_clip.model import CLIP

    torch.manual_seed(recipe.seed)
    model = CLIP(**proxy_config(tokenizer)["model_cfg"]).train()
    rng = np.random.default_rng(recipe.seed)
    negatives = [_hard_negative(s, rng) for s in scenes] if recipe.hard_negatives else []

    def tokens(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                         return_tensors="pt").input_ids

    ids = tokens(list(captions))
    neg_ids = tokens(negatives) if negatives else None
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(recipe.seed)
    bar = tqdm(range(recipe.steps), desc="proxy", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(images), (recipe.batch,), generator=gen)
        image = F.normalize(model.encode_image(_normalize(images[idx])), dim=-1)
        text_ids = ids[idx] if neg_ids is None else torch.cat([ids[idx], neg_ids[idx]])
        text = F.normalize(model.encode_text(text_ids), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T  # (B, B) or (B, 2B): negatives only as texts
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : len(idx)].T, target)) / 2
        clip_step(model, opt, sched, loss)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)


def clip_step(model, opt, sched, loss: torch.Tensor) -> None:
    """One optimiser and schedule step on ``loss``, the logit scale kept at most 100 as OpenCLIP keeps it."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, np.log(100))


def save_proxy(folder: str | Path, model, tokenizer) -> Path:
    """Write OpenCLIP's ``local-dir:`` layout: config, ``open_clip_model.safetensors`` and tokenizer files."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(proxy_config(tokenizer), indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def build_proxy(folder: str | Path, recipe: ProxyRecipe | None = None, progress: bool = True) -> Path:
    """Train the proxy from its fixed seed and save it into ``folder``."""
    recipe = recipe or ProxyRecipe()
    folder = Path(folder)
    save_tokenizer(folder, vocabulary(), MAX_TOKENS)
    tokenizer = load_tokenizer(folder)
    images, captions, scenes = world_pairs(recipe.scenes, "train", recipe.seed, jitter=1.0)
    model = train_proxy(tokenizer, images, captions, scenes, recipe, progress)
    return save_proxy(folder, model, tokenizer)


def paired_cosines(model, images: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``(B,)`` cosine of each image ``(B, 3, 32, 32)`` in [0, 1] with its own tokenized text (with autograd)."""
    image = F.normalize(model.encode_image(_normalize(images)), dim=-1)
    text = F.normalize(model.encode_text(token_ids), dim=-1)
    return (image * text).sum(-1)


@torch.no_grad()
def proxy_scores(model, tokenizer, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """``(B,)`` cosine of each image ``(B, 3, 32, 32)`` in [0, 1] with its prompt."""
    return paired_cosines(model, images, tokenizer(list(prompts)))
