"""The fast path's batching: the length-bucketing sampler, trimming to a multiple, and the widths planned by cost."""
import itertools

import numpy as np
import pytest

from nlibert.core.batching import BatchIterator, batch_shapes, bucket_batch_indices, padded_size, plan_widths


def make_arrays(n=203, max_len=40, seed=0):
    rng = np.random.default_rng(seed)
    valid_lens = rng.integers(3, max_len + 1, size=n).astype(np.int32)
    columns = np.arange(max_len)
    token_ids = np.where(columns < valid_lens[:, None], rng.integers(5, 50, size=(n, max_len)), 1).astype(np.int32)
    segments = ((columns >= 2) & (columns < valid_lens[:, None])).astype(np.int32)
    labels = np.arange(n, dtype=np.int64)  # label = example index, so batches can be traced back
    return (token_ids, segments, valid_lens), labels


@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("multiple", [1, 8])
def test_every_pass_covers_every_example_exactly_once(window, multiple):
    arrays, labels = make_arrays()
    sampler = bucket_batch_indices(arrays[2], multiple=multiple, window=window)
    it = BatchIterator(arrays, labels, 16, shuffle=True, seed=1, sampler=sampler, trim=True,
                       pad_multiple=multiple)
    for _ in range(3):
        batches = list(it)
        assert len(batches) == len(it)
        seen = np.concatenate([y for _, y in batches])
        assert sorted(seen.tolist()) == list(range(len(labels)))
        assert sum(len(y) < 16 for _, y in batches) <= (1 if window is None else -(-len(labels) // (16 * window)))
        for (ids, segs, vls), y in batches:  # rows travel with their labels, only padding is cut
            width = ids.shape[1]
            np.testing.assert_array_equal(ids, arrays[0][y, :width])
            np.testing.assert_array_equal(segs, arrays[1][y, :width])
            np.testing.assert_array_equal(vls, arrays[2][y])
            assert np.all(arrays[0][y, width:] == 1)


def test_batches_hold_similar_lengths_and_cut_the_padding():
    arrays, labels = make_arrays(n=600)
    valid_lens = arrays[2]
    it = BatchIterator(arrays, labels, 32, shuffle=True, seed=0, sampler=bucket_batch_indices(valid_lens),
                       trim=True)
    batches = list(it)
    # A whole-pass sort: the batches' length ranges do not overlap.
    ranges = sorted((int(vls.min()), int(vls.max())) for (_, _, vls), _ in batches)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:]))
    bucketed = sum(ids.size for (ids, _, _), _ in batches)
    random = sum(ids.size for (ids, _, _), _ in BatchIterator(arrays, labels, 32, shuffle=True, seed=0, trim=True))
    assert bucketed < 0.7 * random
    assert bucketed <= valid_lens.sum() + 32 * len(batches)


def test_reproducible_by_seed_different_across_passes_and_batch_order_shuffled():
    arrays, labels = make_arrays()

    def passes(seed, n=3):
        it = BatchIterator(arrays, labels, 16, shuffle=True, seed=seed,
                           sampler=bucket_batch_indices(arrays[2], multiple=4), trim=True, pad_multiple=4)
        return [[y.tolist() for _, y in it] for _ in range(n)]

    first, again, other = passes(7), passes(7), passes(8)
    assert first == again
    assert first != other
    assert first[0] != first[1] != first[2]
    widths = [ids.shape[1] for (ids, _, _), _ in BatchIterator(
        arrays, labels, 16, shuffle=True, seed=7, sampler=bucket_batch_indices(arrays[2]), trim=True)]
    assert widths != sorted(widths)  # the batch order is shuffled, not shortest first


def test_without_shuffle_the_order_is_the_sort_every_pass():
    arrays, labels = make_arrays()
    it = BatchIterator(arrays, labels, 16, shuffle=False, sampler=bucket_batch_indices(arrays[2]), trim=True)
    first = [y.tolist() for _, y in it]
    assert first == [y.tolist() for _, y in it]
    order = np.concatenate(first)
    assert np.all(np.diff(arrays[2][order]) >= 0)
    assert order.tolist() == np.argsort(arrays[2], kind="stable").tolist()


