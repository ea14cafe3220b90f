"""Loading generator pipelines by name (a hub id, a folder, or a named source such as the shipped world's) and
wrapping them in the adapter of their family."""

from __future__ import annotations

import inspect

import torch

from mmalign.config import import_object

__all__ = ["ADAPTERS", "PIPELINE_SOURCES", "adapter_for", "load_pipeline", "pretrained_pipeline"]

#: names that are not hub ids or folders → loader ``(dtype=...) -> pipeline``, as import paths (the world is
#: reached through this table, never imported by generic code).
PIPELINE_SOURCES: dict[str, str] = {"world": "mmalign.world.assets:load_pipeline",
                                    "world-video": "mmalign.world.assets:load_video_pipeline"}

#: diffusers pipeline class → the adapter of its family, as import paths (a subclass of a listed pipeline gets
#: its nearest listed base's adapter).
ADAPTERS: dict[str, str] = {
    "StableDiffusionPipeline": "mmalign.models.stable_diffusion:StableDiffusionAdapter",
    "StableDiffusionXLPipeline": "mmalign.models.sdxl:SDXLAdapter",
    "StableDiffusion3Pipeline": "mmalign.models.sd3:SD3Adapter",
    "FluxPipeline": "mmalign.models.flux:FluxAdapter",
    "TextToVideoSDPipeline": "mmalign.models.video_unet:VideoUNetAdapter",
    "AnimateDiffPipeline": "mmalign.models.video_unet:AnimateDiffAdapter",
    "WanPipeline": "mmalign.models.wan:WanAdapter",
}

#: loading options of a pipeline class that others do not take
_LOAD_OPTIONS: dict[str, dict] = {"StableDiffusionPipeline": {"safety_checker": None}}


def load_pipeline(name: str, dtype: torch.dtype = torch.float32, motion_adapter: str | None = None,
                  scheduler: dict | None = None):
    """A named source's pipeline (``"world"``: the shipped shapes pipeline; ``"world-video"``: its AnimateDiff
    video generator), else the pipeline class a folder or
    hub id names in its ``model_index.json`` (SD, SDXL, SD3, Flux, Wan, …), loaded with ``from_pretrained``;
    progress bars off (samplers call it in loops).

    ``motion_adapter`` (a hub id or folder of an AnimateDiff ``MotionAdapter``) makes an SD 1.x base an
    ``AnimateDiffPipeline``; ``scheduler`` overrides entries of the scheduler's config (AnimateDiff samples with
    linear betas where SD 1.5 has scaled-linear ones).
    """
    import diffusers

    if not isinstance(name, str) or not name:
        raise ValueError(f"pipeline: expected {', '.join(map(repr, PIPELINE_SOURCES))}, a hub id or a pipeline folder, "
                         f"got {name!r}")
    if name in PIPELINE_SOURCES:
        if motion_adapter is not None or scheduler:
            raise ValueError(f"motion_adapter, scheduler: the {name!r} pipeline takes neither")
        return import_object(PIPELINE_SOURCES[name])(dtype=dtype)
    if motion_adapter is not None:
        try:
            adapter = diffusers.MotionAdapter.from_pretrained(motion_adapter, dtype=dtype)
        except (OSError, ValueError) as err:
            raise ValueError(f"motion_adapter: expected a MotionAdapter folder or a hub id, got {motion_adapter!r} "
                             f"({str(err).splitlines()[0]})") from None
        pipe = pretrained_pipeline(diffusers.AnimateDiffPipeline, name, dtype=dtype, motion_adapter=adapter)
    else:
        pipe = _pretrained_by_class(name, dtype)
    if scheduler:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **scheduler)
    return pipe


def _pretrained_by_class(name: str, dtype: torch.dtype):
    """The pipeline class ``name``'s ``model_index.json`` names, loaded from it."""
    import diffusers

    try:
        class_name = diffusers.DiffusionPipeline.load_config(name)["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"pipeline: expected a pipeline folder (model_index.json) or a hub id, got {name!r} "
                         f"({reason})") from None
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"pipeline: {name!r} names the pipeline class {class_name!r}, which this diffusers "
                         f"({diffusers.__version__}) does not have")
    return pretrained_pipeline(cls, name, dtype=dtype, **_LOAD_OPTIONS.get(class_name, {}))


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


def adapter_for(pipeline, guidance_scale: float = 5.0, **options):
    """The generator adapter of ``pipeline``'s family (an adapter is returned as it is)."""
    from mmalign.models.adapter import GeneratorAdapter

    if isinstance(pipeline, GeneratorAdapter):
        return pipeline
    for cls in type(pipeline).__mro__:
        if cls.__name__ in ADAPTERS:
            adapter = import_object(ADAPTERS[cls.__name__])
            unknown = sorted(set(options) - set(inspect.signature(adapter).parameters))
            if unknown:
                raise ValueError(f"{', '.join(unknown)}: {adapter.__name__} (for {type(pipeline).__name__}) takes no "
                                 f"such option (video options are for video pipelines)")
            return adapter(pipeline, guidance_scale, **options)
    raise TypeError(f"pipeline: expected one of {', '.join(ADAPTERS)} (or a subclass), got {type(pipeline).__name__}")
