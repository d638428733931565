"""Packing equals the book's per-example loop, element for element, on the whole SNLI dev file."""
import itertools

import numpy as np
import pytest

from nlibert.core.packing import (SNLIBERTDataset, get_tokens_and_segments, pack_pairs,
                                  truncate_pair_of_tokens, truncated_lengths)
from nlibert.core.snli import read_snli_split
from nlibert.core.vocab import Vocab

RESERVED = ["<pad>", "<mask>", "<cls>", "<sep>"]


def book_pack(premises, hypotheses, vocab, max_len):
    """A plain re-implementation of the chapter's SNLIBERTDataset._mp_worker loop."""
    all_ids, all_segs, all_lens = [], [], []
    for premise, hypothesis in zip(premises, hypotheses):
        p, h = premise.lower().split(), hypothesis.lower().split()
        while len(p) + len(h) > max_len - 3:
            if len(p) > len(h):
                p.pop()
            else:
                h.pop()
        tokens = ["<cls>"] + p + ["<sep>"] + h + ["<sep>"]
        segments = [0] * (len(p) + 2) + [1] * (len(h) + 1)
        all_ids.append(vocab[tokens] + [vocab["<pad>"]] * (max_len - len(tokens)))
        all_segs.append(segments + [0] * (max_len - len(segments)))
        all_lens.append(len(tokens))
    return (np.array(all_ids, dtype=np.int32), np.array(all_segs, dtype=np.int32),
            np.array(all_lens, dtype=np.int32))


@pytest.fixture(scope="module")
def dev(shared_data):
    return read_snli_split(shared_data / "snli_1.0", "dev")


@pytest.fixture(scope="module")
def dev_vocab(dev):
    tokens = [s.lower().split() for s in dev[0] + dev[1]]
    return Vocab(tokens, min_freq=5, reserved_tokens=RESERVED)


@pytest.mark.parametrize("max_len", [128, 16, 9])
def test_pack_pairs_matches_book_loop_on_dev(dev, dev_vocab, max_len):
    expected = book_pack(dev[0], dev[1], dev_vocab, max_len)
    got = pack_pairs(dev[0], dev[1], dev_vocab, max_len)
    for e, g in zip(expected, got):
        assert g.dtype == np.int32
        np.testing.assert_array_equal(g, e)
    if max_len == 16:  # truncation really happened on many pairs
        assert (got[2] == 16).sum() > 1000


def test_dataset_builds_vocab_like_the_book(dev):
    ds = SNLIBERTDataset(dev, 32)
    vocab = Vocab([s.lower().split() for s in dev[0] + dev[1]], min_freq=5, reserved_tokens=RESERVED)
    assert ds.vocab.idx_to_token == vocab.idx_to_token
    assert len(ds) == 9842 and ds.labels.dtype == np.int64 and ds.valid_lens.dtype == np.int32
    (ids, segs, valid_len), label = ds[5]
    assert ids.shape == segs.shape == (32,)
    assert ids[0] == vocab["<cls>"] and ids[valid_len - 1] == vocab["<sep>"]
    assert label == dev[2][5]


def test_dataset_is_quiet_by_default_and_prints_when_asked(capsys):
    data = (["a b c"], ["d e"], [0])
    vocab = Vocab([["a", "b", "c", "d", "e"]], reserved_tokens=RESERVED)
    SNLIBERTDataset(data, 10, vocab)
    assert capsys.readouterr().out == ""
    SNLIBERTDataset(data, 10, vocab, verbose=True)
    assert capsys.readouterr().out == "read 1 examples\n"


def test_get_tokens_and_segments():
    assert get_tokens_and_segments(["a", "b"]) == (["<cls>", "a", "b", "<sep>"], [0, 0, 0, 0])
    tokens, segs = get_tokens_and_segments(["a"], ["b", "c"])
    assert tokens == ["<cls>", "a", "<sep>", "b", "c", "<sep>"]
    assert segs == [0, 0, 0, 1, 1, 1]


def book_truncate(p, h, max_len):
    p, h = list(p), list(h)
    while len(p) + len(h) > max_len - 3:
        if len(p) > len(h):
            p.pop()
        else:
            h.pop()
    return p, h


def test_book_closed_form_equals_the_pop_loop_exhaustively():
    for lp, lh, max_len in itertools.product(range(0, 14), range(0, 14), range(3, 20)):
        p, h = [f"p{i}" for i in range(lp)], [f"h{i}" for i in range(lh)]
        assert truncate_pair_of_tokens(p, h, max_len) == book_truncate(p, h, max_len), (lp, lh, max_len)


