"""Checkpoints in every installed backend, through the contract's names only (tests/test_backend_model.py's
`BackendTester`): params files, pretrained folders (the book's files plus config.json), sizes read off
a file, the errors that name a key and both shapes, a config.json whose format contradicts the
file, seeded files, classifier folders. What one format alone has (torch's state_dict read the
book's way and DataParallel's keys, MXNet's legacy prefixed names, Gluon's deferred initialisation,
several MXNet devices) stays in tests/test_{torch,mxnet}_only.py; the book's own folders are
tests/test_book_checkpoints.py's.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nlibert.backends import installed_backends
from nlibert.core.config import BERTConfig
from nlibert.core.io import read_json
from nlibert.core.names import expected_shapes

from test_backend_model import BackendTester, batch

SIZES = dict(num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=2, max_len=24)
CONFIG = BERTConfig(vocab_size=40, dropout=0.1, **SIZES)


@pytest.fixture(scope="module", params=installed_backends())
def tester(request) -> BackendTester:
    return BackendTester(request.param)


@pytest.fixture
def pretrained(tester, tmp_path):
    """A tiny pretrained folder saved by the backend, with the model and vocabulary it came from."""
    bert = tester.bert(CONFIG)
    folder = tmp_path / "bert.tiny"
    vocab = tester.save(bert, folder)
    return folder, bert, vocab


def _load(tester, folder, dropout=0.1, **sizes):
    """The contract's `load_pretrained_model` with `SIZES` unless given (None: off the file)."""
    sizes = {**SIZES, **sizes}
    return tester.backend.load_pretrained_model(str(folder), sizes["num_hiddens"], sizes["ffn_num_hiddens"],
                                                sizes["num_heads"], sizes["num_layers"], dropout, sizes["max_len"],
                                                [tester.device])


def _same_outputs(tester, a, b) -> None:
    tokens, segments, lens = batch(B=2, T=9, valid_lens=(9, 6), vocab_size=CONFIG.vocab_size)
    for x, y in zip(tester.outputs(a, tokens, segments, lens), tester.outputs(b, tokens, segments, lens)):
        np.testing.assert_array_equal(x, y)


# --- params files --------------------------------------------------------------------------------

def test_write_then_read_params_round_trips_in_order_and_leaves_no_temporary(tester, tmp_path, rng):
    params = {"b.w": rng.normal(size=(2, 3)).astype(np.float32), "a.b": np.ones(3, np.float32),
              "c.ids": np.arange(5, dtype=np.int32)}
    path = tmp_path / "p.params"
    tester.backend.write_params(params, path)
    got = tester.backend.read_params(path)
    assert set(got) == set(params)
    for key, value in params.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value)
    assert sorted(os.listdir(tmp_path)) == ["p.params"]


def test_read_params_names_the_file_when_it_is_not_a_params_file(tester, tmp_path):
    junk = tmp_path / "junk.params"
    junk.write_bytes(b"\x00not a params file")
    with pytest.raises(ValueError, match="junk.params"):
        tester.backend.read_params(junk)
    with pytest.raises(FileNotFoundError, match="nowhere.params"):
        tester.backend.read_params(tmp_path / "nowhere.params")


# --- pretrained folders ----------------------------------------------------------------------------

def test_save_pretrained_writes_the_book_files_plus_config(tester, pretrained):
    folder, bert, vocab = pretrained
    assert sorted(os.listdir(folder)) == ["config.json", "pretrained.params", "vocab.json"]
    assert read_json(folder / "vocab.json") == vocab.idx_to_token
    assert read_json(folder / "config.json") == {**bert.config.to_dict(), "format": tester.name, "kind": "pretrained"}
    assert list(tester.read(folder / "pretrained.params")) == list(expected_shapes(bert.config))


