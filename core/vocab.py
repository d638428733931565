"""Word tokenization and the book's `Vocab` (d2l r0.17 semantics: `<unk>` is index 0)."""
from __future__ import annotations

import collections
import json
import os
from typing import Iterable, Sequence

from .io import atomic_write, read_json

# The book's special tokens, after `<unk>` (index 0) in every vocabulary it builds (SNLI, WikiText).
RESERVED_TOKENS = ["<pad>", "<mask>", "<cls>", "<sep>"]


def tokenize(lines: Sequence[str], token: str = "word") -> list[list[str]]:
    """Split each line into word tokens (`str.split`) or characters, as the book does."""
    if token == "word":
        return [line.split() for line in lines]
    if token == "char":
        return [list(line) for line in lines]
    raise ValueError(f"unknown token type {token!r}: use 'word' or 'char'")


def count_corpus(tokens: Iterable) -> collections.Counter:
    """Count tokens in a 1-D or 2-D token list."""
    tokens = list(tokens)
    if tokens and isinstance(tokens[0], list):
        tokens = [t for line in tokens for t in line]
    return collections.Counter(tokens)


class Vocab:
    """Token <-> index map. `<unk>` first, then reserved tokens, then tokens by descending
    frequency (first seen wins ties) down to `min_freq`. d2l master sorts alphabetically
    instead; the NLI chapter replaces the order with the checkpoint's `vocab.json` anyway.

    `unk_token` and `special_tokens` name the tokens that packing and pretraining look up, so a
    subclass with other spellings (`WordPieceVocab`: `[UNK]`, `[CLS]`...) packs the same way."""

    unk_token = "<unk>"
    special_tokens = {"cls": "<cls>", "sep": "<sep>", "pad": "<pad>", "mask": "<mask>"}

    def __init__(self, tokens: Iterable | None = None, min_freq: int = 0,
                 reserved_tokens: Sequence[str] | None = None) -> None:
        counter = count_corpus(tokens or [])
        self._token_freqs = sorted(counter.items(), key=lambda x: x[1], reverse=True)
        self.idx_to_token = [self.unk_token] + list(reserved_tokens or [])
        self.token_to_idx = {t: i for i, t in enumerate(self.idx_to_token)}
        for token, freq in self._token_freqs:
            if freq < min_freq:
                break
            if token not in self.token_to_idx:
                self.token_to_idx[token] = len(self.idx_to_token)
                self.idx_to_token.append(token)

    @classmethod
    def from_idx_to_token(cls, idx_to_token: Sequence[str], source: str = "vocabulary") -> "Vocab":
        """A vocabulary with exactly this order (the checkpoint's `vocab.json`)."""
        vocab = cls()
        vocab._set_idx_to_token(idx_to_token, source)
        return vocab

    def _set_idx_to_token(self, idx_to_token: Sequence[str], source: str) -> None:
        """Take this exact index -> token list: strings only, no duplicates, the unk token present."""
        self.idx_to_token = list(idx_to_token)
        self.token_to_idx = {}
        for i, t in enumerate(self.idx_to_token):
            if not isinstance(t, str):
                raise ValueError(f"{source}: entry {i} is {t!r}, not a string")
            if t in self.token_to_idx:
                raise ValueError(f"{source}: token {t!r} appears at {self.token_to_idx[t]} and {i}")
            self.token_to_idx[t] = i
        if self.unk_token not in self.token_to_idx:
            raise ValueError(f"{source}: has no {self.unk_token!r} token")

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        if not isinstance(tokens, (list, tuple)):
            return self.token_to_idx.get(tokens, self.unk)
        return [self.__getitem__(t) for t in tokens]

    def to_tokens(self, indices):
        if hasattr(indices, "__len__") and not isinstance(indices, str):
            return [self.idx_to_token[int(i)] for i in indices]
        return self.idx_to_token[int(indices)]

    @property
    def unk(self) -> int:
        return self.token_to_idx[self.unk_token]

    @property
    def token_freqs(self) -> list[tuple[str, int]]:
        return self._token_freqs


def read_vocab_list(path: str | os.PathLike) -> list:
    """The index -> token list of a `vocab.json`; an error naming the file if it is not a JSON list."""
    return read_json(path, list)


def load_vocab(path: str | os.PathLike) -> Vocab:
    """Read a `vocab.json` (a JSON list: index -> token), as in the book's checkpoints."""
    return Vocab.from_idx_to_token(read_vocab_list(path), source=os.fspath(path))


def save_vocab(vocab: Vocab, path: str | os.PathLike) -> None:
    with atomic_write(path, "w") as f:
        json.dump(vocab.idx_to_token, f, ensure_ascii=False)
