"""The judge base for Hugging Face VLMs: answer-token log-probabilities of many (image, question, answer)
rows in one teacher-forced batched forward pass.

Any model ``AutoProcessor`` + ``AutoModelForImageTextToText`` load works (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
LLaVA, Idefics3/SmolVLM): the question goes through the processor's chat template, the answer's tokens are
appended after the generation prompt, and the log-softmax of the logits before each answer token is
gathered. Rows are re-padded on the tokenizer's side, so left and right padding give the same numbers.

Models whose image processor is ``Qwen2VLImageProcessor`` (the Qwen2-VL family) are fed ``pixel_values``
computed in torch from the batch's float pixels (resize, normalise, patchify as the processor does), so
``differentiable=True`` gives gradients to the pixels; other models take the processor's own uint8 path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.config import check_device
from mmalign.media import MediaBatch
from mmalign.rewards.backbones import resolve_dtype
from mmalign.rewards.base import Reward

__all__ = ["VLMJudge", "load_judge_model", "qwen2vl_pixel_values", "supports_tensor_pixels"]


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


def qwen2vl_pixel_values(pixels: torch.Tensor, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, image_grid_thw)`` of float ``(B, 3, H, W)`` images in [0, 1], computed in torch as
    ``Qwen2VLImageProcessor`` computes them (smart resize, normalise, patches merged ``merge_size``²,
    repeated over ``temporal_patch_size``), so gradients reach ``pixels``."""
    from torchvision.transforms.functional import InterpolationMode, resize
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = image_processor
    patch, merge, frames = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    b, c, height, width = pixels.shape
    h, w = smart_resize(height, width, patch * merge, ip.size["shortest_edge"], ip.size["longest_edge"])
    if ip.do_resize and (h, w) != (height, width):
        modes = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}
        pixels = resize(pixels, [h, w], interpolation=modes[int(ip.resample)], antialias=True)
    else:
        h, w = height, width
    mean = torch.tensor(ip.image_mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(ip.image_std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    x = (pixels - mean) / std if ip.do_normalize else pixels
    gh, gw = h // patch, w // patch
    x = x.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, frames, -1, -1)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long)
    return x.reshape(b * gh * gw, c * frames * patch * patch), grid


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

    def images(self, batch: MediaBatch) -> torch.Tensor:
        """``(B, 3, H, W)`` pixels of an image batch; a video batch is an error (the judges are image-only)."""
        if batch.is_video:
            raise ValueError(f"batch.pixels: {self.name} judges images (B, C, H, W), got a video batch "
                             f"{tuple(batch.pixels.shape)}")
        return batch.pixels.expand(-1, 3, -1, -1)

    def context(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True) + self.answer_prefix

    def answer_logprobs(self, pixels: torch.Tensor, questions: Sequence[str], answers: Sequence[str]) -> list[torch.Tensor]:
        """Per row ``i``, the ``(n_i,)`` float32 log-probabilities of ``answers[i]``'s tokens given image
        ``pixels[i]`` and ``questions[i]``, teacher-forced; rows run ``max_batch`` at a time."""
        if not len(pixels) == len(questions) == len(answers):
            raise ValueError(f"questions, answers: expected one per image ({len(pixels)}), got {len(questions)}, "
                             f"{len(answers)}")
        targets = [self.processor.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
        for answer, ids in zip(answers, targets):
            if not ids:
                raise ValueError(f"answer: expected text with at least one token, got {answer!r}")
        out: list[torch.Tensor] = []
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            for s in range(0, len(pixels), self.max_batch):
                e = s + self.max_batch
                out += self._forward(pixels[s:e], [self.context(q) for q in questions[s:e]], targets[s:e])
        return out

    def _forward(self, pixels: torch.Tensor, contexts: list[str], targets: list[list[int]]) -> list[torch.Tensor]:
        device = self.model.device
        uint8 = list((pixels.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        inputs = dict(self.processor(text=contexts, images=uint8, padding=True, return_tensors="pt"))
        if self.tensor_pixels:
            values, grid = qwen2vl_pixel_values(pixels.to(device, self.model.dtype), self.processor.image_processor)
            if not torch.equal(grid, inputs["image_grid_thw"]):
                raise RuntimeError(f"image_grid_thw: torch preprocessing gave {grid.tolist()}, the processor "
                                   f"{inputs['image_grid_thw'].tolist()}")
            inputs["pixel_values"] = values
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        per_token = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.shape == ids.shape]
        pad = self.processor.tokenizer.pad_token_id
        rows = {k: [] for k in per_token}
        starts = []
        for b, target in enumerate(targets):
            keep = mask[b]
            starts.append(int(keep.sum()))
            extra = {"input_ids": torch.tensor(target), "attention_mask": torch.ones(len(target), dtype=torch.long)}
            for k in per_token:
                tail = extra.get(k, torch.zeros(len(target), dtype=inputs[k].dtype))
                rows[k].append(torch.cat([inputs[k][b][keep], tail.to(inputs[k].dtype)]))
        length = max(len(r) for r in rows["input_ids"])
        left = self.processor.tokenizer.padding_side == "left"
        for k in per_token:
            value = pad if k == "input_ids" else 0
            padded = [F.pad(r, (length - len(r), 0) if left else (0, length - len(r)), value=value) for r in rows[k]]
            inputs[k] = torch.stack(padded)
        shifts = [length - len(r) if left else 0 for r in rows["input_ids"]]
        starts = [start + shift for start, shift in zip(starts, shifts)]
        keep = length - min(starts) + 1  # logits from the position before the earliest answer token on
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        logits = self.model(**inputs, logits_to_keep=keep).logits
        offset = length - keep
        out = []
        for b, (start, target) in enumerate(zip(starts, targets)):
            at = torch.arange(start - 1, start - 1 + len(target), device=device) - offset
            logp = logits[b, at].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
            out.append(logp.gather(-1, torch.tensor(target, device=device)[:, None])[:, 0])
        return out

