"""MXNet checkpoints: the book's folder layout, exact round trips, legacy prefixed names, clear errors."""
import json
import os

import numpy as onp
import pytest

from needs import require_backend

require_backend("mxnet")
import mxnet as mx  # noqa: E402
from mxnet import np, npx  # noqa: E402

from nlibert.backends.mxnet import (BERTClassifier, BERTModel, load_pretrained_model,  # noqa: E402
                                    read_params, save_classifier, save_pretrained, set_seed, write_params)
from nlibert.core.vocab import Vocab  # noqa: E402

npx.set_np()

SIZES = dict(num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=2, dropout=0.0, max_len=20)
TOKENS = np.array([[2, 5, 6, 3, 7, 8, 3, 0], [2, 9, 3, 10, 3, 0, 0, 0]], dtype="int32")
SEGMENTS = np.array([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0, 0]], dtype="int32")
VALID_LENS = np.array([7.0, 5.0])


@pytest.fixture
def vocab():
    return Vocab([["a", "b", "c", "d", "e", "f", "g"]], reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])


@pytest.fixture
def pretrained(tmp_path, vocab):
    """A saved, seeded, never-explicitly-initialised tiny BERT (save_pretrained initialises it)."""
    set_seed(0)
    bert = BERTModel(len(vocab), **SIZES)
    folder = tmp_path / "bert"
    save_pretrained(bert, vocab, folder)
    return bert, folder


def _outputs(bert):
    encoded, _, nsp = bert(TOKENS, SEGMENTS, VALID_LENS)
    return encoded.asnumpy(), nsp.asnumpy()


def test_save_pretrained_writes_the_books_folder_with_xavier_init(pretrained, vocab):
    bert, folder = pretrained
    assert sorted(os.listdir(folder)) == ["config.json", "pretrained.params", "vocab.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config == {"vocab_size": len(vocab), **SIZES, "hidden_act": "relu", "layer_norm_eps": 1e-5,
                      "embedding_norm": False, "attention_dropout": None, "format": "mxnet", "kind": "pretrained"}
    assert json.loads((folder / "vocab.json").read_text()) == vocab.idx_to_token
    params = read_params(folder / "pretrained.params")
    assert list(params) == list(bert._collect_params_with_prefix())
    # The book's pretraining init: Xavier (uniform, fan-avg, magnitude 3) for weights and
    # pos_embedding; zeros for Dense biases, ones/zeros for LayerNorm.
    bound = onp.sqrt(3.0 / ((20 * 16 + 16) / 2))  # pos_embedding (1, 20, 16): fan_in 20*16, fan_out 16
    pos = params["encoder.pos_embedding"]
    assert 0.5 * bound < onp.abs(pos).max() <= bound
    assert onp.all(params["hidden.bias"] == 0) and onp.all(params["mlm.mlp.1.gamma"] == 1)
    # Seeded: the same seed gives the same file.
    set_seed(0)
    again = BERTModel(len(vocab), **SIZES)
    save_pretrained(again, vocab, folder.parent / "again")
    again_params = read_params(folder.parent / "again" / "pretrained.params")
    assert all(onp.array_equal(params[k], again_params[k]) for k in params)


def test_round_trip_gives_identical_outputs_and_the_books_loader_reads_it(pretrained):
    bert, folder = pretrained
    loaded, vocab = load_pretrained_model(str(folder), dropout=0.0, devices=[mx.cpu()])
    assert loaded.config == bert.config and len(vocab) == bert.config.vocab_size
    for a, b in zip(_outputs(bert), _outputs(loaded)):
        onp.testing.assert_array_equal(a, b)
    # The book loads with Block.load_parameters; our file must be exactly what it expects.
    book = BERTModel(bert.config.vocab_size, **SIZES)
    book.load_parameters(str(folder / "pretrained.params"), ctx=mx.cpu())
    for a, b in zip(_outputs(bert), _outputs(book)):
        onp.testing.assert_array_equal(a, b)


def test_load_on_two_devices_places_every_parameter_on_both(pretrained):
    _, folder = pretrained
    devices = [mx.cpu(0), mx.cpu(1)]
    bert, _ = load_pretrained_model(folder, 16, 32, 2, 2, 0.1, 20, devices)
    for param in bert.collect_params().values():
        assert param.list_ctx() == devices
        onp.testing.assert_array_equal(param.data(devices[0]).asnumpy(), param.data(devices[1]).asnumpy())


