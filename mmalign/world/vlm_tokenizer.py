"""The world VLM's tokenizer: Qwen2's byte-level BPE with merges learned from the world's questions.

The stock Qwen2 vocabulary has 151,643 tokens, whose embeddings alone would exceed the shipped model's size
budget. Here the tokenizer class (``Qwen2Tokenizer``), its pre-tokenizer, byte-level alphabet, special tokens
and chat markup are Qwen2-VL's own; only the merges are learned from the world's questions and captions, so
every world word is one token and any other text still tokenizes, byte by byte. ``AutoTokenizer`` and the
Qwen2-VL processor load the saved files unchanged.
"""

from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

__all__ = [
    "ANSWER_TAGS",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "corpus",
]

#: Qwen2-VL's special tokens that the model and processor use, in Qwen's order, after the BPE vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Reasoning and answer tags: ordinary (not special) added tokens, so decoding keeps them but never splits them.
ANSWER_TAGS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

# ChatML as Qwen2-VL writes it, without the default system message (tokens are dear on a CPU): each image
# or video part becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to one pad
# per merged patch.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def corpus(questions_per_split: int = 300) -> list[str]:
    """Texts the merges are learned from: questions and answers of both splits, caption words, chat roles."""
    from mmalign.world.captions import vocabulary
    from mmalign.world.questions import question_set

    texts = ["system", "user", "assistant", " ".join(vocabulary())]
    for split in ("train", "heldout"):
        texts += [t for q in question_set(questions_per_split, split, seed=0) for t in (q.text, q.answer)]
    return texts


def _pre_tokenizer():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_tokenizer(texts: list[str] | None = None):
    """A ``Qwen2Tokenizer`` whose merges make each word of ``texts`` (default: ``corpus()``) one token.

    Ids: the 256 bytes, the merged words, then ``SPECIAL_TOKENS`` and ``ANSWER_TAGS``. End of turn
    (``<|im_end|>``) is the EOS token and ``<|endoftext|>`` pads, as in Qwen2-VL-Instruct; padding is on the
    left so that batched generation continues every row from its last prompt token.
    """
    from transformers import Qwen2Tokenizer

    texts = corpus() if texts is None else texts
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts: expected a list of strings, got {type(texts).__name__}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # never reached: merging stops once every pre-token is a single symbol
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab = dict(learned["vocab"])
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in learned["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        padding_side="left",
        model_max_length=512,
    )
    tokenizer.add_tokens(list(ANSWER_TAGS))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
