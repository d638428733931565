"""Pack premise/hypothesis pairs into BERT inputs: `<cls> p <sep> h <sep>`, truncated and padded
(and single texts as `<cls> a <sep>`, `pack_singles`).

`pack_pairs` gives exactly what the book's per-example `SNLIBERTDataset._mp_worker` loop gives, but
computed on whole arrays: the sentences of a side are lower-cased and split in one pass over the
joined text (a premise repeated on consecutive rows, as SNLI lists them, only once), the tokens are
mapped to ids in one C-level dictionary map, the truncated lengths come from a closed form of the
book's pop loop, and the ids are scattered into the padded matrix with flat indexing. No process
pool, and no per-example Python. `core.packed_cache` caches the result on disk.

The special tokens come from the vocabulary (`vocab.special_tokens`: `<cls>`... for the book's
`Vocab`, `[CLS]`... for a checkpoint's `WordPieceVocab`). A `WordPieceVocab` tokenizes each side
with its own `encode_side` (WordPiece in Rust) instead of the lower-case-and-split path; the
truncation rules then apply to WordPiece counts the same way.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import operator
from typing import Iterator, Sequence

import numpy as np

from .vocab import RESERVED_TOKENS, Vocab
from .wordpiece import WordPieceVocab

TRUNCATION_RULES = ("book", "proportional")


def get_tokens_and_segments(tokens_a: list[str], tokens_b: list[str] | None = None) -> tuple[list[str], list[int]]:
    """`<cls> a <sep>` (+ `b <sep>`) and its segment ids: 0 for the first part, 1 for the second."""
    tokens = ["<cls>"] + list(tokens_a) + ["<sep>"]
    segments = [0] * (len(tokens_a) + 2)
    if tokens_b is not None:
        tokens += list(tokens_b) + ["<sep>"]
        segments += [1] * (len(tokens_b) + 1)
    return tokens, segments


def check_max_len(max_len: int, num_special: int = 3) -> int:
    """The tokens left for text: `max_len` less `<cls>` and the `<sep>`s (2 for a pair, 1 alone)."""
    budget = int(max_len) - num_special
    if budget < 0:
        seps = "two <sep>" if num_special == 3 else "a <sep>"
        raise ValueError(f"max_len must be at least {num_special} (room for <cls> and {seps}), got {max_len}")
    return budget


def truncated_lengths(len_p: np.ndarray, len_h: np.ndarray, max_len: int,
                      rule: str = "book") -> tuple[np.ndarray, np.ndarray]:
    """Lengths the premise and hypothesis keep so that `<cls> p <sep> h <sep>` fits in `max_len`.

    'book' is the closed form of the book's loop "while too long, pop the last token of the strictly
    longer side, the hypothesis on ties": with budget B = max_len - 3 and s = the shorter length,
    if B >= 2s the shorter side keeps s and the longer side B - s, else the sides end up even,
    the premise keeping ceil(B/2) and the hypothesis floor(B/2).

    'proportional' (the chapter's exercise: truncate by the ratio of lengths) keeps B tokens in all,
    shared in proportion to the lengths: the premise keeps floor(B * lp / (lp + lh) + 1/2) (round
    half up, in integers), clamped to [1, B - 1] when both sides are non-empty and B >= 2 so each
    side keeps a token, and the hypothesis keeps the rest. With B == 1 the longer side keeps the
    one token (the premise on ties).
    Pairs that already fit are left alone under both rules.
    """
    budget = check_max_len(max_len)
    lp = np.asarray(len_p, dtype=np.int64)
    lh = np.asarray(len_h, dtype=np.int64)
    too_long = lp + lh > budget
    if rule == "book":
        shorter = np.minimum(lp, lh)
        uneven = budget >= 2 * shorter  # the longer side alone absorbs the whole cut
        p_longer = lp > lh
        new_p = np.where(uneven, np.where(p_longer, budget - lh, lp), budget - budget // 2)
        new_h = np.where(uneven, np.where(p_longer, lh, budget - lp), budget // 2)
    elif rule == "proportional":
        total = np.maximum(lp + lh, 1)
        new_p = (2 * budget * lp + total) // (2 * total)
        both = (lp > 0) & (lh > 0)
        if budget >= 2:
            new_p = np.where(both, np.clip(new_p, 1, budget - 1), new_p)
        new_h = budget - new_p
    else:
        raise ValueError(f"unknown truncation rule {rule!r}: use one of {TRUNCATION_RULES}")
    return np.where(too_long, new_p, lp), np.where(too_long, new_h, lh)


def truncate_pair_of_tokens(p_tokens: Sequence[str], h_tokens: Sequence[str], max_len: int,
                            rule: str = "book") -> tuple[list[str], list[str]]:
    """Truncated copies of a premise and hypothesis so that both plus 3 special tokens fit in
    `max_len` (rules in `truncated_lengths`). The caller's lists are not changed."""
    new_p, new_h = truncated_lengths(np.array([len(p_tokens)]), np.array([len(h_tokens)]), max_len, rule)
    return list(p_tokens[: int(new_p[0])]), list(h_tokens[: int(new_h[0])])


def _tokenize_lower(sentences: Sequence[str]) -> list[list[str]]:
    # The book lower-cases, then splits on whitespace (d2l.tokenize with token='word').
    return [s.lower().split() for s in sentences]


def special_id(vocab: Vocab, name: str) -> int:
    """The id of the vocabulary's special token `name` (cls, sep, pad or mask)."""
    token = vocab.special_tokens[name]
    if token not in vocab.token_to_idx:
        raise ValueError(f"the vocabulary has no {token!r} token, which BERT inputs need")
    return vocab.token_to_idx[token]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: building millions of small token lists otherwise triggers
    collections that traverse every one of them again (several times the work of the packing)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# Every character `str.split()` splits on (all lie below U+3001); the space is the one that a
# normalised sentence may contain.
_OTHER_WHITESPACE = tuple(chr(c) for c in range(0x3001) if chr(c).isspace() and c != 0x20)
_ASCII_OTHER_WHITESPACE = tuple(c for c in _OTHER_WHITESPACE if c.isascii())


def _split_side(sentences: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Lower-case and whitespace-split a list of sentences all at once.

    Returns each sentence's token count and the flat list of all tokens, in order. The tokens come
    from one `split()` of the joined text (the joining space cannot merge tokens of two sentences).
    The counts are the number of spaces plus one when the joined text is normalised (single spaces
    between tokens, no other whitespace, no empty sentences), else a per-sentence `split()`."""
    n = len(sentences)
    lowered = [s.lower() for s in sentences]
    joined = " ".join(lowered)
    flat = joined.split()
    others = _ASCII_OTHER_WHITESPACE if joined.isascii() else _OTHER_WHITESPACE
    normalised = (n > 0 and not joined.startswith(" ") and not joined.endswith(" ") and "  " not in joined
                  and not any(c in joined for c in others))
    if normalised:
        lengths = np.fromiter(map(str.count, lowered, itertools.repeat(" ")), dtype=np.int64, count=n) + 1
        if int(lengths.sum()) == len(flat) and all(lowered):
            return lengths, flat
    return np.fromiter(map(len, map(str.split, lowered)), dtype=np.int64, count=n), flat


def _token_ids(flat: list[str], vocab: Vocab) -> np.ndarray:
    """Vocabulary ids of a flat token list (unknown tokens get `<unk>`), as one C-level map."""
    return np.fromiter(map(vocab.token_to_idx.get, flat, itertools.repeat(vocab.unk)),
                       dtype=np.int32, count=len(flat))


def _encode_side(sentences: Sequence[str], vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Each sentence's token count and the flat ids of all their tokens: WordPiece for a
    `WordPieceVocab`, else the book's lower-case and whitespace split."""
    if isinstance(vocab, WordPieceVocab):
        return vocab.encode_side(sentences)
    lengths, flat = _split_side(sentences)
    return lengths, _token_ids(flat, vocab)


def _side_ids(sentences: Sequence[str], vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Each sentence's token count and the flat ids of all their tokens, in order.

    A sentence equal to the one before it is tokenized once: SNLI lists each premise on the
    consecutive rows of its (about three) hypotheses, so the premise side shrinks about threefold.
    Only consecutive repeats are merged, so a shuffled or tiled file gains nothing it would not."""
    n = len(sentences)
    if n > 1:
        changed = list(map(operator.ne, sentences, itertools.chain((None,), sentences)))
        first = np.fromiter(changed, dtype=bool, count=n)
        num_unique = int(first.sum())
        if num_unique < 0.9 * n:
            unique_lengths, unique_ids = _encode_side(list(itertools.compress(sentences, changed)), vocab)
            row_of = np.cumsum(first) - 1  # each row's sentence among the unique ones
            lengths = unique_lengths[row_of]
            unique_starts = np.cumsum(unique_lengths) - unique_lengths
            starts = np.cumsum(lengths) - lengths
            source = np.repeat(unique_starts[row_of] - starts, lengths) + np.arange(int(lengths.sum()))
            return lengths, unique_ids[source]
    return _encode_side(sentences, vocab)


def _layout(len_p: np.ndarray, ids_p: np.ndarray, len_h: np.ndarray | None, ids_h: np.ndarray | None,
            vocab: Vocab, max_len: int, truncation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place truncated premise and hypothesis ids as `<cls> p <sep> h <sep> <pad>...` rows (the
    vocabulary's own special tokens); with `len_h` None, single texts as `<cls> p <sep> <pad>...`,
    all segment 0, each cut to its first `max_len - 2` tokens.

    Works on flat arrays only: the destination of token j of row r in the flattened (N, max_len)
    matrix is r * max_len + first column of its side + (j - first token of row r), so each side is
    one `np.repeat` and one scatter, whatever the number of rows."""
    n = len(len_p)
    single = len_h is None
    if not single and len(len_h) != n:
        raise ValueError(f"{n} premises but {len(len_h)} hypotheses")
    pad, cls, sep = (special_id(vocab, name) for name in ("pad", "cls", "sep"))
    if single:
        keep_p = np.minimum(len_p, check_max_len(max_len, num_special=2))
        valid_lens = keep_p + 2
    else:
        keep_p, keep_h = truncated_lengths(len_p, len_h, max_len, truncation)
        valid_lens = keep_p + keep_h + 3

    token_ids = np.full((n, max_len), pad, dtype=np.int32)
    segments = np.zeros((n, max_len), dtype=np.int32)
    flat_ids, flat_segments = token_ids.reshape(-1), segments.reshape(-1)
    index_dtype = np.int32 if n * max_len < 2**31 else np.int64  # half the index traffic when it fits
    row_base = np.arange(n, dtype=index_dtype) * max_len
    last_sep = row_base + valid_lens - 1
    flat_ids[row_base] = cls
    flat_ids[row_base + keep_p + 1] = sep
    flat_ids[last_sep] = sep  # the same <sep> for single texts
    sides = [(ids_p, len_p, keep_p, 1, 0)]
    if not single:
        flat_segments[last_sep] = 1
        sides.append((ids_h, len_h, keep_h, keep_p + 2, 1))
    for ids, lengths, keep, first_col, segment in sides:
        starts = np.cumsum(lengths) - lengths  # each row's first token in the flat list
        dtype = index_dtype if len(ids) < 2**31 else np.int64
        dest = np.repeat((row_base + first_col - starts).astype(dtype), lengths)
        dest += np.arange(len(ids), dtype=dtype)
        values = ids
        if np.any(keep < lengths):  # truncation: drop each row's tokens past its kept length
            kept = dest < np.repeat((row_base + first_col + keep).astype(dtype), lengths)
            dest, values = dest[kept], ids[kept]
        flat_ids[dest] = values
        if segment:
            flat_segments[dest] = 1
    return token_ids, segments, valid_lens.astype(np.int32)


def _pack_tokenized(p_tokens: list[list[str]], h_tokens: list[list[str]], vocab: Vocab, max_len: int,
                    truncation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(p_tokens)
    if len(h_tokens) != n:
        raise ValueError(f"{n} premises but {len(h_tokens)} hypotheses")
    with _gc_paused():
        sides = []
        for tokens in (p_tokens, h_tokens):
            lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
            sides += [lengths, _token_ids(list(itertools.chain.from_iterable(tokens)), vocab)]
    return _layout(*sides, vocab, max_len, truncation)


def _pack_strings(premises: Sequence[str], hypotheses: Sequence[str], vocab: Vocab, max_len: int,
                  truncation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(premises) != len(hypotheses):
        raise ValueError(f"{len(premises)} premises but {len(hypotheses)} hypotheses")
    check_max_len(max_len)
    if truncation not in TRUNCATION_RULES:
        raise ValueError(f"unknown truncation rule {truncation!r}: use one of {TRUNCATION_RULES}")
    with _gc_paused():
        sides = []
        for sentences in (premises, hypotheses):
            sides += _side_ids(sentences, vocab)
    return _layout(*sides, vocab, max_len, truncation)


def pack_pairs(premises: Sequence[str], hypotheses: Sequence[str], vocab: Vocab, max_len: int,
               truncation: str = "book") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize raw premise/hypothesis strings (lower-case and split words, or WordPiece for a
    `WordPieceVocab`) and pack each pair as `<cls> p <sep> h <sep>` padded with `<pad>` to `max_len`
    (the vocabulary's special tokens). Returns int32 arrays
    token_ids (N, max_len), segments (N, max_len) (1 on `h <sep>`, else 0) and valid_lens (N,)."""
    return _pack_strings(premises, hypotheses, vocab, max_len, truncation)


def pack_singles(texts: Sequence[str], vocab: Vocab, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize single texts as `pack_pairs` does and pack each as `<cls> a <sep>` padded to `max_len`,
    keeping its first `max_len - 2` tokens. Returns int32 token_ids (N, max_len), segments (N, max_len)
    (all 0) and valid_lens (N,)."""
    check_max_len(max_len, num_special=2)
    with _gc_paused():
        lengths, ids = _side_ids(texts, vocab)
    return _layout(lengths, ids, None, None, vocab, max_len, "book")


class SNLIBERTDataset:
    """The chapter's `SNLIBERTDataset`: packed BERT inputs plus labels, held as numpy arrays.

    `dataset` is (premises, hypotheses, labels), or (texts, labels) for single texts, packed by
    `pack_singles` (`truncation` applies to pairs only). Without `vocab` one is built from all tokens
    (min_freq 5, reserved `<pad> <mask> <cls> <sep>`), as the book's SNLI reader does.
    Items are `((token_ids, segments, valid_len), label)`."""

    def __init__(self, dataset: Sequence[Sequence], max_len: int, vocab: Vocab | None = None,
                 truncation: str = "book", verbose: bool = False) -> None:
        if len(dataset) == 2:  # single texts
            texts, labels = dataset
            if vocab is None:
                with _gc_paused():
                    vocab = Vocab(_tokenize_lower(texts), min_freq=5, reserved_tokens=RESERVED_TOKENS)
            packed = pack_singles(texts, vocab, max_len)
        else:
            premises, hypotheses, labels = dataset[0], dataset[1], dataset[2]
            if vocab is None:
                with _gc_paused():
                    p_tokens, h_tokens = _tokenize_lower(premises), _tokenize_lower(hypotheses)
                    vocab = Vocab(p_tokens + h_tokens, min_freq=5, reserved_tokens=RESERVED_TOKENS)
                packed = _pack_tokenized(p_tokens, h_tokens, vocab, max_len, truncation)
                del p_tokens, h_tokens
            else:
                packed = _pack_strings(premises, hypotheses, vocab, max_len, truncation)
        self.vocab = vocab
        self.max_len = max_len
        self.truncation = truncation
        self.all_token_ids, self.all_segments, self.valid_lens = packed
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.valid_lens):
            raise ValueError(f"{len(self.valid_lens)} examples but {len(self.labels)} labels")
        if verbose:
            print(f"read {len(self)} examples")

    cache_hit: bool | None = None  # set by `core.packed_cache`: whether the arrays came from the disk cache
    cache_path: str | None = None

    @classmethod
    def from_arrays(cls, token_ids: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray, labels: np.ndarray,
                    vocab: Vocab, max_len: int, truncation: str = "book") -> "SNLIBERTDataset":
        """A dataset around already packed arrays (from the cache, or a subset of another dataset)."""
        dataset = cls.__new__(cls)
        dataset.vocab, dataset.max_len, dataset.truncation = vocab, max_len, truncation
        dataset.all_token_ids = np.asarray(token_ids, dtype=np.int32)
        dataset.all_segments = np.asarray(segments, dtype=np.int32)
        dataset.valid_lens = np.asarray(valid_lens, dtype=np.int32)
        dataset.labels = np.asarray(labels, dtype=np.int64)
        if not (len(dataset.all_token_ids) == len(dataset.all_segments) == len(dataset.valid_lens)
                == len(dataset.labels)):
            raise ValueError("packed arrays and labels differ in length")
        return dataset

    def subset(self, indices) -> "SNLIBERTDataset":
        """The examples at `indices` (a split or a seeded sample), as a new dataset."""
        idx = np.asarray(indices, dtype=np.int64)
        return SNLIBERTDataset.from_arrays(self.all_token_ids[idx], self.all_segments[idx], self.valid_lens[idx],
                                           self.labels[idx], self.vocab, self.max_len, self.truncation)

    def __getitem__(self, idx: int):
        return (self.all_token_ids[idx], self.all_segments[idx], self.valid_lens[idx]), self.labels[idx]

    def __len__(self) -> int:
        return len(self.all_token_ids)