def test_other_files_are_refused_with_the_file_name(tmp_path, pretrained):
    bad = tmp_path / "torch.params"
    bad.write_bytes(b"PK\x03\x04 this is a zip, as torch.save writes")
    with pytest.raises(ValueError, match="torch.params: not an MXNet parameter file"):
        read_params(bad)
    with pytest.raises(FileNotFoundError):
        read_params(tmp_path / "nowhere.params")
    _, folder = pretrained
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format": "torch"}))
    # A config.json whose format contradicts the file: named, with the fix (every backend reads
    # every format, so the file's own bytes decide how it is read).
    with pytest.raises(ValueError, match="config.json: says format 'torch' but pretrained.params is a mxnet "
                                         "parameter file"):
        load_pretrained_model(folder, dropout=0.0, devices=[mx.cpu()])


def _legacy_arrays(net):
    """What `collect_params().save` (MXNet's deprecated path) writes: Gluon's global prefixed names."""
    return {p.name: p.data() for p in net.collect_params().values()}


def test_legacy_prefixed_names_are_mapped_and_loaded(pretrained):
    bert, folder = pretrained
    structured = read_params(folder / "pretrained.params")
    arrays = _legacy_arrays(bert)
    assert not any("." in k for k in arrays) and list(arrays)[0].endswith("_pos_embedding")
    os.remove(folder / "pretrained.params")
    npx.save(str(folder / "pretrained.params"), arrays)
    legacy = read_params(folder / "pretrained.params")
    assert list(legacy) == list(structured)
    assert all(onp.array_equal(legacy[k], structured[k]) for k in structured)
    loaded, _ = load_pretrained_model(folder, dropout=0.0, devices=[mx.cpu()])
    for a, b in zip(_outputs(bert), _outputs(loaded)):
        onp.testing.assert_array_equal(a, b)

    # Saved outside numpy semantics (mx.nd.save), under a parent name scope: still mapped.
    with mx.util.np_array(False), mx.util.np_shape(False):
        mx.nd.save(str(folder / "nd.params"), {"bertmodel7_" + k: v.as_nd_ndarray() for k, v in arrays.items()})
    nd_legacy = read_params(folder / "nd.params")
    assert all(onp.array_equal(nd_legacy[k], structured[k]) for k in structured)


def test_legacy_names_that_do_not_fit_are_refused(tmp_path, pretrained):
    bert, _ = pretrained
    arrays = _legacy_arrays(bert)
    names = list(arrays)
    assert names[3].endswith("_weight") and names[4].endswith("_bias")
    names[3], names[4] = names[4], names[3]  # a bias where the book's order has a weight
    npx.save(str(tmp_path / "swapped.params"), {k: arrays[k] for k in names})
    with pytest.raises(ValueError, match=r"swapped\.params: uses Gluon's legacy prefixed names.*tensor 3 is "
                                         r"'dense\d+_bias'.*encoder\.blks\.0\.attention\.W_q\.weight"):
        read_params(tmp_path / "swapped.params")
    npx.save(str(tmp_path / "short.params"), {k: arrays[k] for k in list(arrays)[:-1]})
    with pytest.raises(ValueError, match=r"short\.params: .*44 tensors"):
        read_params(tmp_path / "short.params")


def test_write_params_round_trip_and_atomicity(tmp_path, rng):
    params = {"a.weight": rng.normal(size=(3, 4)).astype("float32"), "b.ids": onp.arange(5, dtype="int32")}
    path = tmp_path / "x.params"
    write_params(params, path)
    back = read_params(path)
    assert list(back) == list(params)
    for k in params:
        assert back[k].dtype == params[k].dtype
        onp.testing.assert_array_equal(back[k], params[k])
    with pytest.raises(TypeError):
        write_params({"a.weight": params["a.weight"], 7: params["b.ids"]}, path)  # npx.save refuses
    assert os.listdir(tmp_path) == ["x.params"]  # no temp file left behind, old file kept
    onp.testing.assert_array_equal(read_params(path)["a.weight"], params["a.weight"])


def test_save_classifier_refuses_an_uninitialised_head(tmp_path, pretrained):
    """Gluon's deferred initialisation: a head never initialised is named, and nothing is written."""
    _, folder = pretrained
    bert, vocab = load_pretrained_model(folder, dropout=0.1, devices=[mx.cpu()])
    with pytest.raises(ValueError, match=r"uninitialised parameters \['output\.weight', 'output\.bias'\]"):
        save_classifier(BERTClassifier(bert), vocab, bert.config, tmp_path / "clf")
    assert not os.path.exists(tmp_path / "clf" / "classifier.params")
