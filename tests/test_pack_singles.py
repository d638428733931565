"""Single texts pack as `<cls> a <sep>` (segments 0), as the book's `get_tokens_and_segments(a)`."""
import numpy as np
import pytest

from nlibert.core.packing import SNLIBERTDataset, get_tokens_and_segments, pack_pairs, pack_singles
from nlibert.core.vocab import Vocab
from nlibert.core.wordpiece import WordPieceVocab

RESERVED = ["<pad>", "<mask>", "<cls>", "<sep>"]

TEXTS = ["A man  plays\tthe Guitar", "", "ΟΔΟΣ ΑΣ", " leading and trailing ", "same", "same",
         "a b c d e f g h i j k l m n o p", "word\u3000ideographic\u2028line"]


def reference_pack(texts, vocab, max_len):
    """Per example: the first max_len - 2 words, `get_tokens_and_segments`, padded."""
    ids, segments, lens = [], [], []
    for text in texts:
        tokens, segs = get_tokens_and_segments(text.lower().split()[: max_len - 2])
        ids.append(vocab[tokens] + [vocab["<pad>"]] * (max_len - len(tokens)))
        segments.append(segs + [0] * (max_len - len(segs)))
        lens.append(len(tokens))
    return (np.array(ids, dtype=np.int32).reshape(-1, max_len),
            np.array(segments, dtype=np.int32).reshape(-1, max_len), np.array(lens, dtype=np.int32))


@pytest.mark.parametrize("max_len", [2, 3, 8, 64])
def test_singles_equal_the_per_example_loop(max_len):
    vocab = Vocab([t.lower().split() for t in TEXTS[:4]], reserved_tokens=RESERVED)
    for got, expected in zip(pack_singles(TEXTS, vocab, max_len), reference_pack(TEXTS, vocab, max_len)):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected)


def test_single_layout_by_hand():
    vocab = Vocab([["a", "b"]], reserved_tokens=RESERVED)
    ids, segments, lens = pack_singles(["a zzz b", "b"], vocab, 5)
    assert vocab.to_tokens(ids[0]) == ["<cls>", "a", "<unk>", "b", "<sep>"]
    assert vocab.to_tokens(ids[1]) == ["<cls>", "b", "<sep>", "<pad>", "<pad>"]
    assert segments.tolist() == [[0] * 5, [0] * 5] and lens.tolist() == [5, 3]
    ids, _, lens = pack_singles(["a b a b"], vocab, 4)  # cut to its first 2 tokens
    assert vocab.to_tokens(ids[0]) == ["<cls>", "a", "b", "<sep>"] and lens.tolist() == [4]
    with pytest.raises(ValueError, match="at least 2"):
        pack_singles(["a"], vocab, 1)
    assert [a.shape for a in pack_singles([], vocab, 6)] == [(0, 6), (0, 6), (0,)]


def test_singles_with_wordpiece_use_the_vocabularys_specials():
    vocab = WordPieceVocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "play", "##ing", "guitar"])
    ids, segments, lens = pack_singles(["Playing guitar"], vocab, 6)
    assert vocab.to_tokens(ids[0]) == ["[CLS]", "play", "##ing", "guitar", "[SEP]", "[PAD]"]
    assert segments.tolist() == [[0] * 6] and lens.tolist() == [5]


def test_dataset_of_single_texts():
    vocab = Vocab([["a", "b", "c"]], reserved_tokens=RESERVED)
    ds = SNLIBERTDataset((["a b", "c"], [1, 0]), 6, vocab)
    expected = pack_singles(["a b", "c"], vocab, 6)
    for got, want in zip((ds.all_token_ids, ds.all_segments, ds.valid_lens), expected):
        np.testing.assert_array_equal(got, want)
    assert ds.labels.tolist() == [1, 0] and len(ds.subset([1])) == 1
    built = SNLIBERTDataset((["x y"] * 5, [0] * 5), 6)  # a vocabulary of min_freq 5 from the texts
    assert {"x", "y"} <= set(built.vocab.idx_to_token)


def test_pairs_are_untouched_by_the_single_text_path():
    vocab = Vocab([["a", "b"]], reserved_tokens=RESERVED)
    ids, segments, lens = pack_pairs(["a b"], ["b"], vocab, 7)
    assert vocab.to_tokens(ids[0]) == ["<cls>", "a", "b", "<sep>", "b", "<sep>", "<pad>"]
    assert segments.tolist() == [[0, 0, 0, 0, 1, 1, 0]] and lens.tolist() == [6]
