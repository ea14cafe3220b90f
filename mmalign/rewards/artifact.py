"""Artifact classifier: a small head on frozen CLIP image features that scores ``1 − P(artifact)``.

The head is trained from two folders, clean images and images with artifacts
(``mmalign.eval.artifact.train_artifact_classifier``, ``mmalign reward train-artifact``), and saved as a folder:
``head.safetensors`` (the head's weights and its feature standardisation) and ``config.json`` (the encoder it
was trained on, the head's shape and the training figures). A recipe names it with
``{name: artifact_classifier, path: DIR}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmalign.files import write_atomic
from mmalign.media import MediaBatch
from mmalign.rewards.backbones import OPENCLIP_DEFAULT_TAG, load_backbone
from mmalign.rewards.base import RewardOutput
from mmalign.rewards.clip import CLIPFamilyReward

__all__ = ["ArtifactClassifier", "ArtifactHead", "check_out_folder", "encoder_spec", "load_artifact_head", "save_artifact_head"]

CONFIG, WEIGHTS = "config.json", "head.safetensors"
FORMAT = "mmalign-artifact-classifier"
#: the encoder of a head trained without one named: OpenCLIP ViT-B-32 with OpenAI's weights, as ``clip``'s
DEFAULT_ENCODER = {"backend": "open_clip", "model": "ViT-B-32", "pretrained": OPENCLIP_DEFAULT_TAG, "processor": None}


class ArtifactHead(nn.Module):
    """The logit of P(artifact) from unit image features: standardised with the training features' mean and
    standard deviation, then a linear map (``hidden=0``, logistic regression) or one hidden GELU layer."""

    def __init__(self, in_features: int, hidden: int = 0) -> None:
        super().__init__()
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features: expected a positive int, got {in_features!r}")
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 0:
            raise ValueError(f"hidden: expected an int >= 0 (0: logistic regression), got {hidden!r}")
        self.in_features, self.hidden = in_features, hidden
        self.register_buffer("shift", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        if hidden:
            self.layers = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.layers = nn.Sequential(nn.Linear(in_features, 1))

    def standardize_like(self, features: torch.Tensor) -> None:
        """Standardise inputs with the mean and standard deviation of ``features`` ``(N, in_features)``."""
        self.shift.copy_(features.mean(0))
        self.scale.copy_(features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(self.scale))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers((features - self.shift) / self.scale).squeeze(-1)


def encoder_spec(encoder: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """The image encoder as ``{backend, model, pretrained, processor}`` (``load_backbone``'s arguments) from an
    OpenCLIP name (with OpenAI's weights) or folder, a dict of those keys (missing ones as in the default), or
    None for the default; local paths are made absolute, so a saved head finds its encoder from anywhere."""
    if encoder is None:
        return dict(DEFAULT_ENCODER)
    if isinstance(encoder, (str, Path)):
        encoder = {"model": str(encoder)}
    if not isinstance(encoder, Mapping):
        raise ValueError(f"encoder: expected a model name or folder, or a dict with keys {sorted(DEFAULT_ENCODER)}, "
                         f"got {encoder!r}")
    unknown = sorted(set(encoder) - set(DEFAULT_ENCODER))
    if unknown or not isinstance(encoder.get("model"), (str, Path)):
        raise ValueError(f"encoder: expected a dict with a 'model' and at most the keys {sorted(DEFAULT_ENCODER)}, "
                         f"got {dict(encoder)!r}")
    spec = {**DEFAULT_ENCODER, **encoder}
    for key in ("model", "pretrained", "processor"):
        if spec[key] is not None and Path(spec[key]).exists():
            spec[key] = str(Path(spec[key]).resolve())
    if spec["backend"] == "hf" or Path(spec["model"]).is_dir():  # the weights come with the model
        spec["pretrained"] = None
    return spec


def save_artifact_head(path: str | Path, head: ArtifactHead, encoder: Mapping[str, Any], training: Mapping) -> Path:
    """Write ``head`` (safetensors) and its config (encoder, shape, ``training`` figures) as the folder ``path``,
    atomically. An existing ``path`` is replaced only when it is a saved head or an empty folder."""
    from safetensors.torch import save_file

    path = check_out_folder(path)
    config = {"format": FORMAT, "encoder": dict(encoder), "in_features": head.in_features, "hidden": head.hidden,
              "training": dict(training)}
    state = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}

    def write(tmp: Path) -> None:
        tmp.mkdir()
        save_file(state, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    return write_atomic(path, write)


def check_out_folder(path: str | Path) -> Path:
    """``path`` when a head may be saved there: it does not exist, is an empty folder or holds a saved head (so
    training never replaces a folder of other files); else a ``ValueError`` naming it."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or _is_head_folder(path))):
        raise ValueError(f"out: expected a new folder or a saved artifact classifier to replace, got {str(path)!r}, "
                         "which holds other files")
    return path


def _is_head_folder(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_artifact_head(path: str | Path) -> tuple[ArtifactHead, dict[str, Any]]:
    """``(head, config)`` of a folder written by ``save_artifact_head``."""
    from safetensors.torch import load_file

    folder = Path(path)
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if not folder.is_dir() or missing:
        raise ValueError(f"path: expected an artifact classifier folder ({CONFIG} and {WEIGHTS}, written by "
                         f"`mmalign reward train-artifact`), got {str(path)!r}"
                         + (f", which lacks {', '.join(missing)}" if folder.is_dir() else ", which is not a folder"))
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"path: {str(folder / CONFIG)!r} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"path: expected {str(folder / CONFIG)!r} to have format {FORMAT!r}, got "
                         f"{config.get('format') if isinstance(config, dict) else config!r}")
    head = ArtifactHead(config["in_features"], config["hidden"])
    head.load_state_dict(load_file(folder / WEIGHTS))
    return head, config


class ArtifactClassifier(CLIPFamilyReward):
    """1 − P(artifact) from a head trained on frozen CLIP image features (`mmalign reward train-artifact`).

    Args:
        path: the folder the training wrote (``config.json`` names the encoder, ``head.safetensors``).
        device, dtype, gradient_checkpointing: of the encoder, as for the CLIP family.
    Videos are scored per frame and averaged; the prompt is ignored.
    """

    name = "artifact_classifier"

    def __init__(
        self,
        path: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        head, config = load_artifact_head(path)
        encoder = config["encoder"]
        super().__init__(load_backbone(encoder["backend"], encoder["model"], encoder["pretrained"],
                                       encoder["processor"], device, dtype, gradient_checkpointing))
        self.head = head.to(self.backbone.device, self.backbone.work_dtype)
        self.freeze()

    def forward(self, batch: MediaBatch) -> RewardOutput:
        logits = self.head(self.backbone.encode_image(batch.flat_frames())).view(len(batch), batch.frames_per_sample)
        clean = torch.sigmoid(-logits).mean(1)  # 1 − σ(logit), without the cancellation near 1
        return RewardOutput(clean.float(), {"p_artifact": (1 - clean).float()})
