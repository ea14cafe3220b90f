"""MediaBatch: the one container every reward and trainer passes images and videos in.

Images are ``(B, C, H, W)`` and videos ``(B, T, C, H, W)``, float in [0, 1], channels first, with one prompt
and one metadata dict per sample. Validation happens once, at construction, so that rewards can trust what
they receive and a bad input fails where it enters rather than deep inside a model.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["MediaBatch", "IMAGE_SUFFIXES", "open_image", "per_prompt_metadata", "per_sample"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_CHANNELS = (1, 3)


@dataclass(frozen=True)
class MediaBatch:
    """A validated batch of images or videos with their prompts.

    Attributes:
        pixels: ``(B, C, H, W)`` images or ``(B, T, C, H, W)`` videos; floating point, values in [0, 1].
        prompts: one prompt per sample.
        metadata: one dict per sample (e.g. the structured scene of a prompt, a file name, a group id).
        completions: for vision-language models, the generated text per sample (what rule rewards and VLM
            GRPO score); None for generators, whose output is the pixels.
    """

    pixels: torch.Tensor
    prompts: list[str]
    metadata: list[dict[str, Any]] = field(default_factory=list)
    completions: list[str] | None = None

    def __post_init__(self) -> None:
        pixels, prompts = self.pixels, self.prompts
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"pixels: expected a torch.Tensor, got {type(pixels).__name__}")
        if pixels.ndim not in (4, 5):
            raise ValueError(
                f"pixels: expected rank 4 (B,C,H,W) images or rank 5 (B,T,C,H,W) videos, "
                f"got rank {pixels.ndim} with shape {tuple(pixels.shape)}"
            )
        if pixels.shape[0] == 0:
            raise ValueError("pixels: expected a non-empty batch, got batch size 0")
        if pixels.numel() == 0:
            raise ValueError(f"pixels: expected non-empty samples, got shape {tuple(pixels.shape)}")
        channels = pixels.shape[-3]
        if channels not in _CHANNELS:
            raise ValueError(
                f"pixels: expected 1 or 3 channels at dim {pixels.ndim - 3} (channels first), "
                f"got {channels} in shape {tuple(pixels.shape)}"
            )
        if not pixels.is_floating_point():
            raise TypeError(
                f"pixels: expected a floating-point tensor in [0, 1], got dtype {pixels.dtype}; "
                "use MediaBatch.from_uint8 for 0-255 images"
            )
        with torch.no_grad():
            finite = torch.isfinite(pixels)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise ValueError(f"pixels: expected finite values, got {bad} NaN/Inf entries")
            lo, hi = float(pixels.min()), float(pixels.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"pixels: expected values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
        if len(prompts) != pixels.shape[0]:
            raise ValueError(
                f"prompts: expected one prompt per sample ({pixels.shape[0]}), got {len(prompts)}"
            )
        bad_prompts = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad_prompts:
            raise TypeError(f"prompts: expected strings, got non-strings at indices {bad_prompts[:5]}")
        metadata = list(self.metadata) if self.metadata else [{} for _ in prompts]
        if len(metadata) != len(prompts):
            raise ValueError(f"metadata: expected one dict per sample ({len(prompts)}), got {len(metadata)}")
        if not all(isinstance(m, Mapping) for m in metadata):
            raise TypeError("metadata: expected a dict per sample")
        if self.completions is not None:
            if not isinstance(self.completions, Sequence):
                raise TypeError(
                    f"completions: expected a list of strings or None, got {type(self.completions).__name__}"
                )
            if isinstance(self.completions, str) or len(self.completions) != len(prompts):
                got = "a string" if isinstance(self.completions, str) else str(len(self.completions))
                raise ValueError(f"completions: expected one string per sample ({len(prompts)}), got {got}")
            if not all(isinstance(c, str) for c in self.completions):
                raise TypeError("completions: expected strings")
            object.__setattr__(self, "completions", list(self.completions))
        object.__setattr__(self, "prompts", list(prompts))
        object.__setattr__(self, "metadata", [dict(m) for m in metadata])

    # ----------------------------------------------------------------------------------------- properties
    @property
    def is_video(self) -> bool:
        return self.pixels.ndim == 5

    @property
    def batch_size(self) -> int:
        return self.pixels.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def frames_per_sample(self) -> int:
        return self.pixels.shape[1] if self.is_video else 1

    def flat_frames(self) -> torch.Tensor:
        """``(B·T, C, H, W)``: every frame as an image, for image models that score videos frame by frame;
        reshape their ``(B·T,)`` outputs with ``.view(B, frames_per_sample)``."""
        return self.pixels.flatten(0, 1) if self.is_video else self.pixels

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MediaBatch:
        """The same batch with its pixels moved or cast (gradients flow through the move)."""
        return MediaBatch(self.pixels.to(device=device, dtype=dtype), self.prompts, self.metadata, self.completions)

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> MediaBatch:
        """Select samples; always returns a batch (an int selects a batch of one)."""
        if isinstance(index, int):
            index = [index]
        if isinstance(index, slice):
            ids = list(range(self.batch_size))[index]
        else:
            ids = [int(i) for i in (index.tolist() if isinstance(index, torch.Tensor) else index)]
        completions = None if self.completions is None else [self.completions[i] for i in ids]
        return MediaBatch(
            self.pixels[ids], [self.prompts[i] for i in ids], [self.metadata[i] for i in ids], completions
        )

    @staticmethod
    def concat(batches: Sequence[MediaBatch]) -> MediaBatch:
        """Concatenate batches of the same media kind and size."""
        if not batches:
            raise ValueError("batches: expected at least one MediaBatch, got none")
        not_batches = [i for i, b in enumerate(batches) if not isinstance(b, MediaBatch)]
        if not_batches:
            raise TypeError(f"batches: expected MediaBatch objects, got other types at indices {not_batches[:5]}")
        shapes = {tuple(b.pixels.shape[1:]) for b in batches}
        if len(shapes) > 1:
            raise ValueError(f"batches: expected the same per-sample shape, got {sorted(shapes)}")
        with_text = {b.completions is not None for b in batches}
        if len(with_text) > 1:
            raise ValueError("batches: expected all or none of the batches to have completions")
        return MediaBatch(
            torch.cat([b.pixels for b in batches]),
            [p for b in batches for p in b.prompts],
            [m for b in batches for m in b.metadata],
            [c for b in batches for c in b.completions] if with_text == {True} else None,
        )

    # ------------------------------------------------------------------------------------------ exporting
    def to_pil(self) -> list[Image.Image]:
        """The images as PIL (videos: the first frame of each); for grids, demos and files."""
        frames = self.pixels[:, 0] if self.is_video else self.pixels
        arr = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        arr = arr.permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]

    # ------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_uint8(
        cls, pixels: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> MediaBatch:
        """From a uint8 tensor ``(B,C,H,W)`` / ``(B,T,C,H,W)`` with values 0-255."""
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8:
            got = pixels.dtype if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise TypeError(f"pixels: expected a uint8 torch.Tensor, got {got}")
        return cls(pixels.float() / 255.0, _listed(prompts), _listed(metadata or []))

    @classmethod
    def from_numpy(
        cls,
        arrays: np.ndarray | Sequence[np.ndarray],
        prompts: Sequence[str],
        metadata: Sequence[dict] | None = None,
        channels_last: bool = True,
    ) -> MediaBatch:
        """From numpy ``(B,H,W,C)`` (or ``(B,C,H,W)`` with ``channels_last=False``) or a list of ``(H,W,C)``.

        uint8 arrays are scaled from 0-255; floating arrays must already be in [0, 1].
        """
        if not isinstance(arrays, np.ndarray):
            arrays = _stack_same_size([np.asarray(a) for a in arrays], "arrays")
        if arrays.ndim == 3:  # (B,H,W) grayscale
            arrays = arrays[..., None] if channels_last else arrays[:, None]
        if arrays.ndim not in (4, 5):
            raise ValueError(
                f"arrays: expected (B,H,W,C) images or (B,T,H,W,C) videos, got shape {arrays.shape}"
            )
        tensor = torch.from_numpy(np.ascontiguousarray(arrays))
        if channels_last:
            tensor = tensor.movedim(-1, -3)
        if tensor.dtype == torch.uint8:
            return cls.from_uint8(tensor.contiguous(), prompts, metadata)
        if not tensor.is_floating_point():
            raise TypeError(f"arrays: expected uint8 or floating-point values, got {arrays.dtype}")
        return cls(tensor.float().contiguous(), _listed(prompts), _listed(metadata or []))

    @classmethod
    def from_pil(
        cls, images: Iterable[Image.Image], prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> MediaBatch:
        """From PIL images of one size (converted to RGB)."""
        if isinstance(images, (str, Image.Image)) or not isinstance(images, Iterable):
            raise TypeError(f"images: expected a list of PIL images, got {type(images).__name__}")
        images = list(images)
        if not images:
            raise ValueError("images: expected at least one PIL image, got none")
        not_pil = [i for i, im in enumerate(images) if not isinstance(im, Image.Image)]
        if not_pil:
            raise TypeError(f"images: expected PIL images, got other types at indices {not_pil[:5]}")
        arrays = [np.asarray(im.convert("RGB")) for im in images]
        return cls.from_numpy(_stack_same_size(arrays, "images"), prompts, metadata)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        prompts: str | Path | Sequence[str] | None = None,
        size: int | None = None,
        on_error: str = "stop",
    ) -> MediaBatch:
        """Images of a folder, sorted by file name, with their prompts.

        ``prompts`` is a list, a file, or None to look for ``prompts.jsonl`` / ``prompts.txt`` in the folder.
        A ``.txt`` file holds one prompt per line in file-name order; a ``.jsonl`` file holds objects with
        ``file`` and ``prompt`` (other keys become metadata). ``size`` resizes every image to a square.
        A file that cannot be read as an image stops with a ``ValueError`` naming it (``on_error="stop"``) or
        is left out, with its prompt, after a warning that names it (``on_error="skip"``).
        """
        if not isinstance(folder, (str, Path)):
            raise TypeError(f"folder: expected a path to a directory of images, got {type(folder).__name__}")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise ValueError(f"size: expected a positive int (pixels per side) or None, got {size!r}")
        if on_error not in ("stop", "skip"):
            raise ValueError(f"on_error: expected 'stop' or 'skip', got {on_error!r}")
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"folder: expected a directory of images, got {str(folder)!r}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"folder: expected images ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}, found none")
        texts, metadata = _read_prompts(folder, files, prompts)
        images, kept, skipped = [], [], []
        for i, path in enumerate(files):
            try:
                im = open_image(path)
            except ValueError as err:
                if on_error == "stop":
                    raise ValueError(f"{err}; on_error='skip' (`mmalign score --skip-unreadable`) leaves it out") from None
                skipped.append(path.name)
                continue
            images.append(im.resize((size, size), Image.BICUBIC) if size else im)
            kept.append(i)
        if skipped:
            if not images:
                raise ValueError(f"folder: expected readable images in {str(folder)!r}, could read none of {skipped[:5]}")
            warnings.warn(f"folder: skipped {len(skipped)} unreadable file(s) in {str(folder)!r}: {skipped[:10]}",
                          stacklevel=2)
        for i in kept:
            metadata[i].setdefault("file", files[i].name)
        return cls.from_pil(images, [texts[i] for i in kept], [metadata[i] for i in kept])


def open_image(path: str | Path) -> Image.Image:
    """The RGB image in ``path``, loaded; a ``ValueError`` naming the file when it is missing or not an image."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:  # missing, unreadable, not an image, truncated
        raise ValueError(f"image: expected a readable image file, got {str(path)!r} ({err})") from None


