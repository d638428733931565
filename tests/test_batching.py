"""Batch order, coverage, reproducibility and trimming."""
import numpy as np
import pytest

from nlibert.core.batching import BatchIterator, batch_indices
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
