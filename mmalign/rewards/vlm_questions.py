"""VLM-judge rewards on the judge base (``vlm_judge.py``): questions about each image, teacher-forced.

- ``vlm_question``: P(answer) of a question template filled from the prompt and metadata; the generic one.
- ``vqascore``: ``P("Yes" | image, 'Does this figure show "{prompt}"? Please answer yes or no.')`` (Lin et al.).
- ``vlm_artifact``: ``1 − σ(log p_yes − log p_no)`` of "does the image show unintended digital artifacts?"
  (Hong et al.).
- ``vlm_checklist``: several yes/no questions per sample (``metadata["questions"]`` or a question generator),
  mean P(yes).
- ``prompt_echo``: mean (or sum) log-probability of the prompt's tokens given the image and a fixed query.

A multi-token answer's probability is the geometric mean of its token probabilities; with a ``contrast``
answer it is ``σ(log p(answer) − log p(contrast))``, both sums over their tokens. Every question of a batch,
of every sample, runs in the same teacher-forced forward passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from mmalign.config import import_object
from mmalign.media import MediaBatch
from mmalign.rewards.base import RewardOutput
from mmalign.rewards.vlm_judge import VLMJudge

__all__ = ["ArtifactJudge", "Checklist", "PromptEcho", "QuestionReward", "VQAScore", "DEFAULT_JUDGE"]

#: The hub id the judges load by default.
DEFAULT_JUDGE = "Qwen/Qwen2-VL-2B-Instruct"
#: The checklist's default question generator: the world's scene → questions (used for samples without
#: ``metadata["questions"]``; reached by import path, so nothing here imports the world).
WORLD_QUESTIONS = "mmalign.world.questions:checklist_questions"


def fill(template: str, name: str, prompt: str, metadata: Mapping[str, Any]) -> str:
    """``template`` with ``{prompt}`` and ``{key}`` of the sample's metadata filled in."""
    try:
        return template.format_map({**metadata, "prompt": prompt})
    except (KeyError, IndexError) as err:
        raise ValueError(f"{name}: {template!r} names {err} but the sample has only prompt and metadata keys "
                         f"{sorted(metadata)}") from None