def test_pad_multiple_rounds_widths_up_but_never_past_the_packed_width():
    arrays, labels = make_arrays(max_len=37)
    it = BatchIterator(arrays, labels, 8, shuffle=True, seed=2, sampler=bucket_batch_indices(arrays[2], 8),
                       trim=True, pad_multiple=8)
    widths = set()
    for (ids, _, vls), _ in it:
        width = ids.shape[1]
        widths.add(width)
        assert width >= vls.max() and (width % 8 == 0 or width == 37)
        assert width - vls.max() < 8
    assert widths <= {8, 16, 24, 32, 37}


def test_len_counts_the_batches_without_advancing_the_generator():
    arrays, labels = make_arrays(n=100)
    for window, shuffle in ((None, True), (2, True), (3, False)):
        sampler = bucket_batch_indices(arrays[2], window=window)
        it = BatchIterator(arrays, labels, 16, shuffle=shuffle, seed=3, sampler=sampler)
        state = it._rng.bit_generator.state
        n = len(it)
        assert it._rng.bit_generator.state == state
        assert n == len(list(it))


def test_bad_arguments():
    arrays, labels = make_arrays(n=10)
    with pytest.raises(ValueError, match="multiple"):
        bucket_batch_indices(arrays[2], multiple=0)
    with pytest.raises(ValueError, match="window"):
        bucket_batch_indices(arrays[2], window=0)
    with pytest.raises(ValueError, match="pad_multiple"):
        BatchIterator(arrays, labels, 4, pad_multiple=0)
    sampler = bucket_batch_indices(arrays[2][:5])
    with pytest.raises(ValueError, match="5 lengths"):
        list(BatchIterator(arrays, labels, 4, sampler=sampler))
    with pytest.raises(ValueError, match="rng"):
        sampler(5, 2, True, None)


def plan_cost(plan, shapes, compile_cost, limit=40):
    """What `plan_widths` minimises: a compile per width, and every batch padded to the first width that holds it."""
    return compile_cost * len(plan) + sum(rows * next(w for w in plan if w >= min(padded_size(width), limit))
                                          for rows, width in shapes)


@pytest.mark.parametrize("compile_cost", [0, 50, 700, 5000, 10 ** 6])
def test_the_planned_widths_cost_least_of_every_set_of_ladder_widths(compile_cost):
    rng = np.random.default_rng(compile_cost)
    shapes = [(int(rng.integers(1, 9)), int(rng.integers(3, 41))) for _ in range(30)]
    plan = plan_widths(shapes, compile_cost, limit=40)
    ladder = sorted({min(padded_size(w), 40) for w in range(1, 41)})
    widest = min(padded_size(max(w for _, w in shapes)), 40)
    assert max(plan) == widest and set(plan) <= set(ladder)
    best = min(plan_cost(subset + (widest,), shapes, compile_cost)
               for k in range(len(ladder)) for subset in itertools.combinations([w for w in ladder if w < widest], k))
    assert plan_cost(plan, shapes, compile_cost) == best


def test_a_short_run_gets_a_few_coarse_widths_and_a_long_one_the_fine_ladder():
    shapes = [(32, w) for w in range(10, 60)]
    free, costly = plan_widths(shapes, 0, 128), plan_widths(shapes, 10 ** 6, 128)
    assert free == (12, 16, 24, 32, 48, 64) and costly == (64,)
    assert len(plan_widths(shapes, 5000, 128)) < len(plan_widths(shapes * 20, 5000, 128)) <= len(free)
    assert plan_widths([], 5000, 128) == () and plan_widths([(4, 100)], 0, 100) == (100,)


def test_planned_widths_round_trimmed_batches_up_and_batch_shapes_leaves_the_order_alone():
    arrays, labels = make_arrays(max_len=40)
    make = lambda: BatchIterator(arrays, labels, 16, shuffle=True, seed=3, trim=True,  # noqa: E731
                                 sampler=bucket_batch_indices(arrays[2]))
    it, fresh = make(), make()
    shapes = batch_shapes(it)
    assert sorted(shapes) == sorted((len(y), int(X[2].max())) for X, y in fresh)
    assert [y.tolist() for _, y in it] == [y.tolist() for _, y in make()]  # its generator was not advanced
    it.widths = (16, 24)
    for (tokens, segments, valid_lens), _ in it:
        longest = int(valid_lens.max())
        assert tokens.shape[1] == segments.shape[1] == (16 if longest <= 16 else 24 if longest <= 24 else
                                                        min(padded_size(longest), 40))
