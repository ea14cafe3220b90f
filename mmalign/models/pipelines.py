"""Loading generator pipelines by name: a hub id, a folder, or a named source such as the shipped world's."""

from __future__ import annotations

import torch

from mmalign.config import import_object

__all__ = ["PIPELINE_SOURCES", "load_sd_pipeline", "pretrained_pipeline"]

#: names that are not hub ids or folders → loader ``(dtype=...) -> pipeline``, as import paths (the world is
#: reached through this table, never imported by generic code).
PIPELINE_SOURCES: dict[str, str] = {"world": "mmalign.world.assets:load_pipeline"}


def load_sd_pipeline(name: str, dtype: torch.dtype = torch.float32):
    """A named source's pipeline (``"world"``: the shipped shapes pipeline), else
    ``StableDiffusionPipeline.from_pretrained(name)``; progress bars off (samplers call it in loops)."""
    from diffusers import StableDiffusionPipeline

    if not isinstance(name, str) or not name:
        raise ValueError(f"pipeline: expected {', '.join(map(repr, PIPELINE_SOURCES))}, a hub id or a pipeline folder, "
                         f"got {name!r}")
    if name in PIPELINE_SOURCES:
        return import_object(PIPELINE_SOURCES[name])(dtype=dtype)
    return pretrained_pipeline(StableDiffusionPipeline, name, dtype=dtype, safety_checker=None)


def pretrained_pipeline(cls, name: str, **kwargs):
    """``cls.from_pretrained(name, **kwargs)`` with progress bars off; a ``ValueError`` naming ``name`` when
    there is no pipeline there (no such folder, no ``model_index.json``, a hub id that is not cached offline)."""
    try:
        pipe = cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:  # diffusers: OSError for a missing folder or hub id, ValueError for a bad path
        reason = str(err).splitlines()[0]
        raise ValueError(f"pipeline: expected a pipeline folder (model_index.json) or a hub id, got {name!r} "
                         f"({reason})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe
