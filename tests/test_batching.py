"""Batch order, coverage, reproducibility and trimming; the fast path's length-bucketing sampler, trimming
to a multiple, and the widths planned by cost."""
import itertools

import numpy as np
import pytest

from nlibert.core.batching import (BatchIterator, batch_indices, batch_shapes, bucket_batch_indices, padded_size,
                                   plan_widths)
from nlibert.core.packing import SNLIBERTDataset
from nlibert.core.vocab import Vocab


def make_arrays(n=53, max_len=12, seed=0):
    rng = np.random.default_rng(seed)
    valid_lens = rng.integers(3, max_len + 1, size=n).astype(np.int32)
    columns = np.arange(max_len)
    token_ids = np.where(columns < valid_lens[:, None], rng.integers(5, 50, size=(n, max_len)), 1).astype(np.int32)
    segments = ((columns >= 2) & (columns < valid_lens[:, None])).astype(np.int32)
    labels = np.arange(n, dtype=np.int64)  # label = example index, so batches can be traced back
    return (token_ids, segments, valid_lens), labels


def test_batch_indices_sequential_and_shuffled():
    batches = batch_indices(10, 4, shuffle=False, rng=None)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(b.dtype == np.int64 for b in batches)
    shuffled = batch_indices(10, 4, shuffle=True, rng=np.random.default_rng(0))
    assert [len(b) for b in shuffled] == [4, 4, 2]
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(10))
    assert np.concatenate(shuffled).tolist() != list(range(10))
    assert batch_indices(0, 4, False, None) == []
    with pytest.raises(ValueError):
        batch_indices(10, 0, False, None)


def test_every_pass_covers_all_examples_once():
    arrays, labels = make_arrays()
    it = BatchIterator(arrays, labels, 8, shuffle=True, seed=1)
    assert len(it) == 7
    for _ in range(3):
        batches = list(it)
        assert len(batches) == len(it)
        seen = np.concatenate([y for _, y in batches])
        assert sorted(seen.tolist()) == list(range(53))
        for (ids, segs, vls), y in batches:  # rows travel together with their labels
            np.testing.assert_array_equal(ids, arrays[0][y])
            np.testing.assert_array_equal(segs, arrays[1][y])
            np.testing.assert_array_equal(vls, arrays[2][y])


def order_of_passes(it, passes=3):
    return [np.concatenate([y for _, y in it]).tolist() for _ in range(passes)]


def test_shuffle_is_reproducible_by_seed_and_differs_across_passes():
    arrays, labels = make_arrays()
    first = order_of_passes(BatchIterator(arrays, labels, 8, shuffle=True, seed=7))
    again = order_of_passes(BatchIterator(arrays, labels, 8, shuffle=True, seed=7))
    other = order_of_passes(BatchIterator(arrays, labels, 8, shuffle=True, seed=8))
    assert first == again
    assert first != other
    assert first[0] != first[1] != first[2]


def test_no_shuffle_keeps_file_order():
    arrays, labels = make_arrays()
    assert order_of_passes(BatchIterator(arrays, labels, 10), 2) == [list(range(53))] * 2


def test_trim_cuts_each_batch_to_its_longest_sequence():
    arrays, labels = make_arrays()
    full = list(BatchIterator(arrays, labels, 8, shuffle=True, seed=3))
    trimmed = list(BatchIterator(arrays, labels, 8, shuffle=True, seed=3, trim=True))
    assert any(t[0][0].shape[1] < 12 for t in trimmed)
    for ((ids, segs, vls), y), ((tids, tsegs, tvls), ty) in zip(full, trimmed):
        width = int(vls.max())
        assert tids.shape == (len(y), width) and tsegs.shape == (len(y), width)
        assert tids.flags.c_contiguous and tsegs.flags.c_contiguous
        np.testing.assert_array_equal(tids, ids[:, :width])
        np.testing.assert_array_equal(tsegs, segs[:, :width])
        assert np.all(ids[:, width:] == 1)  # only padding was cut
        np.testing.assert_array_equal(tvls, vls)
        np.testing.assert_array_equal(ty, y)


def test_custom_sampler_plugs_in():
    arrays, labels = make_arrays()
    valid_lens = arrays[2]

    def by_length(num_examples, batch_size, shuffle, rng):
        order = np.argsort(valid_lens, kind="stable")
        return [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]

    it = BatchIterator(arrays, labels, 16, sampler=by_length, trim=True)
    assert len(it) == 4
    widths = [ids.shape[1] for (ids, _, _), _ in it]
    assert widths == sorted(widths)


def test_from_dataset_and_validation():
    vocab = Vocab([["a", "b", "c"]], reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])
    data = (["a b", "c", "a a a"], ["b", "c c", "a"], [0, 1, 2])
    ds = SNLIBERTDataset(data, 8, vocab)
    batches = list(BatchIterator.from_dataset(ds, 2))
    assert [y.tolist() for _, y in batches] == [[0, 1], [2]]
    (ids, segs, vls), _ = batches[0]
    assert ids.dtype == segs.dtype == vls.dtype == np.int32 and ids.shape == (2, 8)
    with pytest.raises(ValueError, match="differ in length"):
        BatchIterator((ds.all_token_ids, ds.all_segments, ds.valid_lens), ds.labels[:2], 2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator.from_dataset(ds, 0)


# The fast path's sampler: length buckets over 203 examples of up to 40 tokens.
@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("multiple", [1, 8])
def test_every_pass_covers_every_example_exactly_once(window, multiple):
    arrays, labels = make_arrays(203, 40)
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
    arrays, labels = make_arrays(600, 40)
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
    arrays, labels = make_arrays(203, 40)

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
    arrays, labels = make_arrays(203, 40)
    it = BatchIterator(arrays, labels, 16, shuffle=False, sampler=bucket_batch_indices(arrays[2]), trim=True)
    first = [y.tolist() for _, y in it]
    assert first == [y.tolist() for _, y in it]
    order = np.concatenate(first)
    assert np.all(np.diff(arrays[2][order]) >= 0)
    assert order.tolist() == np.argsort(arrays[2], kind="stable").tolist()


def test_pad_multiple_rounds_widths_up_but_never_past_the_packed_width():
    arrays, labels = make_arrays(203, 37)
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
    arrays, labels = make_arrays(100, 40)
    for window, shuffle in ((None, True), (2, True), (3, False)):
        sampler = bucket_batch_indices(arrays[2], window=window)
        it = BatchIterator(arrays, labels, 16, shuffle=shuffle, seed=3, sampler=sampler)
        state = it._rng.bit_generator.state
        n = len(it)
        assert it._rng.bit_generator.state == state
        assert n == len(list(it))


def test_bad_arguments():
    arrays, labels = make_arrays(10, 40)
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
    arrays, labels = make_arrays(203, 40)
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



def test_template_batches_are_the_next_passs_shapes_in_order_with_the_arrays_types():
    """`template_batches`: a zero batch of each shape the next pass yields, in the order they first
    come, typed as the iterator's arrays; asking advances nothing; a Progress bar around the
    iterator is looked through; any other iterable gives none."""
    from nlibert.core.batching import template_batches
    from nlibert.core.progress import Progress
    arrays, labels = make_arrays(203, 40)
    make = lambda: BatchIterator(arrays, labels, 16, shuffle=True, seed=5, trim=True,  # noqa: E731
                                 sampler=bucket_batch_indices(arrays[2]), widths=(16, 24))
    it, twin = make(), make()
    for iterator in (it, twin):
        next(iter(iterator))  # a pass under way: the templates are of the next one
    templates = template_batches(Progress(it, enabled=False))
    passed = [(X[0].shape, y.tolist()) for X, y in it]
    shapes = [shape for shape, _ in passed]
    assert [X[0].shape for X, _ in templates] == list(dict.fromkeys(shapes))  # first-come order, no repeats
    assert len(templates) > 2 and len(shapes) > len(templates)
    assert [(X[0].shape, y.tolist()) for X, y in twin] == passed  # the twin, never asked: nothing was advanced
    (tokens, segments, valid_lens), y = templates[0]
    assert (tokens.dtype, segments.dtype, valid_lens.dtype, y.dtype) == \
        (arrays[0].dtype, arrays[1].dtype, arrays[2].dtype, labels.dtype)
    assert not tokens.any() and len(valid_lens) == len(y) == tokens.shape[0]
    assert template_batches([((arrays[0][:2], arrays[1][:2], arrays[2][:2]), labels[:2])]) == []


def test_the_epoch_loop_hands_the_step_its_templates_once_before_the_first_step():
    """`train_epochs` calls `step.compile_ahead` with the templates of the training iterator (seen
    through its Progress bar) and of the validation and test iterators, before the first step and
    only then; a run with no epoch left asks for nothing."""
    from nlibert.core.batching import template_batches
    from nlibert.core.progress import Progress
    from nlibert.core.training import LoopState, train_epochs
    arrays, labels = make_arrays(40, 12)
    make = lambda shuffle: BatchIterator(arrays, labels, 8, shuffle=shuffle, seed=1, trim=True,  # noqa: E731
                                         sampler=bucket_batch_indices(arrays[2]))
    events = []

    class Step:
        learning_rate = 0.1

        def compile_ahead(self, train_batches, eval_batches):
            events.append(("ahead", [X[0].shape for X, _ in train_batches], [X[0].shape for X, _ in eval_batches]))

        def __call__(self, features, labels):
            events.append("step")
            return 0.0, 0.0

        def read(self, sums):
            return 1.0, 1.0

        def evaluate(self, data_iter):
            return 0.5

        def reseed(self, seed):
            pass

    train, test, valid = make(True), make(False), make(False)
    expected = ("ahead", [X[0].shape for X, _ in template_batches(train)],
                [X[0].shape for it in (valid, test) for X, _ in template_batches(it)])
    train_epochs(Step(), Progress(train, enabled=False), test, 2, verbose=False, valid_iter=valid)
    assert events[0] == expected and events[1:] == ["step"] * (2 * len(train))
    events.clear()
    train_epochs(Step(), train, test, 2, verbose=False, state=LoopState(epoch=3))
    assert events == []
