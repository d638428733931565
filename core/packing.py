"""Pack premise/hypothesis pairs into BERT inputs: `<cls> p <sep> h <sep>`, truncated and padded.

`pack_pairs` gives exactly what the book's per-example `SNLIBERTDataset._mp_worker` loop gives, but
computed on whole arrays: every sentence is tokenized once, each distinct token is looked up in the
vocabulary once, the truncated lengths come from a closed form of the book's pop loop, and the ids
are scattered into the padded matrix with fancy indexing. No process pool.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from .vocab import Vocab

RESERVED_TOKENS = ["<pad>", "<mask>", "<cls>", "<sep>"]
TRUNCATION_RULES = ("book", "proportional")


def get_tokens_and_segments(tokens_a: list[str], tokens_b: list[str] | None = None) -> tuple[list[str], list[int]]:
    """`<cls> a <sep>` (+ `b <sep>`) and its segment ids: 0 for the first part, 1 for the second."""
    tokens = ["<cls>"] + list(tokens_a) + ["<sep>"]
    segments = [0] * (len(tokens_a) + 2)
    if tokens_b is not None:
        tokens += list(tokens_b) + ["<sep>"]
        segments += [1] * (len(tokens_b) + 1)
    return tokens, segments


def _check_max_len(max_len: int) -> int:
    budget = int(max_len) - 3  # <cls>, <sep>, <sep>
    if budget < 0:
        raise ValueError(f"max_len must be at least 3 (room for <cls> and two <sep>), got {max_len}")
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
    budget = _check_max_len(max_len)
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


def _special_id(vocab: Vocab, token: str) -> int:
    if token not in vocab.token_to_idx:
        raise ValueError(f"the vocabulary has no {token!r} token, which BERT inputs need")
    return vocab.token_to_idx[token]


def _pack_tokenized(p_tokens: list[list[str]], h_tokens: list[list[str]], vocab: Vocab, max_len: int,
                    truncation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(p_tokens)
    if len(h_tokens) != n:
        raise ValueError(f"{n} premises but {len(h_tokens)} hypotheses")
    pad, cls, sep = (_special_id(vocab, t) for t in ("<pad>", "<cls>", "<sep>"))
    flat_p = list(itertools.chain.from_iterable(p_tokens))
    flat_h = list(itertools.chain.from_iterable(h_tokens))
    # One vocabulary lookup per distinct token, then a C-level dict map over all occurrences.
    lookup = {t: vocab[t] for t in set(flat_p).union(flat_h)}

    len_p = np.fromiter(map(len, p_tokens), dtype=np.int64, count=n)
    len_h = np.fromiter(map(len, h_tokens), dtype=np.int64, count=n)
    keep_p, keep_h = truncated_lengths(len_p, len_h, max_len, truncation)
    valid_lens = keep_p + keep_h + 3

    token_ids = np.full((n, max_len), pad, dtype=np.int32)
    rows = np.arange(n)
    token_ids[:, 0] = cls
    token_ids[rows, keep_p + 1] = sep
    token_ids[rows, valid_lens - 1] = sep
    # Each side: from the flat token list find every token's row and position in its sentence, keep
    # the positions below the truncated length and scatter them at (row, first column + position).
    for flat, lengths, keep, first_col in ((flat_p, len_p, keep_p, np.ones_like(keep_p)),
                                           (flat_h, len_h, keep_h, keep_p + 2)):
        ids = np.fromiter(map(lookup.__getitem__, flat), dtype=np.int32, count=len(flat))
        starts = np.cumsum(lengths) - lengths
        row_of = np.repeat(rows, lengths)
        pos = np.arange(len(ids)) - starts[row_of]
        kept = pos < keep[row_of]
        kept_rows = row_of[kept]
        token_ids[kept_rows, first_col[kept_rows] + pos[kept]] = ids[kept]

    columns = np.arange(max_len)
    segments = ((columns >= (keep_p + 2)[:, None]) & (columns < valid_lens[:, None])).astype(np.int32)
    return token_ids, segments, valid_lens.astype(np.int32)


def pack_pairs(premises: Sequence[str], hypotheses: Sequence[str], vocab: Vocab, max_len: int,
               truncation: str = "book") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower-case and word-tokenize raw premise/hypothesis strings and pack each pair as
    `<cls> p <sep> h <sep>` padded with `<pad>` to `max_len`. Returns int32 arrays
    token_ids (N, max_len), segments (N, max_len) (1 on `h <sep>`, else 0) and valid_lens (N,)."""
    return _pack_tokenized(_tokenize_lower(premises), _tokenize_lower(hypotheses), vocab, max_len, truncation)


class SNLIBERTDataset:
    """The chapter's `SNLIBERTDataset`: packed BERT inputs plus labels, held as numpy arrays.

    `dataset` is (premises, hypotheses, labels). Without `vocab` one is built from all tokens
    (min_freq 5, reserved `<pad> <mask> <cls> <sep>`), as the book's SNLI reader does.
    Items are `((token_ids, segments, valid_len), label)`."""

    def __init__(self, dataset: Sequence[Sequence], max_len: int, vocab: Vocab | None = None,
                 truncation: str = "book", verbose: bool = False) -> None:
        premises, hypotheses, labels = dataset[0], dataset[1], dataset[2]
        p_tokens, h_tokens = _tokenize_lower(premises), _tokenize_lower(hypotheses)
        if vocab is None:
            vocab = Vocab(p_tokens + h_tokens, min_freq=5, reserved_tokens=RESERVED_TOKENS)
        self.vocab = vocab
        self.max_len = max_len
        self.truncation = truncation
        self.all_token_ids, self.all_segments, self.valid_lens = _pack_tokenized(
            p_tokens, h_tokens, vocab, max_len, truncation)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.valid_lens):
            raise ValueError(f"{len(self.valid_lens)} pairs but {len(self.labels)} labels")
        if verbose:
            print(f"read {len(self)} examples")

    def __getitem__(self, idx: int):
        return (self.all_token_ids[idx], self.all_segments[idx], self.valid_lens[idx]), self.labels[idx]

    def __len__(self) -> int:
        return len(self.all_token_ids)
