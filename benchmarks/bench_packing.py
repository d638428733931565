"""Packing throughput: the book's process-pool packing against nlibert's, and the disk cache, in one run.

    python benchmarks/bench_packing.py                 # SNLI-sized: the dev file tiled to ~549k pairs
    python benchmarks/bench_packing.py --pairs 100000  # quicker

Four ways to turn SNLI pairs into `(token_ids, segments, valid_lens)` at max_len 128, all checked to
give identical arrays:

1. book: the chapter's `SNLIBERTDataset` re-implemented here as the baseline: lower-case and split
   every sentence, then `multiprocessing.Pool(4).map` of a per-example worker (the book's
   `_mp_worker`: pop-loop truncation, `<cls> p <sep> h <sep>`, vocabulary lookup, padding lists),
   then `np.array` of the returned lists;
2. core: `nlibert.core.packing.SNLIBERTDataset` (whole-corpus tokenization, one dictionary map over
   all tokens, closed-form truncation, numpy scatter), from the same in-memory pairs;
3. cache miss: `load_packed_snli` from the `.txt` file with an empty cache (read, pack, write the entry);
4. cache hit: `load_packed_snli` again: the entry is reloaded instead of recomputed.

pairs/sec = pairs / wall seconds; ratios are against the book's pool. Rows 1-2 start from the pairs
in memory, rows 3-4 from the file (the book reads its file before packing too, which row 1 leaves out).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import SNLI_TRAIN_PAIRS, bert_small_vocab, cpu_model, dev_file, loadavg  # noqa: E402


TARGET_RATIO = 10.0  # issue 6: packing at least 10x the book's process pool


class BookSNLIBERTDataset:
    """The chapter's `SNLIBERTDataset` (both frameworks' versions do this), minus the framework tensors."""

    def __init__(self, dataset, max_len, vocab=None):
        all_premise_hypothesis_tokens = [[p_tokens, h_tokens] for p_tokens, h_tokens in zip(
            *[[s.lower().split() for s in sentences] for sentences in dataset[:2]])]
        self.labels = np.array(dataset[2])
        self.vocab = vocab
        self.max_len = max_len
        (self.all_token_ids, self.all_segments,
         self.valid_lens) = self._preprocess(all_premise_hypothesis_tokens)

    def _preprocess(self, all_premise_hypothesis_tokens):
        pool = multiprocessing.Pool(4)  # Use 4 worker processes
        out = pool.map(self._mp_worker, all_premise_hypothesis_tokens)
        pool.close()  # (the book never closes its pool)
        pool.join()
        all_token_ids = [token_ids for token_ids, segments, valid_len in out]
        all_segments = [segments for token_ids, segments, valid_len in out]
        valid_lens = [valid_len for token_ids, segments, valid_len in out]
        return (np.array(all_token_ids, dtype="int32"), np.array(all_segments, dtype="int32"),
                np.array(valid_lens))

    def _mp_worker(self, premise_hypothesis_tokens):
        p_tokens, h_tokens = premise_hypothesis_tokens
        self._truncate_pair_of_tokens(p_tokens, h_tokens)
        tokens = ["<cls>"] + p_tokens + ["<sep>"] + h_tokens + ["<sep>"]
        segments = [0] * (len(p_tokens) + 2) + [1] * (len(h_tokens) + 1)
        token_ids = self.vocab[tokens] + [self.vocab["<pad>"]] * (self.max_len - len(tokens))
        segments = segments + [0] * (self.max_len - len(segments))
        valid_len = len(tokens)
        return token_ids, segments, valid_len

    def _truncate_pair_of_tokens(self, p_tokens, h_tokens):
        while len(p_tokens) + len(h_tokens) > self.max_len - 3:
            if len(p_tokens) > len(h_tokens):
                p_tokens.pop()
            else:
                h_tokens.pop()


def timed(fn, repeats):
    """(median seconds, last result) over `repeats` calls."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=SNLI_TRAIN_PAIRS,
                        help="tile the dev file to about this many pairs (default: SNLI's training split)")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each fast method (median); the pool runs once")
    parser.add_argument("--book-repeats", type=int, default=1)
    args = parser.parse_args(argv)

    from nlibert.core.packed_cache import load_packed_snli
    from nlibert.core.packing import SNLIBERTDataset
    from nlibert.core.snli import read_snli_file
    premises, hypotheses, labels = read_snli_file(dev_file())
    tile = max(1, round(args.pairs / len(labels)))
    data = (premises * tile, hypotheses * tile, labels * tile)
    n = len(data[2])
    vocab = bert_small_vocab(premises, hypotheses)
    print(f"nlibert packing benchmark: {n:,} pairs (SNLI dev x{tile}), max_len {args.max_len}, vocabulary "
          f"{len(vocab):,}; {os.cpu_count()} cores ({cpu_model()}); load average {loadavg()}")

    rows = []
    book_s, book = timed(lambda: BookSNLIBERTDataset(data, args.max_len, vocab), args.book_repeats)
    book_arrays = (book.all_token_ids, book.all_segments, book.valid_lens)
    rows.append(("book: Pool(4) per-example workers", book_s, True))
    core_s, core = timed(lambda: SNLIBERTDataset(data, args.max_len, vocab), args.repeats)
    rows.append(("core: vectorised, in memory", core_s, same(book_arrays, (core.all_token_ids, core.all_segments,
                                                                         core.valid_lens))))
    del core
    folder = tempfile.mkdtemp(prefix="nlibert-bench-packing-")
    try:
        source = os.path.join(folder, "snli_1.0_train.txt")
        with open(dev_file(), encoding="utf-8") as f:
            header, body = f.readline(), f.read()
        with open(source, "w", encoding="utf-8") as f:
            f.write(header + body * tile)
        size = os.path.getsize(source)

        def miss():
            cache = os.path.join(folder, "cache")
            shutil.rmtree(cache, ignore_errors=True)
            return load_packed_snli(source, vocab, args.max_len, cache_dir=cache)

        miss_s, missed = timed(miss, args.repeats)
        assert missed.cache_hit is False
        rows.append(("cache miss: read file, pack, write", miss_s, same(book_arrays, (
            missed.all_token_ids, missed.all_segments, missed.valid_lens))))
        entry = os.path.getsize(missed.cache_path)
        del missed
        cache = os.path.join(folder, "cache")
        hit_s, hit = timed(lambda: load_packed_snli(source, vocab, args.max_len, cache_dir=cache), args.repeats)
        assert hit.cache_hit is True
        rows.append(("cache hit: reload the entry", hit_s, same(book_arrays, (
            hit.all_token_ids, hit.all_segments, hit.valid_lens))))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"{'method':38s} {'seconds':>8s} {'pairs/sec':>12s} {'x book':>8s}  identical arrays")
    for name, seconds, identical in rows:
        print(f"{name:38s} {seconds:8.2f} {n / seconds:12,.0f} {book_s / seconds:7.1f}x  {identical}")
    print(f"(source file {size / 2**20:,.0f} MiB, cache entry {entry / 2**20:,.0f} MiB: only each row's valid "
          f"positions, keyed by the file's SHA-1 and size, the vocabulary's SHA-1, max_len and the truncation "
          f"rule; medians of {args.repeats} runs, the pool {args.book_repeats}; load average now {loadavg()})")
    core_ratio = book_s / core_s
    print(f"packing: core / book = {core_ratio:.1f}x: {'PASS' if core_ratio >= TARGET_RATIO else 'FAIL'} "
          f"(target >= {TARGET_RATIO:.0f}x); reloading the cached entry: {book_s / hit_s:.1f}x")
    if not all(identical for _, _, identical in rows):
        raise SystemExit("packed arrays differ between methods")


if __name__ == "__main__":
    main()
