"""Minibatches of packed BERT inputs as numpy arrays, for either backend to wrap in its own tensors.

The order of examples comes from a *sampler*, `sampler(num_examples, batch_size, shuffle, rng)
-> list of index arrays`. `batch_indices` is the book's DataLoader order (sequential or a random
permutation, cut into batches). A length-aware sampler (for instance one that groups examples of
similar valid length) keeps the same signature, closing over the valid lengths it needs, and pairs
with `trim=True`, which cuts each batch to its longest valid length. Trimming is exact because
BERT masks every position at or beyond a sequence's valid length.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

Sampler = Callable[[int, int, bool, "np.random.Generator | None"], list]
Batch = tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def batch_indices(num_examples: int, batch_size: int, shuffle: bool,
                  rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Indices 0..num_examples-1, permuted by `rng` if `shuffle`, cut into int64 batches of
    `batch_size` (the last one may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if shuffle:
        if rng is None:
            raise ValueError("shuffle=True needs a numpy Generator `rng`")
        order = rng.permutation(num_examples).astype(np.int64)
    else:
        order = np.arange(num_examples, dtype=np.int64)
    return [order[start:start + batch_size] for start in range(0, num_examples, batch_size)]


class BatchIterator:
    """Iterate over `((token_ids, segments, valid_lens), labels)` numpy batches.

    Each pass (each `iter()`) asks the sampler for a fresh order, drawing from the iterator's own
    `np.random.default_rng(seed)`: passes differ from one another, and the sequence of passes is the
    same for every iterator built with the same seed."""

    def __init__(self, arrays: Sequence[np.ndarray], labels: np.ndarray, batch_size: int,
                 shuffle: bool = False, seed: int = 0, sampler: Sampler = batch_indices,
                 trim: bool = False) -> None:
        if len(arrays) != 3:
            raise ValueError(f"arrays must be (token_ids, segments, valid_lens), got {len(arrays)} arrays")
        token_ids, segments, valid_lens = (np.asarray(a) for a in arrays)
        labels = np.asarray(labels)
        n = len(labels)
        if not (len(token_ids) == len(segments) == len(valid_lens) == n):
            raise ValueError(f"arrays and labels differ in length: token_ids {len(token_ids)}, segments "
                             f"{len(segments)}, valid_lens {len(valid_lens)}, labels {n}")
        if token_ids.shape != segments.shape:
            raise ValueError(f"token_ids {token_ids.shape} and segments {segments.shape} differ in shape")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.token_ids, self.segments, self.valid_lens, self.labels = token_ids, segments, valid_lens, labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.sampler = sampler
        self.trim = trim
        self._rng = np.random.default_rng(seed)

    @classmethod
    def from_dataset(cls, dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                     **kwargs) -> "BatchIterator":
        """Batches over an `SNLIBERTDataset` (anything with all_token_ids, all_segments, valid_lens, labels)."""
        return cls((dataset.all_token_ids, dataset.all_segments, dataset.valid_lens), dataset.labels,
                   batch_size, shuffle=shuffle, seed=seed, **kwargs)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        """Batches per pass."""
        if self.sampler is batch_indices:
            return -(-self.num_examples // self.batch_size)
        # Another sampler: count its batches on a throwaway generator, so the real one is not advanced.
        return len(self.sampler(self.num_examples, self.batch_size, self.shuffle, np.random.default_rng(0)))

    def __iter__(self) -> Iterator[Batch]:
        for idx in self.sampler(self.num_examples, self.batch_size, self.shuffle, self._rng):
            valid_lens = self.valid_lens[idx]
            if self.trim and len(idx):
                width = int(valid_lens.max())
                # Fancy index plus slice copies into a contiguous (batch, width) array.
                token_ids, segments = self.token_ids[idx, :width], self.segments[idx, :width]
            else:
                token_ids, segments = self.token_ids[idx], self.segments[idx]
            yield (token_ids, segments, valid_lens), self.labels[idx]
