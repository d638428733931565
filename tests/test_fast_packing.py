"""The fast packer on awkward text, and the disk cache of packed SNLI files."""
import os

import numpy as np
import pytest

from nlibert.core import packed_cache, packing
from nlibert.core.packed_cache import load_packed_snli, packed_cache_key
from nlibert.core.packing import SNLIBERTDataset, pack_pairs, truncated_lengths
from nlibert.core.snli import read_snli_file
from nlibert.core.vocab import Vocab

RESERVED = ["<pad>", "<mask>", "<cls>", "<sep>"]


def book_pack(premises, hypotheses, vocab, max_len, rule="book"):
    """The chapter's per-example loop (truncation lengths from the rule, the rest written out)."""
    ids, segs, lens = [], [], []
    for premise, hypothesis in zip(premises, hypotheses):
        p, h = premise.lower().split(), hypothesis.lower().split()
        kp, kh = truncated_lengths(np.array([len(p)]), np.array([len(h)]), max_len, rule)
        p, h = p[:int(kp[0])], h[:int(kh[0])]
        tokens = ["<cls>"] + p + ["<sep>"] + h + ["<sep>"]
        ids.append(vocab[tokens] + [vocab["<pad>"]] * (max_len - len(tokens)))
        segs.append([0] * (len(p) + 2) + [1] * (len(h) + 1) + [0] * (max_len - len(tokens)))
        lens.append(len(tokens))
    return (np.array(ids, dtype=np.int32).reshape(-1, max_len), np.array(segs, dtype=np.int32).reshape(-1, max_len),
            np.array(lens, dtype=np.int32))


AWKWARD = [
    ("A man  plays\tthe Guitar", "Someone\u00a0makes music"),  # double space, tab, no-break space
    ("", "an empty premise"),
    ("ΟΔΟΣ ΑΣ", "ΣΑΣ σ"),  # Greek capital sigma lower-cases by context
    (" leading and trailing ", "x"),
    ("İstanbul ÉCOLE", "word\u3000ideographic\u2028line"),
    ("one", ""),
    ("a b c d e f g h i j k l m n o p", "q r s t u v w x y z"),  # truncated at small max_len
]


@pytest.mark.parametrize("rule", ["book", "proportional"])
@pytest.mark.parametrize("max_len", [8, 12, 64])
def test_fast_packer_equals_the_book_loop_on_awkward_text(rule, max_len):
    premises, hypotheses = [p for p, _ in AWKWARD] * 3, [h for _, h in AWKWARD] * 3
    vocab = Vocab([s.lower().split() for s in premises[:5] + hypotheses[:5]], reserved_tokens=RESERVED)
    expected = book_pack(premises, hypotheses, vocab, max_len, rule)
    for got in (pack_pairs(premises, hypotheses, vocab, max_len, truncation=rule),
                packing._pack_tokenized(packing._tokenize_lower(premises), packing._tokenize_lower(hypotheses),
                                        vocab, max_len, rule)):
        for e, g in zip(expected, got):
            assert g.dtype == np.int32
            np.testing.assert_array_equal(g, e)


def test_fast_packer_on_normalised_text_takes_the_counting_shortcut_and_agrees():
    premises = ["a man is playing", "two dogs run", "it rains"] * 50
    hypotheses = ["someone plays", "animals move fast", "wet"] * 50
    vocab = Vocab([s.split() for s in premises + hypotheses], reserved_tokens=RESERVED)
    lengths, flat = packing._split_side(premises)
    assert lengths.tolist()[:3] == [4, 3, 2] and len(flat) == lengths.sum()
    for e, g in zip(book_pack(premises, hypotheses, vocab, 6), pack_pairs(premises, hypotheses, vocab, 6)):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("max_len", [8, 64])
def test_premises_repeated_on_consecutive_rows_are_packed_once_and_equal_the_book(max_len):
    # SNLI's layout: each premise on the rows of its three hypotheses (and awkward text, too).
    premises = [p for p, _ in AWKWARD for _ in range(3)]
    hypotheses = [f"{h} {i}" for _, h in AWKWARD for i in range(3)]
    vocab = Vocab([s.lower().split() for s in premises + hypotheses], reserved_tokens=RESERVED)
    lengths, ids = packing._side_ids(premises, vocab)
    assert lengths.tolist() == [len(p.split()) for p in premises]
    assert ids.tolist() == vocab[[t for p in premises for t in p.lower().split()]]
    for e, g in zip(book_pack(premises, hypotheses, vocab, max_len), pack_pairs(premises, hypotheses, vocab, max_len)):
        np.testing.assert_array_equal(g, e)


def test_packing_leaves_the_garbage_collector_as_it_found_it():
    import gc
    vocab = Vocab([["a"]], reserved_tokens=RESERVED)
    assert gc.isenabled()
    pack_pairs(["a"], ["a"], vocab, 8)
    assert gc.isenabled()
    gc.disable()
    try:
        pack_pairs(["a"], ["a"], vocab, 8)
        assert not gc.isenabled()
    finally:
        gc.enable()


# --- the cache -------------------------------------------------------------------------------------

HEADER = "gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tx\n"