def test_a_config_whose_format_contradicts_the_file_is_named_with_the_fix(tester, pretrained):
    """Every backend reads every format, so the file's own bytes decide how it is read; a config.json
    that says otherwise is named."""
    folder, _, _ = pretrained
    config = read_json(folder / "config.json")
    other = next(name for name in ("torch", "mxnet") if name != tester.name)
    (folder / "config.json").write_text(json.dumps({**config, "format": other}))
    with pytest.raises(ValueError, match=f"config.json: says format '{other}' but pretrained.params is a "
                                         f"{tester.name} parameter file"):
        _load(tester, folder)


def test_the_same_seed_writes_the_same_file(tester, pretrained, tmp_path):
    folder, _, vocab = pretrained
    again = tmp_path / "again"
    tester.save(tester.bert(CONFIG), again)
    first, second = tester.read(folder / "pretrained.params"), tester.read(again / "pretrained.params")
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_load_pretrained_round_trip_gives_identical_outputs(tester, pretrained):
    folder, bert, vocab = pretrained
    loaded, loaded_vocab = _load(tester, folder)
    assert loaded_vocab.idx_to_token == vocab.idx_to_token
    _same_outputs(tester, bert, loaded)


def test_load_pretrained_honours_dropout(tester, pretrained):
    folder, _, _ = pretrained
    assert _load(tester, folder, dropout=0.3)[0].config.dropout == 0.3


def test_a_size_the_file_contradicts_names_the_key_and_both_shapes(tester, pretrained):
    folder, _, _ = pretrained
    with pytest.raises(ValueError) as error:
        _load(tester, folder, ffn_num_hiddens=64)
    message = str(error.value)
    assert "ffn.dense1.weight" in message and "pretrained.params" in message
    assert "(32, 16)" in message and "(64, 16)" in message


def test_too_many_layers_reports_the_missing_keys(tester, pretrained):
    folder, _, _ = pretrained
    with pytest.raises(ValueError, match=r"encoder\.blks\.2\.attention\.W_q\.weight"):
        _load(tester, folder, num_layers=3)


def test_a_vocab_that_disagrees_with_the_embedding_is_an_error(tester, pretrained):
    folder, _, _ = pretrained
    (folder / "vocab.json").write_text('["<unk>", "a", "b"]')
    with pytest.raises(ValueError, match=r"encoder\.token_embedding\.weight"):
        _load(tester, folder)


def test_sizes_none_are_read_from_the_file_with_or_without_config(tester, pretrained):
    folder, bert, _ = pretrained
    none = dict.fromkeys(SIZES)
    loaded, _ = _load(tester, folder, dropout=None, **none)
    assert loaded.config == bert.config  # heads and dropout from config.json, the rest off the tensors
    _same_outputs(tester, bert, loaded)
    os.remove(folder / "config.json")  # the book's layout: the format from the file's bytes
    loaded, _ = _load(tester, folder, **{**none, "num_heads": 2})
    assert loaded.config == bert.config
    _same_outputs(tester, bert, loaded)


# --- classifier folders ---------------------------------------------------------------------------

def test_classifier_round_trip(tester, pretrained, tmp_path):
    _, bert, vocab = pretrained
    net = tester.classifier(bert)
    folder = tmp_path / "classifier"
    tester.backend.save_classifier(net, vocab, None, folder)
    assert sorted(os.listdir(folder)) == ["classifier.params", "config.json", "vocab.json"]
    assert list(tester.read(folder / "classifier.params")) == list(expected_shapes(bert.config, "classifier"))
    assert read_json(folder / "config.json")["kind"] == "classifier"
    loaded, loaded_vocab, config = tester.backend.load_classifier(folder, [tester.device])
    assert config == bert.config and loaded_vocab.idx_to_token == vocab.idx_to_token
    tokens, segments, lens = batch(B=2, T=9, valid_lens=(9, 6), vocab_size=CONFIG.vocab_size)
    np.testing.assert_array_equal(tester.logits(loaded, tokens, segments, lens), tester.logits(net, tokens, segments, lens))


def test_load_classifier_refuses_a_pretrained_folder(tester, pretrained):
    folder, _, _ = pretrained
    with pytest.raises(ValueError, match="expected a classifier"):
        tester.backend.load_classifier(folder, [tester.device])
