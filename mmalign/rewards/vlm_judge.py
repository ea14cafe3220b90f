"""The judge base for Hugging Face VLMs: answer-token log-probabilities of many (image, question, answer)
rows in one teacher-forced batched forward pass.

Any model ``AutoProcessor`` + ``AutoModelForImageTextToText`` load works (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA, Idefics3/SmolVLM): the question goes through the processor's chat template, the answer's tokens are
appended after the generation prompt, and the log-softmax of the logits before each answer token is
gathered. Rows are re-padded on the tokenizer's side, so left and right padding give the same numbers.

Models whose image processor is ``Qwen2VLImageProcessor`` (the Qwen2-VL family) are fed ``pixel_values``
computed in torch from the batch's float pixels (resize, normalise, patchify as the processor does), so
``differentiable=True`` gives gradients to the pixels; other models take the processor's own uint8 path.
Video batches ``(B, T, C, H, W)`` go to models whose video processor is ``Qwen2VLVideoProcessor`` as video
input (a video part in the user turn, ``pixel_values_videos`` and ``video_grid_thw`` computed in torch likewise);
other models refuse them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmalign.config import check_device
from mmalign.media import MediaBatch
from mmalign.rewards.backbones import resolve_dtype
from mmalign.rewards.base import Reward

__all__ = ["VLMJudge", "load_judge_model", "qwen2vl_pixel_values", "qwen2vl_video_values", "supports_tensor_pixels",
           "supports_tensor_videos"]


def load_judge_model(model: str | nn.Module, processor=None, dtype: str | torch.dtype = "float32",
                     device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """``(model, processor)`` from a hub id or folder (processor from ``processor`` or beside the model), or a
    model object with its processor; the model in eval mode on ``device``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    check_device(device)
    dtype = resolve_dtype(dtype)
    if isinstance(model, str):
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
        processor = model if processor is None else processor
    elif isinstance(model, nn.Module):
        if processor is None:
            raise ValueError(f"processor: a model object ({type(model).__name__}) needs its processor, got None")
        loaded = model.to(dtype)
    else:
        raise TypeError(f"model: expected a hub id, a folder or a transformers model, got {type(model).__name__}")
    if isinstance(processor, str):
        processor = AutoProcessor.from_pretrained(processor, trust_remote_code=trust_remote_code)
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"processor: expected a processor with a chat template, got {type(processor).__name__} "
                         "without one")
    return loaded.to(device).eval(), processor


def supports_tensor_pixels(processor) -> bool:
    """Whether ``qwen2vl_pixel_values`` reproduces this processor's images (the Qwen2-VL family's)."""
    from transformers import Qwen2VLImageProcessor

    return isinstance(getattr(processor, "image_processor", None), Qwen2VLImageProcessor)


def _resized_normalised(pixels: torch.Tensor, h: int, w: int, processor) -> torch.Tensor:
    """Float ``(N, C, H, W)`` pixels in [0, 1] resized to ``(h, w)`` (the processor's resample, antialiased) and
    normalised as a Qwen2-VL image or video processor does."""
    from torchvision.transforms.functional import InterpolationMode, resize

    if processor.do_resize and (h, w) != tuple(pixels.shape[-2:]):
        modes = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}
        pixels = resize(pixels, [h, w], interpolation=modes[int(processor.resample)], antialias=True)
    mean = torch.tensor(processor.image_mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean) / std if processor.do_normalize else pixels