def test_truncation_does_not_mutate_inputs():
    p, h = list("abcdefg"), list("xyz")
    truncate_pair_of_tokens(p, h, 6, rule="book")
    truncate_pair_of_tokens(p, h, 6, rule="proportional")
    assert p == list("abcdefg") and h == list("xyz")


def test_proportional_truncation_properties():
    lp, lh = np.meshgrid(np.arange(0, 60), np.arange(0, 60), indexing="ij")
    lp, lh = lp.ravel(), lh.ravel()
    for max_len in (3, 4, 5, 8, 16, 33):
        budget = max_len - 3
        kp, kh = truncated_lengths(lp, lh, max_len, rule="proportional")
        fits = lp + lh <= budget
        # Pairs that fit are untouched; the others fill the budget exactly, never growing a side.
        assert np.array_equal(kp[fits], lp[fits]) and np.array_equal(kh[fits], lh[fits])
        assert np.all(kp[~fits] + kh[~fits] == budget)
        assert np.all((kp <= lp) & (kh <= lh) & (kp >= 0) & (kh >= 0))
        # Each non-empty side keeps a token when the budget allows it.
        both = ~fits & (lp > 0) & (lh > 0)
        if budget >= 2:
            assert np.all(kp[both] >= 1) and np.all(kh[both] >= 1)
        # Shares follow the lengths: within one token of the exact proportion (except the clamp).
        exact = budget * lp[~fits] / (lp[~fits] + lh[~fits])
        assert np.all(np.abs(kp[~fits] - exact) <= 1.0)
    # Worked examples of the rounding (round half up, premise side).
    prop = dict(rule="proportional")
    assert truncate_pair_of_tokens(list("aaaaaa"), list("bb"), 7, **prop) == (list("aaa"), list("b"))
    assert truncate_pair_of_tokens(list("aaa"), list("bbb"), 6, **prop) == (list("aa"), list("b"))  # 1.5 -> 2
    assert truncate_pair_of_tokens(list("a" * 30), list("b"), 8, **prop) == (list("aaaa"), list("b"))  # clamp
    assert truncate_pair_of_tokens(list("aa"), list("bb"), 4, **prop) == (list("a"), [])  # one slot, tie
    # The longer side keeps more under 'proportional', the book's rule evens them out instead.
    assert truncate_pair_of_tokens(list("a" * 20), list("b" * 10), 15, rule="proportional") == (
        list("a" * 8), list("b" * 4))
    assert truncate_pair_of_tokens(list("a" * 20), list("b" * 10), 15, rule="book") == (
        list("a" * 6), list("b" * 6))


def test_pack_pairs_proportional_layout():
    vocab = Vocab([list("abcdefxyz")], reserved_tokens=RESERVED)
    ids, segs, lens = pack_pairs(["A B C D E F"], ["x y z"], vocab, 9, truncation="proportional")
    assert vocab.to_tokens(ids[0]) == ["<cls>", "a", "b", "c", "d", "<sep>", "x", "y", "<sep>"]
    assert segs[0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1] and lens.tolist() == [9]


def test_pack_pairs_unknown_tokens_padding_and_errors():
    vocab = Vocab([["a", "b"]], reserved_tokens=RESERVED)
    ids, segs, lens = pack_pairs(["a zzz", ""], ["b", "a b"], vocab, 8)
    assert vocab.to_tokens(ids[0]) == ["<cls>", "a", "<unk>", "<sep>", "b", "<sep>", "<pad>", "<pad>"]
    assert vocab.to_tokens(ids[1][:5]) == ["<cls>", "<sep>", "a", "b", "<sep>"]
    assert segs[1].tolist() == [0, 0, 1, 1, 1, 0, 0, 0] and lens.tolist() == [6, 5]
    with pytest.raises(ValueError, match="max_len"):
        pack_pairs(["a"], ["b"], vocab, 2)
    with pytest.raises(ValueError, match="truncation rule"):
        pack_pairs(["a"], ["b"], vocab, 8, truncation="middle")
    with pytest.raises(ValueError, match="<cls>"):
        pack_pairs(["a"], ["b"], Vocab([["a"]], reserved_tokens=["<pad>"]), 8)
    empty = pack_pairs([], [], vocab, 8)
    assert [a.shape for a in empty] == [(0, 8), (0, 8), (0,)]