def write_snli(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.write(HEADER)
        for label, p, h in rows:
            f.write(f"{label}\t( {p} )\t( {h} )\tz\n")
    return path


ROWS = [("entailment", "a man plays a guitar", "a person makes music"),
        ("-", "no gold label", "dropped"),
        ("contradiction", "a dog sleeps", "the dog runs fast in the park"),
        ("neutral", "kids play outside", "kids play soccer")] * 5


@pytest.fixture
def vocab():
    words = "a man plays guitar person makes music dog sleeps the runs fast in park kids play outside soccer"
    return Vocab([words.split()], reserved_tokens=RESERVED)


def arrays_of(ds):
    return ds.all_token_ids, ds.all_segments, ds.valid_lens, ds.labels


def test_a_cache_hit_returns_identical_arrays_without_reading_the_file(tmp_path, vocab, monkeypatch):
    source = write_snli(tmp_path / "snli_1.0_dev.txt", ROWS)
    cache = tmp_path / "cache"
    first = load_packed_snli(source, vocab, 16, cache_dir=cache)
    assert first.cache_hit is False and os.path.exists(first.cache_path)
    expected = SNLIBERTDataset(read_snli_file(source), 16, vocab)
    assert len(first) == 15
    for a, b in zip(arrays_of(first), arrays_of(expected)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)

    import nlibert.core.snli as snli

    def no_reading(*args, **kwargs):
        raise AssertionError("a cache hit must not read the text file")

    monkeypatch.setattr(snli, "read_snli_file", no_reading)
    again = load_packed_snli(source, vocab, 16, cache_dir=cache)
    assert again.cache_hit is True and again.cache_path == first.cache_path
    for a, b in zip(arrays_of(again), arrays_of(expected)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in cache.iterdir()] == [os.path.basename(first.cache_path)]  # no temp files left


def test_anything_that_determines_the_arrays_changes_the_key(tmp_path, vocab):
    source = write_snli(tmp_path / "snli_1.0_dev.txt", ROWS)
    cache = tmp_path / "cache"
    base = load_packed_snli(source, vocab, 16, cache_dir=cache)
    key = packed_cache_key(source, vocab, 16)
    assert {"source_sha1", "source_size", "vocab_sha1", "max_len", "truncation", "version"} <= set(key)

    other_len = load_packed_snli(source, vocab, 8, cache_dir=cache)
    assert other_len.cache_hit is False and other_len.all_token_ids.shape[1] == 8
    other_rule = load_packed_snli(source, vocab, 8, truncation="proportional", cache_dir=cache)
    assert other_rule.cache_hit is False
    bigger = Vocab.from_idx_to_token(vocab.idx_to_token + ["extra"])
    assert load_packed_snli(source, bigger, 16, cache_dir=cache).cache_hit is False
    reordered = Vocab.from_idx_to_token(vocab.idx_to_token[:5] + vocab.idx_to_token[5:][::-1])
    changed_ids = load_packed_snli(source, reordered, 16, cache_dir=cache)
    assert changed_ids.cache_hit is False
    assert not np.array_equal(changed_ids.all_token_ids, base.all_token_ids)

    # Same size, same mtime, different content: still a miss (the key reads the content).
    stat = os.stat(source)
    text = source.read_text(encoding="utf-8").replace("a dog sleeps", "a cat sleeps")
    source.write_text(text, encoding="utf-8")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = load_packed_snli(source, vocab, 16, cache_dir=cache)
    assert edited.cache_hit is False
    assert not np.array_equal(edited.all_token_ids, base.all_token_ids)
    assert load_packed_snli(source, vocab, 16, cache_dir=cache).cache_hit is True
    with pytest.raises(ValueError, match="truncation"):
        packed_cache_key(source, vocab, 16, truncation="middle")


def test_a_damaged_entry_is_rebuilt(tmp_path, vocab):
    source = write_snli(tmp_path / "snli_1.0_dev.txt", ROWS)
    first = load_packed_snli(source, vocab, 16, cache_dir=tmp_path)
    with open(first.cache_path, "wb") as f:
        f.write(b"not a zip file")
    rebuilt = load_packed_snli(source, vocab, 16, cache_dir=tmp_path)
    assert rebuilt.cache_hit is False
    for a, b in zip(arrays_of(rebuilt), arrays_of(first)):
        np.testing.assert_array_equal(a, b)
    assert load_packed_snli(source, vocab, 16, cache_dir=tmp_path).cache_hit is True


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NLIBERT_CACHE", str(tmp_path / "c"))
    assert packed_cache.default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("NLIBERT_CACHE")
    assert packed_cache.default_cache_dir().endswith(os.path.join(".cache", "nlibert", "packed"))


def test_subset_and_from_arrays(vocab):
    ds = SNLIBERTDataset((["a man", "a dog", "kids play"], ["a person", "the dog", "kids"], [0, 1, 2]), 8, vocab)
    sub = ds.subset([2, 0])
    assert len(sub) == 2 and sub.labels.tolist() == [2, 0]
    np.testing.assert_array_equal(sub.all_token_ids, ds.all_token_ids[[2, 0]])
    assert sub.vocab is vocab and sub.max_len == 8
    with pytest.raises(ValueError, match="differ in length"):
        SNLIBERTDataset.from_arrays(ds.all_token_ids, ds.all_segments, ds.valid_lens, ds.labels[:2], vocab, 8)


def test_cache_on_the_real_dev_file(shared_data, tmp_path):
    source = shared_data / "snli_1.0" / "snli_1.0_dev.txt"
    data = read_snli_file(source)
    vocab = Vocab([s.lower().split() for s in data[0] + data[1]], min_freq=5, reserved_tokens=RESERVED)
    packed = load_packed_snli(source, vocab, 128, cache_dir=tmp_path)
    reloaded = load_packed_snli(source, vocab, 128, cache_dir=tmp_path)
    assert (packed.cache_hit, reloaded.cache_hit) == (False, True) and len(reloaded) == 9842
    # Only the valid positions are stored: far less than the padded arrays.
    assert os.path.getsize(packed.cache_path) < 0.3 * (packed.all_token_ids.nbytes + packed.all_segments.nbytes)
    for a, b in zip(arrays_of(reloaded), arrays_of(SNLIBERTDataset(data, 128, vocab))):
        np.testing.assert_array_equal(a, b)
