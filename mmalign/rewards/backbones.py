"""CLIP-type image/text encoders behind one interface, for every CLIP-family reward.

Two backends: OpenCLIP (architecture name + tag or checkpoint, ``hf-hub:``, or a published folder) and
transformers' ``CLIPModel`` (hub id or local folder). Both return unit-norm embeddings, take pixels in [0, 1]
preprocessed in torch (so gradients reach the pixels), cache text embeddings per prompt, and can recompute
their layers in the backward pass (gradient checkpointing) even in eval mode.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmalign.rewards.preprocess import to_model_input

__all__ = ["CLIPBackbone", "OpenCLIPBackbone", "HFCLIPBackbone", "hub_file", "load_backbone", "resolve_dtype"]

Backend = Literal["open_clip", "hf"]
#: The pretrained tag CLIP-family rewards default to (OpenAI's weights, as the papers used).
OPENCLIP_DEFAULT_TAG = "openai"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``"float32"``, ``"bfloat16"`` …) or itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


class _Checkpointed(nn.Module):
    """Runs the wrapped layer under activation checkpointing whenever gradients are being recorded."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)
        return self.layer(*args, **kwargs)


class CLIPBackbone(nn.Module):
    """Unit-norm image and text embeddings; subclasses provide the raw encoders and preprocessing sizes."""

    image_size: int | tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"

    def __init__(self, dtype: str | torch.dtype, text_cache_size: int) -> None:
        super().__init__()
        self.dtype = resolve_dtype(dtype)
        self.work_dtype = torch.promote_types(self.dtype, torch.float32)  # cosines never in half precision
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def logit_scale(self) -> float:
        """The learned temperature ``exp(t)`` the model was trained with (PickScore's score scale)."""
        raise NotImplementedError

    def _image_features(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` unit embeddings of ``(B,C,H,W)`` pixels in [0,1], differentiable in the pixels."""
        inputs = to_model_input(pixels.to(self.device), self.image_size, self.mean, self.std, self.interpolation, self.dtype)
        return F.normalize(self._image_features(inputs).to(self.work_dtype), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``(B, D)`` unit text embeddings; each distinct prompt is encoded once and cached (no gradients). Prompts
        are encoded one at a time: a batch's shape moves the last bits of its rows, and a cached embedding must not
        depend on which prompts were first encoded with it, or a resumed run would score differently."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        with torch.no_grad():
            for prompt in missing:
                self._text_cache[prompt] = F.normalize(self._text_features([prompt]).to(self.work_dtype), dim=-1)[0]
        for prompt in prompts:
            self._text_cache.move_to_end(prompt)
        out = torch.stack([self._text_cache[p] for p in prompts])
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return out

    def _apply(self, fn, recurse=True):  # .to()/.cuda() must not leave cached embeddings behind
        self._text_cache.clear()
        return super()._apply(fn, recurse)


class OpenCLIPBackbone(CLIPBackbone):
    """An OpenCLIP model: a built-in name with a tag or checkpoint file, ``hf-hub:org/repo``, or a folder.

    A plain folder path is read as ``local-dir:`` (``open_clip_config.json`` + weights), the layout in which
    OpenCLIP models are published, so one call serves the hub, a local copy and the shipped world proxy.
    """

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
        text_cache_size: int = 4096,
    ) -> None:
        super().__init__(dtype, text_cache_size)
        import open_clip

        if Path(model).is_dir():
            model = f"local-dir:{Path(model).resolve()}"
        if model.startswith(("local-dir:", "hf-hub:")):
            pretrained = None
        elif pretrained and not Path(pretrained).is_file():
            tags = open_clip.list_pretrained_tags_by_model(model)
            if pretrained not in tags:
                raise ValueError(f"pretrained: expected a checkpoint file or one of {tags} for {model!r}, got {pretrained!r}")
        self.model = open_clip.create_model(model, pretrained=pretrained, device=device).to(dtype=self.dtype)
        self.tokenizer = open_clip.get_tokenizer(model)
        if gradient_checkpointing:
            self.model.set_grad_checkpointing(True)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        self.image_size, self.mean, self.std = cfg["size"], tuple(cfg["mean"]), tuple(cfg["std"])
        self.interpolation = cfg.get("interpolation", "bicubic")

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def _image_features(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(inputs)

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.device))


class HFCLIPBackbone(CLIPBackbone):
    """A transformers ``CLIPModel`` (hub id or folder); ``processor`` names where the tokenizer and image
    processor live when they are published separately (PickScore uses the LAION ViT-H-14 processor)."""

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        gradient_checkpointing: bool = False,
        text_cache_size: int = 4096,
    ) -> None:
        super().__init__(dtype, text_cache_size)
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(model, dtype=self.dtype).to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(processor or model)
        image_processor = AutoImageProcessor.from_pretrained(processor or model)
        crop = image_processor.crop_size or {}
        side = crop.get("height") or image_processor.size.get("shortest_edge") or self.model.config.vision_config.image_size
        self.image_size = (crop.get("height", side), crop.get("width", side))
        self.mean, self.std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        if gradient_checkpointing:
            for encoder in (self.model.vision_model.encoder, self.model.text_model.encoder):
                encoder.layers = nn.ModuleList(_Checkpointed(layer) for layer in encoder.layers)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def _image_features(self, inputs: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=inputs))

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _pooled(self.model.get_text_features(**tokens))


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_backbone(
    backend: Backend,
    model: str,
    pretrained: str | None = None,
    processor: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    gradient_checkpointing: bool = False,
) -> CLIPBackbone:
    """The backbone for ``backend``: ``pretrained`` is OpenCLIP's tag/checkpoint, ``processor`` the HF
    processor location; each is rejected by the other backend rather than silently ignored (except the
    rewards' default tag ``"openai"``, so ``backend="hf"`` needs no ``pretrained=None``)."""
    if backend == "open_clip":
        if processor is not None:
            raise ValueError("processor: only the 'hf' backend takes a processor; OpenCLIP folders carry their own")
        return OpenCLIPBackbone(model, pretrained, device, dtype, gradient_checkpointing)
    if backend == "hf":
        if pretrained not in (None, OPENCLIP_DEFAULT_TAG):  # the rewards' OpenCLIP default means nothing here
            raise ValueError("pretrained: the 'hf' backend loads weights from `model`; pass a hub id or folder there")
        return HFCLIPBackbone(model, processor, device, dtype, gradient_checkpointing)
    raise ValueError(f"backend: expected 'open_clip' or 'hf', got {backend!r}")


def hub_file(file: str, repo_id: str) -> str:
    """A local path for ``file``: itself when it exists, else the file of that name in hub repo ``repo_id``
    (cached; offline with ``HF_HUB_OFFLINE=1`` once downloaded)."""
    if Path(file).is_file():
        return str(file)
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, file)
    except Exception as err:  # the hub client raises many types; the user needs the names either way
        raise ValueError(
            f"file: {file!r} is not a local file and could not be fetched from hub repo {repo_id!r} ({err})"
        ) from err