class QuestionReward(VLMJudge):
    """P(``answer``) of the question ``template`` about each image, teacher-forced.

    ``template`` and ``answer`` are format strings over ``{prompt}`` and the sample's metadata keys (e.g.
    ``answer: "{answer}"`` takes each sample's gold answer); ``contrast`` (e.g. ``"No"``) turns the score into
    ``σ(log p(answer) − log p(contrast))``. The other options are the judge base's.
    """

    name = "vlm_question"
    DEFAULT_TEMPLATE: ClassVar[str | None] = None
    DEFAULT_CONTRAST: ClassVar[str | None] = None
    #: score ``1 − p`` instead of ``p`` (the question asks for a fault)
    INVERT: ClassVar[bool] = False

    def __init__(self, template: str | None = None, answer: str = "Yes", contrast: str | None = None,
                 model: str | nn.Module = DEFAULT_JUDGE, processor=None, answer_prefix: str = "",
                 differentiable: bool = False, max_batch: int = 32, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu", trust_remote_code: bool = False) -> None:
        template = self.DEFAULT_TEMPLATE if template is None else template
        contrast = self.DEFAULT_CONTRAST if contrast is None else contrast
        checked = {"template": template, "answer": answer} | ({} if contrast is None else {"contrast": contrast})
        for key, value in checked.items():
            if not (isinstance(value, str) and value.strip()):
                raise ValueError(f"{key}: expected a non-empty string, got {value!r}")
        super().__init__(model, processor, answer_prefix, differentiable, max_batch, dtype, device, trust_remote_code)
        self.template, self.answer, self.contrast = template, answer, contrast

    def questions(self, batch: MediaBatch) -> list[list[str]]:
        """The questions asked about each sample: here one, the filled template."""
        return [[fill(self.template, "template", p, m)] for p, m in zip(batch.prompts, batch.metadata)]

    def forward(self, batch: MediaBatch) -> RewardOutput:
        pixels = self.media(batch)
        asked = self.questions(batch)
        owner = torch.tensor([i for i, qs in enumerate(asked) for _ in qs], dtype=torch.long)
        questions = [q for qs in asked for q in qs]
        answers = [fill(self.answer, "answer", batch.prompts[i], batch.metadata[i]) for i in owner.tolist()]
        rows = pixels[owner.to(pixels.device)]
        if self.contrast is None:
            p = torch.stack([lp.mean() for lp in self.answer_logprobs(rows, questions, answers)]).exp()
        else:
            n = len(questions)
            logp = self.answer_logprobs(torch.cat([rows, rows]), questions * 2, answers + [self.contrast] * n)
            sums = torch.stack([lp.sum() for lp in logp])
            p = torch.sigmoid(sums[:n] - sums[n:])
        counts = torch.bincount(owner, minlength=len(batch)).to(p.device)
        mean = p.new_zeros(len(batch)).index_add(0, owner.to(p.device), p) / counts
        scores = 1 - mean if self.INVERT else mean
        return RewardOutput(scores.float(), {"p": mean.detach().float(), "questions": counts.float()},
                            info={"questions": len(questions)})


class VQAScore(QuestionReward):
    """VQAScore: P("Yes" | image, 'Does this figure show "{prompt}"? Please answer yes or no.'), teacher-forced;
    a multi-token answer's probability is the geometric mean of its tokens'."""

    name = "vqascore"
    DEFAULT_TEMPLATE = 'Does this figure show "{prompt}"? Please answer yes or no.'


class ArtifactJudge(QuestionReward):
    """Artifact judge (Hong et al.): ``1 − σ(log p_yes − log p_no)`` of whether the image shows unintended
    digital artifacts; higher is cleaner."""

    name = "vlm_artifact"
    DEFAULT_TEMPLATE = ("Does this image show any unintended digital artifacts, such as distortions, noise, "
                        "blotches or broken textures? Please answer yes or no.")
    DEFAULT_CONTRAST = "No"
    INVERT = True


class Checklist(QuestionReward):
    """Binary checklist: mean P(``answer``) over several yes/no questions per sample, from
    ``metadata["questions"]`` (a list of strings) or, for samples without them, ``generator``: an import
    path ``"module:function"`` of ``function(prompt, metadata) -> list[str]`` (default: the world's
    questions about ``metadata["scene"]``)."""

    name = "vlm_checklist"

    def __init__(self, generator: str | None = WORLD_QUESTIONS, answer: str = "Yes", contrast: str | None = None,
                 model: str | nn.Module = DEFAULT_JUDGE, processor=None, answer_prefix: str = "",
                 differentiable: bool = False, max_batch: int = 32, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu", trust_remote_code: bool = False) -> None:
        if generator is not None and not (isinstance(generator, str) and ":" in generator):
            raise ValueError(f"generator: expected an import path 'package.module:function' or None, got {generator!r}")
        super().__init__("{question}", answer, contrast, model, processor, answer_prefix, differentiable,
                         max_batch, dtype, device, trust_remote_code)
        self.generator = generator

    def questions(self, batch: MediaBatch) -> list[list[str]]:
        out = []
        for i, (prompt, meta) in enumerate(zip(batch.prompts, batch.metadata)):
            if "questions" in meta:
                questions, source = meta["questions"], f"metadata[{i}]['questions']"
            elif self.generator is None:
                raise ValueError(f"metadata[{i}]['questions']: expected the sample's questions (no generator is "
                                 f"set), got metadata keys {sorted(meta)}")
            else:
                questions, source = import_object(self.generator)(prompt, meta), f"generator {self.generator!r}"
            if (isinstance(questions, str) or not isinstance(questions, (list, tuple)) or not questions
                    or not all(isinstance(q, str) and q.strip() for q in questions)):
                raise ValueError(f"{source}: expected a non-empty list of question strings for sample {i}, got "
                                 f"{questions!r}")
            out.append(list(questions))
        return out


class PromptEcho(VLMJudge):
    """PromptEcho: the mean (``reduction: sum``: total) log-probability of the prompt's tokens given the
    image and ``query``, teacher-forced under the frozen VLM."""

    name = "prompt_echo"

    def __init__(self, query: str = "Describe the image.", reduction: str = "mean",
                 model: str | nn.Module = DEFAULT_JUDGE, processor=None, answer_prefix: str = "",
                 differentiable: bool = False, max_batch: int = 32, dtype: str | torch.dtype = "float32",
                 device: str | torch.device = "cpu", trust_remote_code: bool = False) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
        if not (isinstance(query, str) and query.strip()):
            raise ValueError(f"query: expected a non-empty string, got {query!r}")
        super().__init__(model, processor, answer_prefix, differentiable, max_batch, dtype, device, trust_remote_code)
        self.query, self.reduction = query, reduction

    def forward(self, batch: MediaBatch) -> RewardOutput:
        logp = self.answer_logprobs(self.media(batch), [self.query] * len(batch), batch.prompts)
        scores = torch.stack([lp.mean() if self.reduction == "mean" else lp.sum() for lp in logp])
        tokens = torch.tensor([float(len(lp)) for lp in logp], device=scores.device)
        return RewardOutput(scores, {"tokens": tokens})