def _patches(x: torch.Tensor, patch: int, merge: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, grid_thw)`` of ``(B, T, C, h, w)`` clips in Qwen2-VL's patch order: T padded to a multiple of
    ``frames`` (the temporal patch) by repeating the last frame, patches merged ``merge``² (an image is T = 1)."""
    if pad := -x.shape[1] % frames:
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], 1)
    b, t, c, h, w = x.shape
    gt, gh, gw = t // frames, h // patch, w // patch
    x = x.reshape(b, gt, frames, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    grid = torch.tensor([[gt, gh, gw]] * b, dtype=torch.long)
    return x.reshape(b * gt * gh * gw, c * frames * patch * patch), grid


def qwen2vl_pixel_values(pixels: torch.Tensor, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, image_grid_thw)`` of float ``(B, 3, H, W)`` images in [0, 1], computed in torch as
    ``Qwen2VLImageProcessor`` computes them (smart resize, normalise, patches merged ``merge_size``²,
    repeated over ``temporal_patch_size``), so gradients reach ``pixels``."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = image_processor
    h, w = smart_resize(*pixels.shape[-2:], ip.patch_size * ip.merge_size, ip.size["shortest_edge"],
                        ip.size["longest_edge"])
    if not ip.do_resize:
        h, w = pixels.shape[-2:]
    x = _resized_normalised(pixels, h, w, ip)
    return _patches(x[:, None], ip.patch_size, ip.merge_size, ip.temporal_patch_size)


def qwen2vl_video_values(videos: torch.Tensor, video_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values_videos, video_grid_thw)`` of float ``(B, T, 3, H, W)`` clips in [0, 1], computed in torch
    as ``Qwen2VLVideoProcessor`` computes them (frames resized to one smart size, the per-frame pixel cap when
    ``cap_pixels_per_frame``, normalised, ``temporal_patch_size`` frames per patch, the last frame repeated to
    fill one), so gradients reach ``videos``. Frames are taken as given (no frame sampling)."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    vp = video_processor
    b, t, c, height, width = videos.shape
    factor = vp.patch_size * vp.merge_size
    longest, shortest = vp.size["longest_edge"], vp.size["shortest_edge"]
    if vp.cap_pixels_per_frame:  # as Qwen2VLVideoProcessor.resize bounds a clip's total pixels
        total = int(vp.max_video_tokens * factor * factor * 0.9)
        longest = max(min(longest, total * vp.temporal_patch_size // t), int(shortest * 1.05))
    h, w = smart_resize(height, width, factor, shortest, longest) if vp.do_resize else (height, width)
    x = _resized_normalised(videos.reshape(b * t, c, height, width), h, w, vp).view(b, t, c, h, w)
    return _patches(x, vp.patch_size, vp.merge_size, vp.temporal_patch_size)


def supports_tensor_videos(processor) -> bool:
    """Whether ``qwen2vl_video_values`` reproduces this processor's videos (the Qwen2-VL family's)."""
    from transformers import Qwen2VLVideoProcessor

    return isinstance(getattr(processor, "video_processor", None), Qwen2VLVideoProcessor)


def _padded(rows: list[list[int]], length: int, value: int, left: bool) -> torch.Tensor:
    """``(len(rows), length)`` long tensor of the rows padded with ``value`` on the left or the right."""
    return torch.tensor([[value] * (length - len(r)) + r if left else r + [value] * (length - len(r)) for r in rows])


class VLMJudge(Reward):
    """Base of VLM-judge rewards: ``answer_logprobs`` scores many (image, question, answer) rows at once.

    Args:
        model: hub id or folder (``AutoModelForImageTextToText``), or a model object (then ``processor`` too).
        processor: hub id, folder or processor object; None loads it from ``model``.
        answer_prefix: text between the generation prompt and the answer (e.g. ``"<answer>"``).
        differentiable: keep the graph so gradients reach the pixels (Qwen2-VL family only).
        max_batch: rows per forward pass.
        dtype, device, trust_remote_code: how the model is loaded (remote code only when asked).
    """

    name = "vlm_judge"

    def __init__(self, model: str | nn.Module, processor=None, answer_prefix: str = "", differentiable: bool = False,
                 max_batch: int = 32, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                 trust_remote_code: bool = False) -> None:
        super().__init__()
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch: expected a positive int, got {max_batch!r}")
        if not isinstance(answer_prefix, str):
            raise TypeError(f"answer_prefix: expected a string, got {type(answer_prefix).__name__}")
        self.model, self.processor = load_judge_model(model, processor, dtype, device, trust_remote_code)
        self.tensor_pixels = supports_tensor_pixels(self.processor)
        if differentiable and not self.tensor_pixels:
            raise ValueError(f"differentiable: pixel gradients need a Qwen2-VL-family image processor "
                             f"(Qwen2VLImageProcessor), got {type(self.processor.image_processor).__name__}")
        self.differentiable = bool(differentiable)
        self.answer_prefix, self.max_batch = answer_prefix, max_batch
        self.freeze()

    def media(self, batch: MediaBatch) -> torch.Tensor:
        """``(B, 3, H, W)`` images or ``(B, T, 3, H, W)`` videos of the batch (grey repeated to RGB); videos only
        for the Qwen2-VL family (``Qwen2VLVideoProcessor``), else a named error."""
        if batch.is_video and not supports_tensor_videos(self.processor):
            raise ValueError(f"batch.pixels: {self.name} judges videos (B, T, C, H, W) only with a Qwen2-VL-family "
                             f"video processor (Qwen2VLVideoProcessor), got a video batch {tuple(batch.pixels.shape)} "
                             f"and {type(getattr(self.processor, 'video_processor', None)).__name__}")
        return batch.pixels.expand(*batch.pixels.shape[:-3], 3, -1, -1)

    def context(self, question: str, video: bool = False) -> str:
        part = {"type": "video" if video else "image"}
        messages = [{"role": "user", "content": [part, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True) + self.answer_prefix

    def answer_logprobs(self, pixels: torch.Tensor, questions: Sequence[str], answers: Sequence[str]) -> list[torch.Tensor]:
        """Per row ``i``, the ``(n_i,)`` float32 log-probabilities of ``answers[i]``'s tokens given image
        ``pixels[i]`` (``(N, 3, H, W)``; or video, ``(N, T, 3, H, W)``) and ``questions[i]``, teacher-forced;
        rows run ``max_batch`` at a time."""
        if not len(pixels) == len(questions) == len(answers):
            raise ValueError(f"questions, answers: expected one per image ({len(pixels)}), got {len(questions)}, "
                             f"{len(answers)}")
        targets = self.processor.tokenizer(list(answers), add_special_tokens=False)["input_ids"] if answers else []
        for answer, ids in zip(answers, targets):
            if not ids:
                raise ValueError(f"answer: expected text with at least one token, got {answer!r}")
        video = pixels.ndim == 5
        contexts = {q: self.context(q, video) for q in dict.fromkeys(questions)}  # a question's prompt once a call
        out: list[torch.Tensor] = []
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            for s in range(0, len(pixels), self.max_batch):
                e = s + self.max_batch
                out += self._forward(pixels[s:e], [contexts[q] for q in questions[s:e]], targets[s:e])
        return out

    def encode(self, pixels: torch.Tensor, contexts: list[str], targets: list[list[int]]) -> tuple[dict, list[int]]:
        """The model's inputs of the rows ``context + answer tokens``, padded on the tokenizer's side, and each
        row's first answer position. The Qwen2-VL family's text is tokenized here, the image (video) token
        expanded by the processor's own rule, beside the torch pixels; other models go through the processor."""
        video = pixels.ndim == 5
        if video or self.tensor_pixels:
            tensor = pixels.to(self.model.device, self.model.dtype)
            values, grid = (qwen2vl_video_values(tensor, self.processor.video_processor) if video
                            else qwen2vl_pixel_values(tensor, self.processor.image_processor))
            kind = "video" if video else "image"
            replace = getattr(self.processor, f"replace_{kind}_token")
            expanded = [replace({f"{kind}_grid_thw": grid}, i) for i in range(len(grid))]
            texts, _ = self.processor.get_text_with_replacements(list(contexts), **{f"{kind}s_replacements": expanded})
            distinct = {t: i for i, t in enumerate(dict.fromkeys(texts))}  # same question, same-sized image
            ids = self.processor.tokenizer(list(distinct))["input_ids"]
            tokens = {"input_ids": ids}
            if getattr(self.processor, "return_mm_token_type_ids", False):
                tokens["mm_token_type_ids"] = self.processor.create_mm_token_type_ids(ids)
            rows = {k: [v[distinct[t]] for t in texts] for k, v in tokens.items()}
            media = {"pixel_values_videos" if video else "pixel_values": values, f"{kind}_grid_thw": grid}
        else:
            uint8 = list((pixels.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
            media = dict(self.processor(text=contexts, images=uint8, padding=True, return_tensors="pt"))
            mask = media.pop("attention_mask").bool()
            per_token = [k for k, v in media.items() if isinstance(v, torch.Tensor) and v.shape == mask.shape]
            rows = {k: [row[keep].tolist() for row, keep in zip(media.pop(k), mask)] for k in per_token}
        starts = [len(r) for r in rows["input_ids"]]
        rows = {k: [r + (t if k == "input_ids" else [0] * len(t)) for r, t in zip(v, targets)] for k, v in rows.items()}
        rows["attention_mask"] = [[1] * len(r) for r in rows["input_ids"]]
        lengths = [len(r) for r in rows["input_ids"]]
        length, left = max(lengths), self.processor.tokenizer.padding_side == "left"
        pads = {"input_ids": self.processor.tokenizer.pad_token_id}
        inputs = {k: _padded(v, length, pads.get(k, 0), left) for k, v in rows.items()}
        starts = [s + (length - n if left else 0) for s, n in zip(starts, lengths)]
        return inputs | media, starts

    def _forward(self, pixels: torch.Tensor, contexts: list[str], targets: list[list[int]]) -> list[torch.Tensor]:
        device = self.model.device
        inputs, starts = self.encode(pixels, contexts, targets)
        length = inputs["input_ids"].shape[1]
        keep = length - min(starts) + 1  # logits from the position before the earliest answer token on
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        logits = self.model(**inputs, logits_to_keep=keep).logits
        sizes = [len(t) for t in targets]
        row = torch.repeat_interleave(torch.arange(len(targets), device=device), torch.tensor(sizes, device=device))
        at = torch.cat([torch.arange(s - 1, s - 1 + n) for s, n in zip(starts, sizes)]).to(device) - (length - keep)
        logp = logits[row, at].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        picked = logp.gather(-1, torch.tensor([i for t in targets for i in t], device=device)[:, None])[:, 0]
        return list(picked.split(sizes))
