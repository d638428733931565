"""A disk cache of packed datasets, so the fast path packs a dataset once per vocabulary and
max_len and reloads the arrays after: an SNLI `.txt` file (`load_packed_snli`, keyed by the file's
content, so a hit never reads the file) or any task's examples (`load_packed_examples`, keyed by the
texts and labels themselves, read by the task's own reader first).

An entry is written atomically (a reader never sees half a file) and holds only each row's valid
positions, its key and a sha1 of its arrays; both are checked on load, and any entry that cannot be
read, or reads as something else, is rebuilt with one line saying so.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Sequence

import numpy as np

from .io import atomic_write
from .packing import TRUNCATION_RULES, SNLIBERTDataset, check_max_len, special_id
from .snli import read_snli_file
from .vocab import Vocab
from .wordpiece import WordPieceVocab

PACK_CACHE_VERSION = 1  # bump when the packed layout or the packing rules change


def tokenizer_settings(vocab: Vocab) -> dict:
    """How the vocabulary turns text into tokens: a `WordPieceVocab`'s `settings()`, else the
    book's lower-case and whitespace split."""
    return vocab.settings() if isinstance(vocab, WordPieceVocab) else {"kind": "word"}


def vocab_digest(vocab: Vocab) -> str:
    """SHA-1 of the vocabulary's content (its index -> token list), so a changed vocabulary misses."""
    return hashlib.sha1(json.dumps(vocab.idx_to_token, ensure_ascii=False).encode("utf-8")).hexdigest()