def _listed(items: Any) -> Any:
    """``items`` as a list when it is an iterable other than a string; else unchanged, for the batch's own check."""
    return list(items) if isinstance(items, Iterable) and not isinstance(items, (str, Mapping)) else items


def _stack_same_size(arrays: list[np.ndarray], name: str) -> np.ndarray:
    if not arrays:
        raise ValueError(f"{name}: expected at least one sample, got none")
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) > 1:
        raise ValueError(f"{name}: expected all samples to have one size, got mixed sizes {sizes[:4]}")
    return np.stack(arrays)


def _read_prompts(
    folder: Path, files: list[Path], prompts: str | Path | Sequence[str] | None
) -> tuple[list[str], list[dict]]:
    if prompts is None:
        candidates = [folder / "prompts.jsonl", folder / "prompts.txt"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ValueError(
                f"prompts: none given and neither prompts.jsonl nor prompts.txt exists in {str(folder)!r}"
            )
        prompts = found
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise ValueError(f"prompts: expected a .txt or .jsonl file, got {str(path)!r} which does not exist")
        if path.suffix == ".jsonl":
            by_file = {}
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"prompts: line {number} of {path.name}: expected a JSON object, got invalid "
                                     f"JSON ({err.msg})") from None
                if not isinstance(row, dict) or "file" not in row or "prompt" not in row:
                    raise ValueError(f"prompts: line {number} of {path.name} needs 'file' and 'prompt' keys")
                by_file[row["file"]] = row
            missing = [f.name for f in files if f.name not in by_file]
            if missing:
                raise ValueError(f"prompts: {path.name} has no prompt for {missing[:5]}")
            metadata = [{k: v for k, v in by_file[f.name].items() if k != "prompt"} for f in files]
            return [by_file[f.name]["prompt"] for f in files], metadata
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a list of strings, a .txt/.jsonl file or None, got {type(prompts).__name__}")
    texts = list(prompts)
    if len(texts) != len(files):
        raise ValueError(f"prompts: expected one prompt per image ({len(files)}), got {len(texts)}")
    return texts, [{} for _ in files]


def per_prompt_metadata(metadata: Sequence[Mapping[str, Any]] | None, count: int) -> list[dict[str, Any]]:
    """A copy of ``metadata`` with one dict per prompt (None: empty dicts), checked against ``count`` prompts."""
    metadata = [dict(m) for m in metadata] if metadata is not None else [{} for _ in range(count)]
    if len(metadata) != count:
        raise ValueError(f"metadata: expected one dict per prompt ({count}), got {len(metadata)}")
    return metadata


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``values`` viewed as ``(B, 1, …)`` to broadcast over the samples of ``like`` (images, videos or
    latents of either: any rank)."""
    return values.view(-1, *[1] * (like.ndim - 1))
