"""Does an artifact classifier trained on some corruption kinds catch the others? On the world's renders.

Renders ``--train-images`` scenes of the world's train split (jitter 1) as the clean folder and the same
renders, each corrupted by one of ``--train-kinds`` (in turn, strength drawn from [``--min-strength``, 1]), as
the artifact folder, both as PNG; trains ``artifact_classifier`` on them with the world's shipped OpenCLIP proxy
as the frozen encoder (``train_artifact_classifier``, the function behind ``mmalign reward train-artifact``);
then renders ``--test-images`` held-out-split scenes and prints, for every corruption kind, the AUROC of the
clean test renders against their corrupted versions under the saved reward: the trained kinds, and the kinds
it never saw.

    python benchmarks/world_artifact_classifier.py --train-kinds grid checkerboard overexposure noise_blotches
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def _corrupted(images: torch.Tensor, kinds: list[str], min_strength: float, seed: int) -> torch.Tensor:
    """Image ``i`` with kind ``kinds[i % len(kinds)]`` at a strength drawn from [min_strength, 1] with ``seed``."""
    from mmalign.rewards.corruptions import corrupt

    strengths = torch.empty(len(images)).uniform_(min_strength, 1.0, generator=torch.Generator().manual_seed(seed))
    return torch.stack([corrupt(image, kinds[i % len(kinds)], float(strengths[i]), seed=seed + i)
                        for i, image in enumerate(images)])


def _uint8(images: torch.Tensor) -> torch.Tensor:
    """What a PNG holds: the images rounded to 8 bits, as the training folders are."""
    return (images * 255).round() / 255


def _write(images: torch.Tensor, folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i:04d}.png")


def main(argv: list[str] | None = None) -> dict:
    from mmalign.rewards.corruptions import CORRUPTIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-kinds", nargs="+", choices=CORRUPTIONS,
                        default=["grid", "checkerboard", "overexposure", "noise_blotches"])
    parser.add_argument("--train-images", type=int, default=2048, help="train-split scenes (clean and corrupted)")
    parser.add_argument("--test-images", type=int, default=256, help="held-out-split scenes per kind")
    parser.add_argument("--min-strength", type=float, default=0.3, help="weakest corruption drawn")
    parser.add_argument("--steps", type=int, default=300, help="AdamW steps on the head")
    parser.add_argument("--hidden", type=int, default=64, help="hidden width of the head (0: logistic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the images and the head (default: a temporary one)")
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args(argv)
    if args.train_images < 4 or args.test_images < 1 or not 0 < args.min_strength <= 1:
        parser.error(f"--train-images: expected ≥ 4, --test-images ≥ 1, --min-strength in (0, 1]; got "
                     f"{args.train_images}, {args.test_images}, {args.min_strength}")
    if args.work and Path(args.work).exists() and any(Path(args.work).iterdir()):
        parser.error(f"--work: expected a new or empty folder, got {args.work!r}, which holds files")

    from mmalign.eval.agreement import auroc
    from mmalign.eval.artifact import train_artifact_classifier
    from mmalign.eval.scoring import score_batch
    from mmalign.files import write_text_atomic
    from mmalign.media import MediaBatch
    from mmalign.rewards import build
    from mmalign.world.assets import proxy_path
    from mmalign.world.render import render_batch
    from mmalign.world.scenes import sample_scenes

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        clean = render_batch(sample_scenes(args.train_images, "train", args.seed), jitter=1.0, seed=args.seed)
        _write(clean, work / "clean")
        _write(_corrupted(clean, args.train_kinds, args.min_strength, args.seed), work / "artifact")
        encoder = {"model": proxy_path(), "pretrained": None}
        figures = train_artifact_classifier(work / "clean", work / "artifact", work / "head", encoder,
                                            steps=args.steps, hidden=args.hidden, seed=args.seed)
        reward = build({"name": "artifact_classifier", "path": str(work / "head")})

        test = _uint8(render_batch(sample_scenes(args.test_images, "heldout", args.seed + 1), jitter=1.0,
                                   seed=args.seed + 1))
        batches = {"clean": test, **{kind: _uint8(_corrupted(test, [kind], args.min_strength, args.seed + 1))
                                     for kind in CORRUPTIONS}}
        scores = {name: score_batch({"r": reward}, MediaBatch(images, [""] * len(images)), 64, progress=False)["r"]
                  for name, images in batches.items()}
    rows = {kind: {"trained": kind in args.train_kinds, "auroc": auroc(scores["clean"], scores[kind])}
            for kind in CORRUPTIONS}
    result = {"train_kinds": args.train_kinds, "train_images": args.train_images, "test_images": args.test_images,
              "split_heldout_auroc": figures["heldout_auroc"], "kinds": rows,
              **{f"mean_{group}": float(np.mean([r["auroc"] for r in rows.values() if r["trained"] == trained]))
                 for group, trained in (("trained", True), ("heldout", False)) if any(
                     r["trained"] == trained for r in rows.values())}}

    print(f"trained on {', '.join(args.train_kinds)}: {args.train_images} clean + {args.train_images} corrupted "
          f"train-split renders; AUROC on its own held-out split {figures['heldout_auroc']:.3f}")
    print(f"{args.test_images} held-out-split renders against their corrupted versions:")
    for kind, row in rows.items():
        print(f"  {kind:<16} {'trained' if row['trained'] else 'held out':<9} AUROC {row['auroc']:.3f}")
    for key in ("mean_trained", "mean_heldout"):
        if key in result:
            print(f"  {key.replace('_', ' ')} kinds: {result[key]:.3f}")
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
