"""WordPiece tokenization for real pretrained BERT checkpoints (Hugging Face folders), in core.

`WordPieceVocab` is a `Vocab` over a checkpoint's `vocab.txt` that also owns a `tokenizers`
WordPiece tokenizer set up as BERT's: clean the text, split CJK characters, lower-case and strip
accents as the checkpoint says, split on whitespace and punctuation, then greedy longest-match
WordPiece with `##` continuations and `[UNK]` for words it cannot spell. Its ids equal those of
transformers' `AutoTokenizer` for the same folder (tests/test_wordpiece.py checks all SNLI dev
sentences). As there, a special token written in the text (`[SEP]`) is that token.

Packing (`core.packing`) asks the vocabulary for `special_tokens` and, for a `WordPieceVocab`,
calls `encode_side`, so `pack_pairs`, `SNLIBERTDataset` and `load_packed_snli` work unchanged.

What must be saved with a model to rebuild the same tokenizer is `vocab.idx_to_token` (`vocab.json`)
and `vocab.settings()` (a dict for the model's config.json); `WordPieceVocab.from_settings` reads
them back.
"""
from __future__ import annotations

import itertools
import os
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from .io import read_json
from .vocab import Vocab

KIND = "wordpiece"
# The names special tokens go by in special_tokens_map.json and tokenizer_config.json.
_SPECIAL_KEYS = {"cls": "cls_token", "sep": "sep_token", "pad": "pad_token", "mask": "mask_token"}
_SETTINGS_KEYS = ("kind", "lowercase", "strip_accents", "tokenize_chinese_chars", "unk_token", "special_tokens")
_MAX_INPUT_CHARS_PER_WORD = 100  # BERT's: a longer word is one [UNK]


