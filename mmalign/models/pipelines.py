"""Loading generator pipelines by name: a hub id, a folder, or a named source such as the shipped world's."""

from __future__ import annotations

import torch

from mmalign.config import import_object

__all__ = ["PIPELINE_SOURCES", "load_sd_pipeline"]

#: names that are not hub ids or folders → loader ``(dtype=...) -> pipeline``, as import paths (the world is
#: reached through this table, never imported by generic code).
PIPELINE_SOURCES: dict[str, str] = {"world": "mmalign.world.assets:load_pipeline"}


def load_sd_pipeline(name: str, dtype: torch.dtype = torch.float32):
    """A named source's pipeline (``"world"``: the shipped shapes pipeline), else
    ``StableDiffusionPipeline.from_pretrained(name)``; progress bars off (samplers call it in loops)."""
    from diffusers import StableDiffusionPipeline

    if name in PIPELINE_SOURCES:
        return import_object(PIPELINE_SOURCES[name])(dtype=dtype)
    pipe = StableDiffusionPipeline.from_pretrained(name, dtype=dtype, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe
