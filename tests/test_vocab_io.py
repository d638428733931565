import json
import os

import pytest

from nlibert.core.config import BERTConfig
from nlibert.core.io import atomic_write, read_json, write_json
from nlibert.core.vocab import Vocab, load_vocab, save_vocab, tokenize


def test_tokenize_word_and_char():
    assert tokenize(["a b  c", ""]) == [["a", "b", "c"], []]
    assert tokenize(["ab"], "char") == [["a", "b"]]
    with pytest.raises(ValueError, match="unknown token type"):
        tokenize(["a"], "bpe")


def test_vocab_book_order_unk_first_reserved_then_frequency_ties_first_seen():
    tokens = [["b", "a", "c"], ["a", "c", "d"], ["a"]]
    vocab = Vocab(tokens, min_freq=2, reserved_tokens=["<pad>", "<cls>"])
    # a:3, then c:2 (ties keep first-seen order: b,c,d have 1,2,1); b and d fall below min_freq
    assert vocab.idx_to_token == ["<unk>", "<pad>", "<cls>", "a", "c"]
    assert vocab.unk == 0 and vocab["zzz"] == 0
    assert vocab[["a", ["c", "b"]]] == [3, [4, 0]]
    assert vocab.to_tokens([3, 4]) == ["a", "c"]
    assert vocab.token_freqs[0] == ("a", 3)


def test_vocab_json_round_trip_and_errors(tmp_path):
    vocab = Vocab([["x", "y", "x"]], reserved_tokens=["<pad>"])
    path = tmp_path / "vocab.json"
    save_vocab(vocab, path)
    assert json.loads(path.read_text()) == vocab.idx_to_token
    assert load_vocab(path).token_to_idx == vocab.token_to_idx
    (tmp_path / "dup.json").write_text(json.dumps(["<unk>", "a", "a"]))
    with pytest.raises(ValueError, match=r"dup.json.*'a' appears at 1 and 2"):
        load_vocab(tmp_path / "dup.json")
    (tmp_path / "nounk.json").write_text(json.dumps(["a"]))
    with pytest.raises(ValueError, match="no '<unk>'"):
        load_vocab(tmp_path / "nounk.json")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ValueError, match="obj.json: expected a JSON list"):
        load_vocab(tmp_path / "obj.json")


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("new, half written")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temp file left behind
    write_json(path, {"a": 1})
    assert read_json(path) == {"a": 1}
    path.write_text("{broken")
    with pytest.raises(ValueError, match="f.txt: not valid JSON"):
        read_json(path)


def test_config_round_trip_and_checks():
    cfg = BERTConfig(vocab_size=100, num_hiddens=32, num_heads=4)
    d = cfg.to_dict() | {"format": "torch", "kind": "pretrained"}
    assert BERTConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="not divisible"):
        BERTConfig(vocab_size=10, num_hiddens=30, num_heads=4)
    with pytest.raises(KeyError, match="vocab_size"):
        BERTConfig.from_dict({"num_hiddens": 8})