def _with_digest(source: dict, vocab: Vocab, max_len: int, truncation: str) -> dict:
    """`source` (what identifies the data) plus the packing settings, and `digest`: the SHA-1 of all
    of them, which names the cache entry."""
    check_max_len(max_len)
    if truncation not in TRUNCATION_RULES:
        raise ValueError(f"unknown truncation rule {truncation!r}: use one of {TRUNCATION_RULES}")
    fields = {"version": PACK_CACHE_VERSION, **source, "vocab_sha1": vocab_digest(vocab), "vocab_size": len(vocab),
              "tokenizer": tokenizer_settings(vocab), "max_len": int(max_len), "truncation": truncation}
    fields["digest"] = hashlib.sha1(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()
    return fields


def packed_cache_key(source_file: str | os.PathLike, vocab: Vocab, max_len: int, truncation: str = "book",
                     source_sha1: str | None = None) -> dict:
    """Everything that determines the packed arrays of an SNLI file: the file's content (SHA-1) and
    size, the vocabulary's content and tokenizer settings (word-level or WordPiece, cased or not),
    `max_len`, the truncation rule and the cache format version.
    `digest` is the SHA-1 of all of them, which names the cache entry."""
    from .data_hub import sha1_of  # lazily: the data hub pulls in the network modules
    source_file = os.fspath(source_file)
    source = {"source_sha1": source_sha1 or sha1_of(source_file), "source_size": os.path.getsize(source_file)}
    return _with_digest(source, vocab, max_len, truncation)


def examples_digest(examples: Sequence[Sequence]) -> str:
    """SHA-1 of a dataset's columns (texts and labels), each as JSON, so any changed text or label misses."""
    h = hashlib.sha1()
    for column in examples:
        h.update(json.dumps(list(column), ensure_ascii=False).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def examples_cache_key(examples: Sequence[Sequence], vocab: Vocab, max_len: int, truncation: str = "book") -> dict:
    """`packed_cache_key` for examples held in memory, `(texts, labels)` or `(a, b, labels)`: their
    content instead of a file's."""
    source = {"examples_sha1": examples_digest(examples), "num_examples": len(examples[-1]),
              "num_texts": len(examples) - 1}
    return _with_digest(source, vocab, max_len, truncation)


def default_cache_dir() -> str:
    """`$NLIBERT_CACHE`, else `~/.cache/nlibert/packed`. (Not under `$NLIBERT_DATA`, which may be a
    shared, read-only data folder.)"""
    return os.environ.get("NLIBERT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nlibert", "packed")


def _compact(token_ids: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray) -> dict:
    """The valid region of each row only (a tenth of the padded size for SNLI): row-major ids and
    segments of all positions below each row's valid length."""
    mask = np.arange(token_ids.shape[1]) < valid_lens[:, None]
    return {"ids": token_ids[mask], "segments": segments[mask].astype(np.int8), "valid_lens": valid_lens}


_PAYLOAD = ("ids", "segments", "valid_lens", "labels")


def _payload_sha1(arrays: dict) -> str:
    """A checksum over the entry's arrays (dtype, shape and bytes), so flipped bytes that still
    decompress are caught too."""
    h = hashlib.sha1()
    for name in _PAYLOAD:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _expand(ids: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray, max_len: int,
            pad: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.arange(max_len) < valid_lens[:, None]
    token_ids = np.full((len(valid_lens), max_len), pad, dtype=np.int32)
    token_ids[mask] = ids
    padded_segments = np.zeros((len(valid_lens), max_len), dtype=np.int32)
    padded_segments[mask] = segments
    return token_ids, padded_segments


def _cached(path: str, key: dict, vocab: Vocab, max_len: int, truncation: str,
            build: Callable[[], SNLIBERTDataset], verbose: bool) -> SNLIBERTDataset:
    """The dataset of the entry at `path` if it holds `key` and its checksum, else `build()`'s,
    written there. `dataset.cache_hit` says which way it went and `dataset.cache_path` where it lives."""
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                if json.loads(str(f["key"])) != key:
                    raise ValueError("it was built with other settings")
                arrays = {name: f[name] for name in _PAYLOAD}
                if str(f["sha1"]) != _payload_sha1(arrays):
                    raise ValueError("its contents do not match their checksum")
            token_ids, segments = _expand(arrays["ids"], arrays["segments"], arrays["valid_lens"], max_len,
                                          special_id(vocab, "pad"))
            dataset = SNLIBERTDataset.from_arrays(token_ids, segments, arrays["valid_lens"], arrays["labels"],
                                                  vocab, max_len, truncation)
            dataset.cache_hit, dataset.cache_path = True, path
            if verbose:
                print(f"read {len(dataset)} packed examples from {path}")
            return dataset
        # Anything a damaged file can raise (zipfile.BadZipFile, zlib.error, a short read, a shape
        # that does not fit) means the same thing: the entry is not what was written. Rebuild it.
        except Exception as e:
            print(f"rebuilding the packed cache entry {path}: it cannot be used ({type(e).__name__}: {e})")
    dataset = build()
    arrays = {"labels": dataset.labels, **_compact(dataset.all_token_ids, dataset.all_segments, dataset.valid_lens)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.savez(f, key=np.array(json.dumps(key)), sha1=np.array(_payload_sha1(arrays)), **arrays)
    dataset.cache_hit, dataset.cache_path = False, path
    if verbose:
        print(f"packed {len(dataset)} examples into {path}")
    return dataset


def load_packed_snli(source_file: str | os.PathLike, vocab: Vocab, max_len: int, truncation: str = "book",
                     cache_dir: str | os.PathLike | None = None, verbose: bool = False) -> SNLIBERTDataset:
    """The `SNLIBERTDataset` of an SNLI `.txt` file (every labelled row, in file order), from the disk
    cache when an entry with the same key (`packed_cache_key`) exists, else read, packed and cached.
    `cache_dir` None means `default_cache_dir()`."""
    source_file = os.fspath(source_file)
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    key = packed_cache_key(source_file, vocab, max_len, truncation)
    stem = os.path.splitext(os.path.basename(source_file))[0]
    path = os.path.join(cache_dir, f"{stem}.{key['digest'][:20]}.npz")

    def build() -> SNLIBERTDataset:
        return SNLIBERTDataset(read_snli_file(source_file, verbose=verbose), max_len, vocab, truncation)
    return _cached(path, key, vocab, max_len, truncation, build, verbose)


def load_packed_examples(examples: Sequence[Sequence], name: str, vocab: Vocab, max_len: int,
                         truncation: str = "book", cache_dir: str | os.PathLike | None = None,
                         verbose: bool = False) -> SNLIBERTDataset:
    """The `SNLIBERTDataset` of examples in memory (`(texts, labels)` or `(a, b, labels)`, in order),
    from the disk cache when their entry (`examples_cache_key`) exists, else packed and cached as
    `name.<digest>.npz`. `cache_dir` None means `default_cache_dir()`."""
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    key = examples_cache_key(examples, vocab, max_len, truncation)
    path = os.path.join(cache_dir, f"{name}.{key['digest'][:20]}.npz")
    return _cached(path, key, vocab, max_len, truncation,
                   lambda: SNLIBERTDataset(examples, max_len, vocab, truncation), verbose)
