"""D²-Align's direction-corrected CLIP reward (Chen et al., CVPR 2026) and its stage 1, learning the correction.

A CLIP-type reward scores ``f(cos(Φ_img(x), e))`` with ``e`` the prompt's unit text embedding and ``f`` the
reward's own map from the cosine to its score (``scale·cos`` for CLIPScore and the world proxies, ``cos`` for
HPSv2, ``logit_scale·cos`` for PickScore). D²-Align learns one vector ``b`` in that text space and scores against
a guided embedding instead:

    e₊ = normalize(e + b),   e₋ = normalize(e − b),   ẽ = normalize(e₋ + ω·(e₊ − e₋)),
    R(x, c) = f(cos(Φ_img(x), ẽ)).

A reward says what ``f`` is with a method ``score_from_cosine(cosine, batch)`` (HPSv2, PickScore; its own
``forward`` goes through the same method, so ``b = 0`` reproduces its score bit for bit) or, failing that, a
numeric ``scale`` (``f = scale·cos``, unclamped: CLIPScore, ``proxy``, ``preference_proxy``).

With ω > 1 ``ẽ`` extrapolates from ``e₋`` past ``e₊`` (as classifier-free guidance does from the unconditional
prediction): for a small ``b``, ``ẽ ≈ normalize(e + (2ω − 1)·b⊥)``, ``b⊥`` the part of ``b`` orthogonal to
``e``. So the reward moves towards ``b``; for it to move *away* from the reward model's prompt-independent bias,
``b`` must point away from that bias. Stage 1 (``learn_correction``) finds such a ``b`` with the generator
frozen: it minimises the frozen generator's samples' score against the shifted embedding ``normalize(e_c + b)``
over ``b`` on the sphere ``‖b‖ = radius``, so ``−b`` is the direction along which the current samples score
high whatever the prompt (docs/trainers/d2align.md gives the argument in full).

``b`` is stored as safetensors (``save_correction`` / ``load_correction``), key ``correction``, with the reward's
name, ω and the stage-1 settings in the file's metadata.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from mmalign.files import write_atomic
from mmalign.media import MediaBatch
from mmalign.rewards.base import Reward, RewardOutput
from mmalign.rewards.clip import CLIPFamilyReward, embedding_cosines, frame_embeddings

__all__ = [
    "CORRECTION_KEY",
    "CorrectionFit",
    "DirectionCorrected",
    "correction_objective",
    "cosine_to_score",
    "guided_embedding",
    "learn_correction",
    "load_correction",
    "require_clip_type",
    "save_correction",
    "shifted_embedding",
]

#: the tensor's key in a correction file
CORRECTION_KEY = "correction"


# ------------------------------------------------------------------------------------------------ the formula
def shifted_embedding(text: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """``normalize(e + b)`` for each row ``e`` of ``text`` ``(N, D)``; ``correction`` ``(D,)``."""
    return F.normalize(text + correction, dim=-1)


def guided_embedding(text: torch.Tensor, correction: torch.Tensor, omega: float) -> torch.Tensor:
    """``ẽ = normalize(e₋ + ω·(e₊ − e₋))`` with ``e± = normalize(e ± b)``, for each row ``e`` of ``text``."""
    plus, minus = shifted_embedding(text, correction), shifted_embedding(text, -correction)
    return F.normalize(minus + omega * (plus - minus), dim=-1)


# ------------------------------------------------------------------------------------------------ the reward
#: ``(cosine (B,), batch) -> scores (B,)``: how a CLIP-type reward makes its score from the cosine
CosineToScore = Callable[[torch.Tensor, MediaBatch], torch.Tensor]


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def cosine_to_score(reward: Reward) -> CosineToScore | None:
    """How ``reward`` makes its score from ``cos(Φ_img(x), e)``, or None where it does not say.

    A CLIPFamilyReward whose backbone encodes text and images says it with a method
    ``score_from_cosine(cosine, batch)`` (HPSv2: the cosine; PickScore: ``logit_scale·cos``, or its group
    softmax), or else with a numeric ``scale`` (``scale·cos``, unclamped). Anything else (no text embedding in the
    score, as the aesthetic head or JPEG; a score that is not a function of the cosine, as goal–baseline) is None.
    """
    if not isinstance(reward, CLIPFamilyReward):
        return None
    backbone = getattr(reward, "backbone", None)
    if not (hasattr(backbone, "encode_text") and hasattr(backbone, "encode_image")):
        return None
    method = getattr(reward, "score_from_cosine", None)
    if callable(method):
        return method
    scale = getattr(reward, "scale", None)
    if _numeric(scale):
        return lambda cosine, batch: float(scale) * cosine
    return None


def require_clip_type(reward: Reward) -> CLIPFamilyReward:
    """``reward`` if it is a CLIP-type reward whose score is a function of ``cos(image, text)``
    (``cosine_to_score`` is not None); a ValueError naming it otherwise."""
    if cosine_to_score(reward) is None:
        name = getattr(reward, "name", type(reward).__name__)
        raise ValueError(
            f"reward: direction_corrected wraps a CLIP-type reward whose score is a function of cos(image, text) "
            f"(clip, proxy, preference_proxy, hpsv2, pickscore: a score_from_cosine method or a numeric scale), "
            f"got {name!r} ({type(reward).__name__})"
        )
    return reward


class DirectionCorrected(Reward):
    """D²-Align's corrected CLIP score ``f(cos(Φ_img(x), ẽ))``, ``ẽ = normalize(e₋ + ω·(e₊ − e₋))``.

    ``e± = normalize(e ± b)`` with ``e`` the prompt's unit text embedding, ``b`` a learned correction (stage 1
    of D²-Align, ``learn_correction``) and ``f`` the wrapped reward's map from the cosine to its score
    (``cosine_to_score``: its ``score_from_cosine``, or ``scale·cos``). The score is in the wrapped reward's own
    units; a ``scale`` reward's is unclamped (so optimisation keeps a gradient where the cosine is negative).
    With ``b = 0`` it is the wrapped reward's score exactly. Videos are scored per frame and averaged. The scope
    is the wrapped reward's (PickScore with ``softmax: true`` is a group reward).

    Args:
        reward: the wrapped CLIP-type reward (``clip``, ``proxy``, ``preference_proxy``, ``hpsv2``,
            ``pickscore`` …): a Reward or a spec built with the registry (``{"name": "hpsv2"}``).
        correction: ``b``: a ``(D,)`` tensor or a file written by ``save_correction``.
        omega: the guidance weight ω (1.5 in the paper; 1 scores against ``e₊``, 0.5 is close to no correction).
    Components: ``corrected_cosine`` (the scored one) and ``cosine`` (against ``e``, the wrapped reward's).
    """

    name = "direction_corrected"
    scope = "sample"
    differentiable = True

    def __init__(
        self, reward: Reward | str | Mapping[str, Any], correction: str | os.PathLike | torch.Tensor, omega: float = 1.5
    ) -> None:
        super().__init__()
        if not isinstance(reward, Reward):
            from mmalign.rewards.registry import build

            reward = build(reward)
        self.reward = require_clip_type(reward)
        self.scope = reward.scope
        if isinstance(omega, bool) or not isinstance(omega, (int, float)) or not math.isfinite(omega):
            raise ValueError(f"omega: expected a finite number, got {omega!r}")
        self.omega = float(omega)
        if isinstance(correction, torch.Tensor):
            b = correction.detach()
        elif isinstance(correction, (str, os.PathLike)):
            b, meta = load_correction(correction)
            if meta.get("reward") not in (None, reward.name):
                raise ValueError(
                    f"correction: {os.fspath(correction)} was learned for reward {meta['reward']!r}, "
                    f"not {reward.name!r}"
                )
        else:
            raise TypeError(f"correction: expected a tensor or a path to a correction file, got {type(correction).__name__}")
        if b.ndim != 1 or not b.is_floating_point() or not torch.isfinite(b).all():
            raise ValueError(f"correction: expected a finite 1-D float tensor, got shape {tuple(b.shape)}, {b.dtype}")
        device = next(reward.parameters(), torch.empty(0)).device
        self.register_buffer("correction", b.to(device, torch.promote_types(b.dtype, torch.float32)).clone())
        self.freeze()

    @property
    def backbone(self):
        return self.reward.backbone

    @property
    def scale(self) -> float | None:
        """The wrapped reward's numeric ``scale`` (``scale·cos`` rewards), else None."""
        scale = getattr(self.reward, "scale", None)
        return float(scale) if _numeric(scale) else None

    def forward(self, batch: MediaBatch) -> RewardOutput:
        backbone = self.backbone
        text = backbone.encode_text(batch.prompts)
        if text.shape[-1] != self.correction.shape[0]:
            raise ValueError(
                f"correction: has {self.correction.shape[0]} dimensions, the text embeddings of "
                f"{self.reward.name!r} have {text.shape[-1]}"
            )
        b = self.correction.to(text.device, text.dtype)
        # b = 0 is the identity; skipping it keeps that exact (renormalising a unit vector can move the last bit)
        guided = guided_embedding(text, b, self.omega) if bool(b.any()) else text
        image = frame_embeddings(backbone, batch)
        corrected = embedding_cosines(image, guided).float()
        plain = embedding_cosines(image.detach(), text).float()
        info = {"omega": self.omega, "correction_norm": float(b.norm())}
        scores = cosine_to_score(self.reward)(corrected, batch)
        return RewardOutput(scores, {"corrected_cosine": corrected, "cosine": plain}, info=info)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, omega={self.omega}, correction_dim={self.correction.shape[0]}"


# ------------------------------------------------------------------------------------------------ files
def save_correction(path: str | os.PathLike, correction: torch.Tensor, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``b`` to a safetensors file (key ``correction``; ``meta`` as string metadata), atomically
    (``mmalign.files.write_atomic``), so a reader never sees half a file."""
    from safetensors.torch import save_file

    b = correction.detach()
    if b.ndim != 1 or not b.is_floating_point():
        raise ValueError(f"correction: expected a 1-D float tensor, got shape {tuple(b.shape)}, {b.dtype}")
    tensors, metadata = {CORRECTION_KEY: b.float().cpu().contiguous()}, {str(k): str(v) for k, v in (meta or {}).items()}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_correction(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """``(b, metadata)`` from a file written by ``save_correction``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"correction: no file {path}")
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        if CORRECTION_KEY not in names:
            raise ValueError(f"correction: {path} holds no {CORRECTION_KEY!r} tensor (keys: {sorted(names)})")
        return f.get_tensor(CORRECTION_KEY), dict(f.metadata() or {})


# ------------------------------------------------------------------------------------------------ stage 1
class CorrectionFit(NamedTuple):
    """What stage 1 found: ``b``, where it started, and the objective (mean shifted cosine) before and after."""

    correction: torch.Tensor
    initial: torch.Tensor
    objective_before: float
    objective_after: float


def correction_objective(image: torch.Tensor, text: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """Stage 1's objective, to be minimised: ``mean_i cos(Φ_img(x_i), normalize(e_i + b))``.

    ``image``: unit image embeddings ``(N, D)`` or ``(N, T, D)`` (videos: mean over frames); ``text``: each
    sample's unit prompt embedding ``(N, D)``; ``correction``: ``b`` ``(D,)``.
    """
    return embedding_cosines(image, shifted_embedding(text.to(image), correction.to(image))).mean()


def learn_correction(
    image: torch.Tensor,
    text: torch.Tensor,
    steps: int = 2000,
    lr: float = 1e-3,
    radius: float = 0.1,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> CorrectionFit:
    """Stage 1 of D²-Align: ``b`` minimising ``correction_objective`` on the sphere ``‖b‖ = radius``.

    The embeddings are those of the frozen generator's samples and their prompts, computed once: nothing here
    back-propagates into a generator or a reward model. ``b = radius·v`` with ``v`` a unit vector optimised by
    Adam (cosine-annealed learning rate ``lr``, full batch) and projected back onto the sphere after each step;
    unconstrained, the minimisation would only grow ``‖b‖``. ``init`` (any non-zero vector, rescaled to the
    sphere) defaults to a random direction drawn from ``generator``.
    """
    if image.ndim not in (2, 3) or text.ndim != 2 or image.shape[0] != text.shape[0] or image.shape[-1] != text.shape[-1]:
        raise ValueError(
            f"image, text: expected (N, D) or (N, T, D) image and (N, D) text embeddings, got {tuple(image.shape)} "
            f"and {tuple(text.shape)}"
        )
    if image.shape[0] == 0:
        raise ValueError("image: expected at least one sample, got none")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected an int >= 0, got {steps!r}")
    for key, value in (("lr", lr), ("radius", radius)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{key}: expected a finite number > 0, got {value!r}")
    image = image.detach().to(torch.promote_types(image.dtype, torch.float32))
    text = text.detach().to(image)
    if init is None:
        init = torch.randn(text.shape[-1], generator=generator, device=generator.device if generator else "cpu")
    init = init.detach().to(image).flatten()
    if init.shape[0] != text.shape[-1] or not torch.isfinite(init).all() or not bool(init.any()):
        raise ValueError(f"init: expected a finite non-zero ({text.shape[-1]},) vector, got shape {tuple(init.shape)}")
    direction = torch.nn.Parameter(F.normalize(init, dim=0))
    initial = (radius * direction).detach().clone()
    optimizer = torch.optim.Adam([direction], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    with torch.enable_grad():
        for _ in range(steps):
            loss = correction_objective(image, text, radius * direction)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                direction.copy_(F.normalize(direction, dim=0))
    correction = (radius * direction).detach().clone()
    with torch.no_grad():
        before = float(correction_objective(image, text, initial))
        after = float(correction_objective(image, text, correction))
    return CorrectionFit(correction, initial, before, after)
