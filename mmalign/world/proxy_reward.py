"""The world's learned proxy rewards: CLIP scores on the shipped OpenCLIP models.

``proxy`` is the contrastive model trained on clean renders (the world's CLIPScore); ``preference_proxy`` is
the same model fine-tuned on gold-labelled comparisons of the generator's samples (the world's PickScore or
HPSv2), the reward the embedded default trains against. Both can be hacked; the gold verifier (``gold``) is
the truth they are measured against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmalign.rewards.clip import CLIPScore
from mmalign.rewards.ensemble import Ensemble

__all__ = ["PreferenceEnsemble", "PreferenceProxyScore", "ProxyScore", "ensemble_member_path"]


class ProxyScore(CLIPScore):
    """CLIP score ``scale·cos`` on the shipped world proxy (or the OpenCLIP folder ``model``), unclamped so
    that optimisation keeps a gradient where the cosine is negative."""

    name = "proxy"

    def __init__(
        self,
        model: str | None = None,
        scale: float = 100.0,
        clamp: bool = False,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
    ) -> None:
        model = self.default_model() if model is None else model
        super().__init__(model, None, "open_clip", None, scale, clamp, device, dtype, gradient_checkpointing)

    @staticmethod
    def default_model() -> str:
        from mmalign.world.assets import proxy_path

        return proxy_path()


class PreferenceProxyScore(ProxyScore):
    """``scale·cos`` on the shipped preference proxy (``mmalign.world.preference``): the contrastive proxy
    fine-tuned on gold-labelled comparisons of the base generator's samples, as PickScore is on people's.
    ``member`` (e.g. ``"noisy-0"``) picks one of the rebuilt ensemble's members instead (``PreferenceEnsemble``)."""

    name = "preference_proxy"

    def __init__(
        self,
        model: str | None = None,
        scale: float = 100.0,
        clamp: bool = False,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
        member: str | None = None,
    ) -> None:
        if member is not None:
            if model is not None:
                raise ValueError(f"model, member: give one of them, got model={model!r} and member={member!r}")
            model = ensemble_member_path(member)
        super().__init__(model, scale, clamp, device, dtype, gradient_checkpointing)

    @staticmethod
    def default_model() -> str:
        from mmalign.world.assets import preference_path

        return preference_path()


def ensemble_member_path(member: str, folder: str | None = None) -> str:
    """Folder of member ``member`` (``clean-0``, ``noisy-2`` …) of the preference ensembles in ``folder``
    (default: the package's assets), which ``mmalign world build --only preference-ensemble`` makes."""
    from mmalign.world.assets import ASSETS_DIR

    root = Path(folder) if folder is not None else ASSETS_DIR / "preference_ensemble"
    path = root / member
    if not (path / "open_clip_config.json").is_file():
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ValueError(
            f"member: {member!r} is not in {root} (found {have or 'nothing'}); the preference ensembles are rebuilt, "
            "not shipped: run `mmalign world build --only preference-ensemble` (docs/overoptimization.md)")
    return str(path)


class PreferenceEnsemble(Ensemble):
    """Coste et al.'s reward-model ensemble on the world: the preference proxies fine-tuned from several seeds on
    one set of comparisons, with gold's labels (``labels="clean"``) or a quarter of them flipped (``"noisy"``),
    combined by ``mode`` (mean, UWO ``mean − lam·var``, WCO ``min``) after per-member standardisation.
    ``members`` takes the first few (default: all that were built); ``folder`` is where they were built."""

    name = "preference_ensemble"

    def __init__(
        self,
        labels: str = "clean",
        members: int | None = None,
        mode: str = "mean",
        lam: float = 0.5,
        scale: float = 100.0,
        folder: str | None = None,
        device: str | torch.device = "cpu",
        momentum: float | None = None,
    ) -> None:
        from mmalign.world.preference import ENSEMBLE_LABELS

        if labels not in ENSEMBLE_LABELS:
            raise ValueError(f"labels: expected one of {', '.join(ENSEMBLE_LABELS)}, got {labels!r}")
        root = Path(ensemble_member_path(f"{labels}-0", folder)).parent
        built = sum(1 for p in root.iterdir() if p.name.startswith(f"{labels}-"))
        if members is None:
            members = built
        if not isinstance(members, int) or not 1 <= members <= built:
            raise ValueError(f"members: expected an int from 1 to {built} (the {labels} members built), got {members!r}")
        rewards = [PreferenceProxyScore(model=ensemble_member_path(f"{labels}-{k}", folder), scale=scale, device=device)
                   for k in range(members)]
        super().__init__(rewards, mode, lam, standardize=True, momentum=momentum)
