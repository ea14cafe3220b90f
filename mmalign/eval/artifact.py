"""Training the artifact classifier (``mmalign.rewards.artifact``) from a folder of clean images and a folder
of images with artifacts: embed every image once with the frozen encoder, hold out a seeded, stratified part,
fit the head with AdamW, report the held-out AUROC and save the head folder atomically.

It lives in the eval layer because it reports the AUROC of ``eval.agreement``; the reward it trains is a
rewards-layer module that imports nothing from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmalign.eval.agreement import auroc
from mmalign.media import IMAGE_SUFFIXES, MediaBatch
from mmalign.rewards.artifact import ArtifactHead, check_out_folder, encoder_spec, save_artifact_head
from mmalign.rewards.backbones import load_backbone

__all__ = ["train_artifact_classifier"]

CLASSES = ("clean", "artifact")  # labels 0 and 1


def _count(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def train_artifact_classifier(
    clean: str | Path,
    artifact: str | Path,
    out: str | Path,
    encoder: str | Mapping[str, Any] | None = None,
    steps: int = 300,
    hidden: int = 0,
    lr: float = 1e-2,
    weight_decay: float = 1e-2,
    heldout: float = 0.2,
    seed: int = 0,
    batch_size: int = 32,
    size: int | None = None,
    on_error: str = "stop",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train the artifact head on the images of ``clean`` (label 0) and ``artifact`` (label 1) and save it as
    the folder ``out``; returns the figures, also kept in ``out/config.json`` under ``training``.

    ``encoder`` is an OpenCLIP name or folder or a dict ``{backend, model, pretrained, processor}``
    (``rewards.artifact.encoder_spec``; default OpenCLIP ViT-B-32/openai). Each folder is read whole
    (``MediaBatch.from_folder`` with ``size`` and ``on_error``) and embedded in chunks of ``batch_size`` without
    gradients. A fraction ``heldout`` of each class, drawn with ``seed``, is held out; the head (``hidden=0``:
    logistic regression, else one hidden layer of that width) takes ``steps`` full-batch AdamW steps on the
    class-balanced logistic loss. ``heldout_auroc`` is the probability that a held-out clean image scores above a
    held-out artifact image (``train_auroc`` likewise on the training part); the held-out files are listed under
    ``clean`` and ``artifact``, so the figure can be checked with the saved reward.
    """
    steps, batch_size = _count("steps", steps, 1), _count("batch_size", batch_size, 1)
    if not 0 < heldout < 1:
        raise ValueError(f"heldout: expected a fraction in (0, 1) of each folder to hold out, got {heldout!r}")
    if Path(clean).resolve() == Path(artifact).resolve():
        raise ValueError(f"clean, artifact: expected two different folders (two classes), got {str(clean)!r} twice")
    hidden, spec = _count("hidden", hidden, 0), encoder_spec(encoder)
    check_out_folder(out)  # before the work, not after it
    batches = {name: _read(name, folder, size, on_error) for name, folder in zip(CLASSES, (clean, artifact))}
    generator = torch.Generator().manual_seed(seed)
    splits = {name: _split(name, len(batch), heldout, generator) for name, batch in batches.items()}

    backbone = load_backbone(spec["backend"], spec["model"], spec["pretrained"], spec["processor"], device)
    chunks = sum(-(-len(b) // batch_size) for b in batches.values())
    features = {}
    with torch.no_grad(), tqdm(total=chunks, desc="embedding", unit="batch", disable=not progress) as bar:
        for name, batch in batches.items():
            parts = []
            for start in range(0, len(batch), batch_size):
                parts.append(backbone.encode_image(batch.pixels[start : start + batch_size]).float().cpu())
                bar.update(1)
            features[name] = torch.cat(parts)
    del backbone

    def part(which: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([features[name][splits[name][which]] for name in CLASSES])
        y = torch.cat([torch.full((len(splits[name][which]),), float(label)) for label, name in enumerate(CLASSES)])
        return x, y

    (x_train, y_train), (x_held, y_held) = part(0), part(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ArtifactHead(x_train.shape[1], hidden)
    head.standardize_like(x_train)
    # each class weighs half of the loss, whatever the folders' sizes
    weights = torch.where(y_train > 0, 0.5 / y_train.sum(), 0.5 / (1 - y_train).sum())
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    with tqdm(range(steps), desc="training", unit="step", disable=not progress) as bar:
        for _ in bar:
            loss = (F.binary_cross_entropy_with_logits(head(x_train), y_train, reduction="none") * weights).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)

    head.eval()
    with torch.no_grad():
        def separation(x: torch.Tensor, y: torch.Tensor) -> float:
            clean_score = -head(x)  # the reward orders images as −logit: σ(−logit) = 1 − P(artifact)
            return auroc(clean_score[y == 0], clean_score[y == 1])

        figures = {
            "heldout_auroc": separation(x_held, y_held),
            "train_auroc": separation(x_train, y_train),
            "final_loss": float(loss),
            **{name: {"folder": str(Path(folder).resolve()), "train": len(splits[name][0]),
                      "heldout": len(splits[name][1]),
                      "heldout_files": sorted(batches[name].metadata[int(i)]["file"] for i in splits[name][1])}
               for name, folder in zip(CLASSES, (clean, artifact))},
            "steps": steps, "lr": lr, "weight_decay": weight_decay, "heldout": heldout, "seed": seed,
        }
    save_artifact_head(out, head, spec, figures)
    return figures


def _read(name: str, folder: str | Path, size: int | None, on_error: str) -> MediaBatch:
    """The images of ``folder``, an error naming the argument (``clean`` or ``artifact``) when it has none."""
    folder = Path(folder)
    images = sum(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()) if folder.is_dir() else 0
    try:  # a missing or empty folder is from_folder's error, before it reads the (empty) prompts
        return MediaBatch.from_folder(folder, prompts=[""] * images, size=size, on_error=on_error)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _split(name: str, n: int, heldout: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, heldout)`` indices of ``n`` images, at least one in each part."""
    if n < 2:
        raise ValueError(f"{name}: expected at least 2 images (one to train on, one to hold out), got {n}")
    order = torch.randperm(n, generator=generator)
    k = min(max(1, round(heldout * n)), n - 1)
    return order[k:], order[:k]
