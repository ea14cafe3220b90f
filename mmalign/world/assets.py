"""Where the shipped world models live, and one-line loaders over the ecosystem's own ones.

The folders are plain diffusers and OpenCLIP layouts: ``StableDiffusionPipeline.from_pretrained(pipeline_path())``
and ``open_clip.create_model_and_transforms("local-dir:" + proxy_path())`` need no mmalign code; the helpers
here only pick the path, the device and the sampler settings the quality bars were measured with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["ASSETS_DIR", "SAMPLER", "pipeline_path", "proxy_path", "preference_path", "video_pipeline_path",
           "motion_proxy_path", "load_pipeline", "load_proxy", "load_video_pipeline", "generate"]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
#: Sampler settings of the shipped pipeline's reported gold scores (DDIM, its scheduler as saved).
SAMPLER: dict[str, float | int] = {"num_inference_steps": 20, "guidance_scale": 5.0}


def _folder(name: str, marker: str, model: str) -> str:
    folder = ASSETS_DIR / name
    if not (folder / marker).is_file():
        raise FileNotFoundError(
            f"{folder} holds no {marker}: the shipped {model} is missing; rebuild it with "
            f"`mmalign world build --only {model}`"
        )
    return str(folder)


def pipeline_path() -> str:
    """Folder of the shipped ``StableDiffusionPipeline`` (VAE, CLIP text encoder, tokenizer, UNet, DDIM)."""
    return _folder("pipeline", "model_index.json", "generator")


def proxy_path() -> str:
    """Folder of the shipped OpenCLIP proxy reward (``open_clip_config.json`` + safetensors + tokenizer)."""
    return _folder("proxy", "open_clip_config.json", "proxy")


def preference_path() -> str:
    """Folder of the shipped preference proxy (the proxy's layout, weights fine-tuned on comparisons)."""
    return _folder("preference", "open_clip_config.json", "preference")


def video_pipeline_path() -> str:
    """Folder of the shipped video generator: its motion adapter, text encoder and tokenizer (the rest is the
    image pipeline's, named in its ``video_pipeline.json``)."""
    return _folder("video_pipeline", "video_pipeline.json", "video-generator")


def motion_proxy_path() -> str:
    """Folder of the shipped motion classifier (``mmalign.world.motion_proxy``) behind the ``motion_proxy`` reward."""
    return _folder("motion_proxy", "model.safetensors", "motion-proxy")


def load_video_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        path: str | None = None):
    """The shipped (or ``path``'s) video generator as a diffusers ``AnimateDiffPipeline`` on ``device``: the
    folder's motion adapter, text encoder and tokenizer on the VAE, UNet and scheduler of the image pipeline
    beside it (``../pipeline``), or of the shipped one when there is none there."""
    from mmalign.config import check_device
    from mmalign.world.video_generator import assemble_video_pipeline

    check_device(device)
    folder = Path(path or video_pipeline_path())
    base = folder.parent / "pipeline"
    return assemble_video_pipeline(folder, base if (base / "model_index.json").is_file() else pipeline_path(),
                                   dtype).to(device)


def load_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path: str | None = None):
    """The shipped (or ``path``'s) pipeline on ``device``, progress bars off (samplers call it in loops)."""
    from diffusers import StableDiffusionPipeline

    from mmalign.config import check_device
    from mmalign.models.pipelines import pretrained_pipeline

    check_device(device)
    return pretrained_pipeline(StableDiffusionPipeline, path or pipeline_path(), dtype=dtype).to(device)


def load_proxy(device: str | torch.device = "cpu", path: str | None = None):
    """``(model, preprocess, tokenizer)`` of the shipped (or ``path``'s) proxy through OpenCLIP's loaders."""
    import open_clip

    name = "local-dir:" + str(Path(path or proxy_path()).resolve())
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seed: int = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """``(B, 3, H, W)`` images in [0, 1], one per prompt, from one seeded generator (``SAMPLER`` defaults;
    ``eta`` > 0 makes the DDIM steps stochastic, as the PRDP policy samples)."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError(f"prompts: expected a non-empty list of strings, got {prompts!r}")
    out = pipe(
        list(prompts),
        num_inference_steps=int(num_inference_steps or SAMPLER["num_inference_steps"]),
        guidance_scale=float(SAMPLER["guidance_scale"] if guidance_scale is None else guidance_scale),
        generator=torch.Generator(device="cpu").manual_seed(seed),
        eta=eta,
        output_type="pt",
    )
    return out.images.float().clamp(0, 1).cpu()
