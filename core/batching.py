"""Minibatches of packed BERT inputs as numpy arrays, for either backend to wrap in its own tensors.

The order of examples comes from a *sampler*, `sampler(num_examples, batch_size, shuffle, rng)
-> list of index arrays`. `batch_indices` is the book's DataLoader order (sequential or a random
permutation, cut into batches). A length-aware sampler (for instance one that groups examples of
similar valid length) keeps the same signature, closing over the valid lengths it needs, and pairs
with `trim=True`, which cuts each batch to its longest valid length. Trimming is exact because
BERT masks every position at or beyond a sequence's valid length.

`bucket_batch_indices(valid_lens)` is that sampler: it groups examples of similar length so that a
trimmed batch carries little padding (SNLI pairs are about 27 of 128 positions), keeps every pass
seeded and reproducible, covers every example exactly once per pass and shuffles the batch order.
`pad_multiple` rounds a trimmed width up (to a multiple of 8, say) so a compiled or hybridized
model sees only a few distinct shapes. `widths` goes further for a backend that compiles one program
per shape (JAX): `plan_widths` picks, from the run's own batch shapes (`batch_shapes`), the padded
widths that minimise compile cost plus padded compute: a short run gets one or two coarse widths,
a long one the fine ladder (`padded_size`: two sizes per doubling).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

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


def padded_size(n: int, minimum: int = 8) -> int:
    """n rounded up to a multiple of half the power of two at or below it (at least `minimum`):
    8, 12, 16, 24, 32, 48, 64, 96, 128, 192, ...: two sizes per doubling, at most 50% padding
    (about 20% on SNLI's lengths). The finest ladder of widths (and rows) JAX compiles for."""
    if n <= minimum:
        return minimum
    half = max(1, 2 ** (int(n).bit_length() - 2))  # half the power of two at or below n
    return -(-n // half) * half


def plan_widths(shapes: Sequence[tuple[int, int]], compile_cost: float, limit: int) -> tuple[int, ...]:
    """The padded widths to compile for batches of these (rows, trimmed width) `shapes` (every batch
    of the run, each pass counted), chosen from `padded_size`'s ladder (capped at `limit`, the
    packed width) to minimise `compile_cost` x number of widths + the padded rows x positions all
    batches compute, `compile_cost` being one compiled program's cost in such row-positions.
    Exact, by dynamic programming over the ladder: a batch takes the smallest chosen width that
    holds it, so the widest batch's ladder width is always chosen."""
    if not shapes:
        return ()
    ladder = sorted({min(padded_size(w), limit) for w in range(1, limit + 1)})
    rows_at = np.zeros(len(ladder))  # rows of the batches whose own ladder width is ladder[i]
    for rows, width in shapes:
        rows_at[ladder.index(min(padded_size(width), limit))] += rows
    top = int(np.nonzero(rows_at)[0].max())
    # best[j]: the cheapest plan for the batches up to ladder[j] whose widest width is ladder[j];
    # cost[i, j]: the batches above ladder[i] and up to ladder[j], padded to ladder[j].
    best, previous = [0.0] * (top + 1), [-1] * (top + 1)
    for j in range(top + 1):
        best[j], previous[j] = min((compile_cost + (best[i] if i >= 0 else 0.0)
                                    + rows_at[i + 1:j + 1].sum() * ladder[j], i) for i in range(-1, j))
    plan, j = [], top
    while j >= 0:
        plan.append(ladder[j])
        j = previous[j]
    return tuple(sorted(plan))


def batch_shapes(iterator: "BatchIterator", rng: np.random.Generator | None = None) -> list[tuple[int, int]]:
    """(rows, trimmed width) of every batch of one pass of `iterator`, from a throwaway generator
    (`rng`; default seeded 0; the iterator's own is not advanced): with whole-pass length buckets,
    every pass's shapes."""
    rng = rng if rng is not None else np.random.default_rng(0)
    order = iterator.sampler(iterator.num_examples, iterator.batch_size, iterator.shuffle, rng)
    width = iterator.token_ids.shape[1]
    return [(len(idx), int(iterator.valid_lens[idx].max()) if iterator.trim else width) for idx in order if len(idx)]


def template_batches(iterator: Any) -> list[Batch]:
    """A batch of zeros of each (rows, width) the next pass of `iterator` (a `BatchIterator`) yields,
    in the order they first come, with its arrays' types: what a backend that compiles a program per
    shape (JAX) can compile before the batches come (`FinetuneStep.compile_ahead`). Another
    iterator (the book's DataLoader) gives none. A wrapper that keeps what it wraps in `iterable`
    (core.progress.Progress, tqdm) is looked through."""
    while not isinstance(iterator, BatchIterator) and hasattr(iterator, "iterable"):
        iterator = iterator.iterable
    if not isinstance(iterator, BatchIterator):
        return []
    return [((np.zeros((rows, width), iterator.token_ids.dtype), np.zeros((rows, width), iterator.segments.dtype),
              np.ones(rows, iterator.valid_lens.dtype)), np.zeros(rows, iterator.labels.dtype))
            for rows, width in dict.fromkeys(iterator.next_pass_shapes())]


def bucket_batch_indices(valid_lens: Sequence[int] | np.ndarray, multiple: int = 1,
                         window: int | None = None) -> Sampler:
    """A length-bucketing sampler over examples with these valid lengths, for `BatchIterator(sampler=...)`.

    Examples are ordered by their length rounded up to `multiple` and cut into batches, so each batch
    holds examples of (nearly) the same length. With `shuffle`, each pass first permutes the examples
    with the iterator's generator (so which examples of a length share a batch changes from pass to
    pass), sorts them by rounded length within consecutive windows of `window` batches (None: the
    whole pass; a window keeps more length variety per batch), then shuffles the order of the batches.
    Without `shuffle` the order is the sort itself (shortest first), the same every pass.
    Every example appears exactly once per pass; only the last batch of the sorted order (or of each
    window) may be short. Batch composition depends only on the lengths and the generator's state.
    """
    lens = np.asarray(valid_lens).astype(np.int64).reshape(-1)
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of batches or None, got {window}")
    keys = -(-lens // multiple)  # the rounded length, in units of `multiple`

    def sampler(num_examples: int, batch_size: int, shuffle: bool,
                rng: np.random.Generator | None = None) -> list[np.ndarray]:
        if num_examples != len(keys):
            raise ValueError(f"the sampler knows {len(keys)} lengths but was asked for {num_examples} examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not shuffle:
            order = np.argsort(keys, kind="stable").astype(np.int64)
            return [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]
        if rng is None:
            raise ValueError("shuffle=True needs a numpy Generator `rng`")
        perm = rng.permutation(num_examples).astype(np.int64)
        span = num_examples if window is None else window * batch_size
        batches = []
        for start in range(0, num_examples, max(span, 1)):
            chunk = perm[start:start + span]
            # A stable sort of a random permutation: equal lengths stay in random order.
            chunk = chunk[np.argsort(keys[chunk], kind="stable")]
            batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def num_batches(num_examples: int, batch_size: int, shuffle: bool) -> int:
        span = num_examples if (window is None or not shuffle) else window * batch_size
        full, rest = divmod(num_examples, max(span, 1))
        return full * -(-span // batch_size) + -(-rest // batch_size)

    sampler.num_batches = num_batches  # type: ignore[attr-defined]
    sampler.valid_lens = lens  # type: ignore[attr-defined]
    return sampler


def chunk_bounds(num_examples: int, size: int | None) -> list[tuple[int, int]]:
    """[(start, stop), ...] cutting `num_examples` rows into chunks of at most `size` (None: one
    chunk). A training step computes a batch chunk by chunk with `--micro-batch`: the gradients of
    the chunks add up to the batch's, while only one chunk's activations are alive at a time."""
    if size is None or size >= num_examples:
        return [(0, num_examples)]
    return [(start, min(start + size, num_examples)) for start in range(0, num_examples, size)]


def rows(inputs: Any, start: int, stop: int) -> Any:
    """Rows start:stop of a batch's inputs: one array, or a list/tuple of them (tokens, segments,
    valid lengths), sliced alike. Works on any framework's arrays."""
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(x[start:stop] for x in inputs)
    return inputs[start:stop]


class BatchIterator:
    """Iterate over `((token_ids, segments, valid_lens), labels)` numpy batches.

    Each pass (each `iter()`) asks the sampler for a fresh order, drawing from the iterator's own
    `np.random.default_rng(seed)`: passes differ from one another, and the sequence of passes is the
    same for every iterator built with the same seed."""

    def __init__(self, arrays: Sequence[np.ndarray], labels: np.ndarray, batch_size: int,
                 shuffle: bool = False, seed: int = 0, sampler: Sampler = batch_indices,
                 trim: bool = False, pad_multiple: int = 1, widths: Sequence[int] | None = None) -> None:
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
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be positive, got {pad_multiple}")
        self.pad_multiple = pad_multiple
        # A trimmed width is rounded up to the first of these that holds it (`plan_widths`'), past
        # them to `padded_size`'s ladder.
        self.widths = tuple(sorted(widths)) if widths else ()
        self._rng = np.random.default_rng(seed)
        self._pass_start: dict | None = None  # the generator's state when the pass in progress began
        self._batch = 0  # batches of that pass handed out
        self._skip = 0  # batches the next pass skips (a resumed run's position)

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
        count = getattr(self.sampler, "num_batches", None)  # a sampler that knows its count without sorting
        if count is not None:
            return count(self.num_examples, self.batch_size, self.shuffle)
        # Another sampler: count its batches on a throwaway generator, so the real one is not advanced.
        return len(self.sampler(self.num_examples, self.batch_size, self.shuffle, np.random.default_rng(0)))

    def __iter__(self) -> Iterator[Batch]:
        self._pass_start = self._rng.bit_generator.state
        order = self.sampler(self.num_examples, self.batch_size, self.shuffle, self._rng)
        skip, self._skip = self._skip, 0
        for i, idx in enumerate(order):
            if i < skip:
                continue
            self._batch = i + 1
            valid_lens = self.valid_lens[idx]
            if self.trim and len(idx):
                width = self.padded_width(int(valid_lens.max()))
                # Fancy index plus slice copies into a contiguous (batch, width) array.
                token_ids, segments = self.token_ids[idx, :width], self.segments[idx, :width]
            else:
                token_ids, segments = self.token_ids[idx], self.segments[idx]
            yield (token_ids, segments, valid_lens), self.labels[idx]
        self._pass_start, self._batch = None, 0

    def next_pass_shapes(self) -> list[tuple[int, int]]:
        """(rows, width) of every batch the next pass yields, in order, from a copy of the
        iterator's generator (its own is not advanced)."""
        rng = np.random.default_rng()
        rng.bit_generator.state = self._rng.bit_generator.state
        return [(rows, self.padded_width(width) if self.trim else width) for rows, width in batch_shapes(self, rng)]

    def padded_width(self, longest: int) -> int:
        """The width of a trimmed batch whose longest example is `longest` positions: rounded up to
        `pad_multiple` (few distinct shapes), then to the first planned width that holds it (past
        them, `padded_size`'s ladder), never past the packed width."""
        width = -(-longest // self.pad_multiple) * self.pad_multiple
        if self.widths:
            width = next((w for w in self.widths if w >= width), padded_size(width))
        return min(width, self.token_ids.shape[1])

    def state_dict(self) -> dict:
        """Where the iterator is, as JSON: the generator's state at the start of the pass in progress
        (or of the next pass) and how many of its batches were handed out. A resumed run gets the
        same batches, in the same order, as an uninterrupted one."""
        rng = self._pass_start if self._pass_start is not None else self._rng.bit_generator.state
        return {"rng": rng, "batch": self._batch, "num_examples": self.num_examples,
                "batch_size": self.batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`: the next pass starts at that pass's batch `state['batch']`."""
        for key in ("num_examples", "batch_size", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data iterator state is for {key}={state[key]}, this iterator has "
                                 f"{getattr(self, key)}")
        self._rng.bit_generator.state = state["rng"]
        self._pass_start, self._batch, self._skip = None, 0, int(state["batch"])
