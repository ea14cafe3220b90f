"""CLIP tokenizer files whose vocabulary is the caption grammar's words.

The stock CLIP vocabulary has 49,408 tokens; its embedding table alone would exceed the size budget of the
shipped models. Here the byte-level BPE that ``CLIPTokenizer`` runs is kept, but its merges are learned from
the grammar's words only, so every grammar word becomes one token while any other text still tokenizes into
single bytes. The files are the standard ``vocab.json`` + ``merges.txt`` pair, so the ecosystem's own loaders
(``CLIPTokenizer.from_pretrained``, ``AutoTokenizer``, open_clip's ``HFTokenizer``) read them unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, pre_tokenizers

__all__ = ["BOS", "EOS", "END_OF_WORD", "learn_merges", "build_vocab", "save_tokenizer", "load_tokenizer"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"

Pair = tuple[str, str]


def _pieces(words: Iterable[str]) -> list[str]:
    """Split words the way CLIPTokenizer does before BPE (lowercase, letters/digits/punctuation, bytes)."""
    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    pieces: set[str] = set()
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"words: expected strings, got {type(word).__name__} ({word!r})")
        pieces.update(piece for piece, _ in split.pre_tokenize_str(" ".join(word.lower().split())))
    return sorted(pieces)


def learn_merges(words: Iterable[str]) -> list[Pair]:
    """BPE merges, most frequent pair first (ties by string order), until every piece is one symbol.

    Replaying these merges in rank order, as the BPE model does, rebuilds each piece as a single token.
    """
    symbols = {p: (*p[:-1], p[-1] + END_OF_WORD) for p in _pieces(words)}
    merges: list[Pair] = []
    while True:
        counts: Counter[Pair] = Counter()
        for seq in symbols.values():
            counts.update(zip(seq[:-1], seq[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        symbols = {p: _merge(seq, best) for p, seq in symbols.items()}


def _merge(seq: tuple[str, ...], pair: Pair) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[Pair]]:
    """Token ids in CLIP's layout: 256 bytes, 256 word-final bytes, merged tokens, then BOS and EOS last.

    EOS has the largest id, as in CLIP, so models that pool at ``argmax(ids)`` find it.
    """
    merges = learn_merges(words)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + END_OF_WORD for c in alphabet]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def save_tokenizer(folder: str | Path, words: Iterable[str], model_max_length: int) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` for a ``CLIPTokenizer``."""
    if model_max_length < 3:
        raise ValueError(f"model_max_length: expected at least 3 (BOS, a token, EOS), got {model_max_length}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def load_tokenizer(folder: str | Path):
    """The saved tokenizer through transformers' own loader (a ``CLIPTokenizer``)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))
