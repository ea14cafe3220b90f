"""The world's learned motion reward: a tiny 3-D convolutional classifier of a clip's direction of motion.

Frame rewards (``frame_aggregate`` of the proxy) judge every frame alone and cannot see where a clip moves. This
model can: it is trained on jittered renders of train-split clips to tell ``still`` from the four directions,
and ``motion_proxy`` (``mmalign.world.motion_reward``) scores a clip by the probability of the direction its
caption states. Like the other proxies it is meant to be imperfect: it sees only renders (with pixel noise),
never the generator's clips, and its agreement with the gold verifier's motion check on them is measured when
it is built (``build_report.json``). Its folder is ``PyTorchModelHubMixin``'s layout (``config.json``,
``model.safetensors``), so ``MotionClassifier.from_pretrained(folder)`` loads it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from tqdm.auto import tqdm

from mmalign.files import write_text_atomic
from mmalign.world.generator import IMAGE_SIZE
from mmalign.world.video import DIRECTIONS, render_videos, video_prompt_set

__all__ = ["CLASSES", "MotionClassifier", "MotionProxyRecipe", "build_motion_proxy", "motion_batch", "render_accuracy",
           "train_motion_proxy"]

#: what the classifier tells apart: a still clip, or motion in one of the world's directions
CLASSES: tuple[str, ...] = ("still", *DIRECTIONS)


class MotionClassifier(nn.Module, PyTorchModelHubMixin):
    """Logits over ``CLASSES`` of ``(B, T, 3, H, W)`` clips in [0, 1]: 3-D convolutions (3×3×3, each stage
    halving the space but not time), global average pooling, a linear head. Any T ≥ 2 and H, W work."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), classes: int = len(CLASSES)) -> None:
        super().__init__()
        layers, width = [], 3
        for out in channels:
            layers += [nn.Conv3d(width, out, 3, stride=(1, 2, 2), padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            width = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.ndim != 5 or clips.shape[2] != 3 or clips.shape[1] < 2:
            raise ValueError(f"clips: expected (B, T >= 2, 3, H, W) in [0, 1], got {tuple(clips.shape)}")
        x = clips.transpose(1, 2) * 2 - 1  # (B, 3, T, H, W) in [-1, 1]
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


@dataclass
class MotionProxyRecipe:
    """Training settings of the motion proxy; the defaults build the shipped one."""

    seed: int = 5
    clips: int = 8192  # train-split clips, rendered afresh with jitter in every step
    frames: int = 8
    steps: int = 1500
    batch: int = 32
    lr: float = 2e-3
    still_fraction: float = 0.2  # clips rendered without motion, labelled ``still``
    max_noise: float = 0.1  # std of the Gaussian pixel noise, drawn per clip in [0, max_noise]

    def __post_init__(self) -> None:
        for name in ("clips", "steps", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(self.frames, int) or self.frames < 2:
            raise ValueError(f"frames: expected an int of at least 2, got {self.frames!r}")
        if not 0 <= self.still_fraction < 1:
            raise ValueError(f"still_fraction: expected a fraction in [0, 1), got {self.still_fraction!r}")
        if not 0 <= self.max_noise <= 1:
            raise ValueError(f"max_noise: expected a pixel std in [0, 1], got {self.max_noise!r}")


def motion_batch(clips, frames: int, still: torch.Tensor, noise: torch.Tensor, seed: int):
    """``(videos, labels)`` for ``VideoPrompt``s: jittered renders, ``still[i]`` ones without motion, each with
    Gaussian pixel noise of std ``noise[i]``; labels index ``CLASSES``."""
    pairs = [(c.scene, replace(c.motion, travel=0.0) if s else c.motion) for c, s in zip(clips, still.tolist())]
    videos = render_videos(pairs, frames, IMAGE_SIZE, 1.0, seed)
    gen = torch.Generator().manual_seed(seed)
    videos = (videos + noise.view(-1, 1, 1, 1, 1) * torch.randn(videos.shape, generator=gen)).clamp(0, 1)
    labels = torch.tensor([0 if s else CLASSES.index(c.motion.direction) for c, s in zip(clips, still.tolist())])
    return videos, labels


def train_motion_proxy(recipe: MotionProxyRecipe, progress: bool = True) -> MotionClassifier:
    """A ``MotionClassifier`` trained by cross-entropy on fresh renders of ``recipe.clips`` train clips."""
    torch.manual_seed(recipe.seed)
    model = MotionClassifier()
    clips = video_prompt_set("train", recipe.clips, recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    bar = tqdm(range(recipe.steps), desc="motion proxy", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(clips), (recipe.batch,), generator=gen).tolist()
        still = torch.rand(recipe.batch, generator=gen) < recipe.still_fraction
        noise = torch.rand(recipe.batch, generator=gen) * recipe.max_noise
        seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        videos, labels = motion_batch([clips[i] for i in idx], recipe.frames, still, noise, seed)
        loss = F.cross_entropy(model(videos), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def render_accuracy(model: MotionClassifier, split: str, n: int = 256, frames: int = 8, seed: int = 100) -> float:
    """Accuracy on ``n`` fresh jittered, noiseless renders of ``split`` clips (a fifth of them still)."""
    clips = video_prompt_set(split, n, seed)
    still = torch.arange(n) % 5 == 0
    videos, labels = motion_batch(clips, frames, still, torch.zeros(n), seed)
    return round((model(videos).argmax(-1) == labels).float().mean().item(), 4)


def build_motion_proxy(folder: str | Path, recipe: MotionProxyRecipe | None = None, progress: bool = True,
                       video_pipeline: str | Path | None = None, evaluate_prompts: int = 48) -> dict:
    """Train the motion proxy, save it in ``folder`` with ``build_report.json`` and return the report: render
    accuracy per split, and on ``evaluate_prompts`` clips per split of the video generator in ``video_pipeline``
    (None: the shipped one) the AUROC of its score of the stated direction against the gold motion check."""
    from mmalign.eval.agreement import auroc
    from mmalign.world.assets import load_video_pipeline
    from mmalign.world.video import verify_videos
    from mmalign.world.video_build import sample_videos

    recipe = recipe or MotionProxyRecipe()
    start = time.perf_counter()
    model = train_motion_proxy(recipe, progress)
    report: dict = {"recipe": asdict(recipe), "train_seconds": round(time.perf_counter() - start, 1)}
    report["render_accuracy"] = {split: render_accuracy(model, split) for split in ("train", "heldout")}
    if evaluate_prompts:
        pipe = load_video_pipeline(path=None if video_pipeline is None else str(video_pipeline))
        for split in ("train", "heldout"):
            clips = video_prompt_set(split, evaluate_prompts, 2000)
            videos = sample_videos(pipe, [c.text for c in clips], 2000, recipe.frames, 10)
            gold = verify_videos(videos, [c.scene for c in clips], [c.motion for c in clips])
            moved = torch.tensor([min(v for k, v in r.checks.items() if k.endswith(".motion")) for r in gold]) > 0.5
            probs = model(videos).softmax(-1)
            stated = probs[torch.arange(len(clips)), [CLASSES.index(c.motion.direction) for c in clips]]
            report[f"generator_{split}"] = {
                "gold_motion": round(moved.float().mean().item(), 4), "proxy_mean": round(stated.mean().item(), 4),
                "auroc": round(auroc(stated[moved], stated[~moved]), 4) if 0 < moved.sum() < len(clips) else None}
    folder = Path(folder)
    model.save_pretrained(str(folder))
    (folder / "README.md").unlink(missing_ok=True)  # the mixin's blank Hub model card; docs/world.md describes it
    write_text_atomic(folder / "build_report.json", json.dumps(report, indent=2) + "\n")
    return report