class WordPieceVocab(Vocab):
    """A checkpoint's WordPiece vocabulary (index = position in `idx_to_token`) and its tokenizer.

    `lowercase` lower-cases before WordPiece (uncased checkpoints); `strip_accents` None means
    "strip when lower-casing", BERT's rule; `tokenize_chinese_chars` puts spaces around CJK
    characters. `unk_token` and `special_tokens` (keys cls, sep, pad, mask) default to BERT's
    `[UNK]`, `[CLS]`, `[SEP]`, `[PAD]`, `[MASK]`; all must be in the vocabulary."""

    unk_token = "[UNK]"
    special_tokens = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]"}

    def __init__(self, idx_to_token: Sequence[str], lowercase: bool = True, strip_accents: bool | None = None,
                 tokenize_chinese_chars: bool = True, unk_token: str | None = None,
                 special_tokens: dict[str, str] | None = None, source: str = "vocabulary") -> None:
        unknown = sorted(set(special_tokens or {}) - set(type(self).special_tokens))
        if unknown:
            raise ValueError(f"{source}: unknown special token name {unknown[0]!r}: "
                             f"use {sorted(type(self).special_tokens)}")
        self.lowercase = bool(lowercase)
        self.strip_accents = None if strip_accents is None else bool(strip_accents)
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.unk_token = unk_token or type(self).unk_token
        self.special_tokens = {**type(self).special_tokens, **(special_tokens or {})}
        self._token_freqs = []
        self._set_idx_to_token(idx_to_token, source)
        for name, token in self.special_tokens.items():
            if token not in self.token_to_idx:
                raise ValueError(f"{source}: has no {token!r} token (the {name} token)")
        self._tokenizer = self._build_tokenizer()

    def _build_tokenizer(self) -> Tokenizer:
        tokenizer = Tokenizer(models.WordPiece(self.token_to_idx, unk_token=self.unk_token,
                                               continuing_subword_prefix="##",
                                               max_input_chars_per_word=_MAX_INPUT_CHARS_PER_WORD))
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=self.tokenize_chinese_chars,
            strip_accents=self.strip_accents, lowercase=self.lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        # Registered as special (matched in the raw text, never split or lower-cased), as transformers does.
        tokenizer.add_special_tokens([self.unk_token, *self.special_tokens.values()])
        return tokenizer

    @classmethod
    def from_idx_to_token(cls, idx_to_token: Sequence[str], source: str = "vocabulary") -> "WordPieceVocab":
        """This exact token order with the default settings (uncased BERT)."""
        return cls(idx_to_token, source=source)

    @classmethod
    def from_settings(cls, idx_to_token: Sequence[str], settings: dict,
                      source: str = "tokenizer settings") -> "WordPieceVocab":
        """Rebuild the tokenizer a model was saved with: its token list and its `settings()` dict."""
        if settings.get("kind") != KIND:
            raise ValueError(f"{source}: 'kind' is {settings.get('kind')!r}, expected {KIND!r}")
        for key in settings:
            if key not in _SETTINGS_KEYS:
                raise ValueError(f"{source}: unknown key {key!r} (known: {', '.join(_SETTINGS_KEYS)})")
        kwargs = {k: v for k, v in settings.items() if k != "kind"}
        return cls(idx_to_token, source=source, **kwargs)

    def settings(self) -> dict:
        """What must be saved with a model (beside the token list) to rebuild this tokenizer."""
        return {"kind": KIND, "lowercase": self.lowercase, "strip_accents": self.strip_accents,
                "tokenize_chinese_chars": self.tokenize_chinese_chars, "unk_token": self.unk_token,
                "special_tokens": dict(self.special_tokens)}

    def tokenize(self, sentence: str) -> list[str]:
        """The WordPiece strings of one sentence, without special tokens around it."""
        return self._tokenizer.encode(sentence, add_special_tokens=False).tokens

    def encode_side(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each sentence's WordPiece count (int64) and the flat ids of all of them in order (int32).
        One batch call into the Rust tokenizer (in parallel; no offsets); no per-token Python."""
        id_lists = [e.ids for e in self._tokenizer.encode_batch_fast(list(sentences), add_special_tokens=False)]
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
        return lengths, ids


def read_vocab_txt(path: str | os.PathLike) -> list[str]:
    """The tokens of a BERT `vocab.txt`, one per line, index = line number - 1. A duplicate or empty
    token is an error naming the file and line (transformers would silently keep the later index)."""
    path = os.fspath(path)
    tokens: list[str] = []
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            token = line.rstrip("\n")  # as transformers reads it: other whitespace is part of the token
            if not token:
                raise ValueError(f"{path}, line {line_no}: empty token")
            if token in first_line:
                raise ValueError(f"{path}, line {line_no}: duplicate token {token!r} (first on line {first_line[token]})")
            first_line[token] = line_no
            tokens.append(token)
    return tokens


def _read_optional_json(path: str) -> dict:
    return read_json(path, dict) if os.path.exists(path) else {}


def _special_token(value, path: str, key: str) -> str:
    # special_tokens_map.json holds either "[CLS]" or an AddedToken dict {"content": "[CLS]", ...}.
    token = value.get("content") if isinstance(value, dict) else value
    if not isinstance(token, str) or not token:
        raise ValueError(f"{path}: {key!r} is {value!r}, not a token")
    return token


def _flag(config: dict, key: str, default: bool | None, path: str, allow_none: bool = False) -> bool | None:
    value = config.get(key, default)
    if not (isinstance(value, bool) or (allow_none and value is None)):
        raise ValueError(f"{path}: {key!r} is {value!r}, expected true or false" + (" or null" if allow_none else ""))
    return value


def load_wordpiece_vocab(folder: str | os.PathLike) -> WordPieceVocab:
    """The `WordPieceVocab` of a Hugging Face BERT folder: `vocab.txt`, plus when present
    `tokenizer_config.json` (`do_lower_case`, `strip_accents`, `tokenize_chinese_chars`, special
    token names) and `special_tokens_map.json` (special token names, which win).

    Without `do_lower_case` the folder counts as uncased (True), transformers' `BertTokenizer`
    default and the common case; a cased checkpoint says `"do_lower_case": false`."""
    folder = os.fspath(folder)
    vocab_path = os.path.join(folder, "vocab.txt")
    config_path = os.path.join(folder, "tokenizer_config.json")
    map_path = os.path.join(folder, "special_tokens_map.json")
    idx_to_token = read_vocab_txt(vocab_path)
    config = _read_optional_json(config_path)
    special_map = _read_optional_json(map_path)
    if config.get("do_basic_tokenize", True) is not True:
        raise ValueError(f"{config_path}: 'do_basic_tokenize' false is not supported (BERT's basic "
                         "tokenization is always applied)")
    names = {}
    for path, source in ((config_path, config), (map_path, special_map)):
        for name, key in {"unk": "unk_token", **_SPECIAL_KEYS}.items():
            if source.get(key) is not None:
                names[name] = _special_token(source[key], path, key)
    return WordPieceVocab(
        idx_to_token,
        lowercase=_flag(config, "do_lower_case", True, config_path),
        strip_accents=_flag(config, "strip_accents", None, config_path, allow_none=True),
        tokenize_chinese_chars=_flag(config, "tokenize_chinese_chars", True, config_path),
        unk_token=names.pop("unk", None), special_tokens=names, source=vocab_path)
