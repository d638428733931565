"""The PyTorch checkpoint format: params files, pretrained folders, classifier folders."""
import os
import shutil

import numpy as np
import pytest
from needs import require_backend

require_backend("torch")
import torch  # noqa: E402

from nlibert.backends.torch import (BERTClassifier, BERTModel, load_classifier, load_pretrained_model,  # noqa: E402
                                    read_params, save_classifier, save_pretrained, write_params)
from nlibert.core.io import read_json  # noqa: E402
from nlibert.core.vocab import Vocab  # noqa: E402

torch.set_num_threads(1)

H, FFN, HEADS, LAYERS, MAX_LEN = 16, 32, 2, 2, 24
CPU = [torch.device("cpu")]


def make_vocab(n: int = 40) -> Vocab:
    return Vocab.from_idx_to_token(["<unk>", "<pad>", "<cls>", "<sep>"] + [f"w{i}" for i in range(n - 4)])


@pytest.fixture
def pretrained(tmp_path):
    """A saved tiny pretrained folder and the model and vocab it came from."""
    torch.manual_seed(0)
    vocab = make_vocab()
    bert = BERTModel(len(vocab), H, FFN, HEADS, LAYERS, 0.1, MAX_LEN)
    folder = tmp_path / "bert.tiny"
    save_pretrained(bert, vocab, folder)
    return folder, bert, vocab


def inputs(vocab_size=40):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab_size, (2, 9), generator=g)
    segments = torch.tensor([[0] * 5 + [1] * 4] * 2)
    return tokens, segments, torch.tensor([9, 6])


def outputs(bert, X):
    bert.eval()
    with torch.no_grad():
        encoded_X, _, nsp = bert(*X)
    return encoded_X, nsp


# --- params files --------------------------------------------------------------------------------

def test_write_then_read_params_round_trips_numpy_and_tensors(tmp_path):
    params = {"b.w": np.arange(6, dtype=np.float32).reshape(2, 3), "a.b": torch.ones(3)}
    path = tmp_path / "p.params"
    write_params(params, path)
    got = read_params(path)
    assert list(got) == ["b.w", "a.b"]  # order kept
    np.testing.assert_array_equal(got["b.w"], params["b.w"])
    np.testing.assert_array_equal(got["a.b"], np.ones(3, dtype=np.float32))
    assert sorted(os.listdir(tmp_path)) == ["p.params"]  # no temporary left behind


def test_read_params_names_the_file_when_it_is_not_a_state_dict(tmp_path):
    junk = tmp_path / "junk.params"
    junk.write_bytes(b"\x00not a torch file")
    with pytest.raises(ValueError, match="junk.params"):
        read_params(junk)
    a_list = tmp_path / "list.params"
    torch.save([torch.ones(2)], a_list)
    with pytest.raises(ValueError, match="list.params"):
        read_params(a_list)


# --- pretrained folders ----------------------------------------------------------------------------

def test_save_pretrained_writes_the_book_files_plus_config(pretrained):
    folder, bert, vocab = pretrained
    assert sorted(os.listdir(folder)) == ["config.json", "pretrained.params", "vocab.json"]
    assert read_json(folder / "vocab.json") == vocab.idx_to_token
    cfg = read_json(folder / "config.json")
    assert cfg == {**bert.config.to_dict(), "format": "torch", "kind": "pretrained"}
    # The params file is a plain state_dict, loadable the book's way.
    state = torch.load(folder / "pretrained.params", weights_only=True)
    assert list(state) == list(bert.state_dict())


def test_load_pretrained_round_trip_gives_identical_outputs(pretrained):
    folder, bert, vocab = pretrained
    loaded, loaded_vocab = load_pretrained_model(str(folder), H, FFN, HEADS, LAYERS, 0.1, MAX_LEN, CPU)
    assert loaded_vocab.idx_to_token == vocab.idx_to_token
    X = inputs()
    for a, b in zip(outputs(bert, X), outputs(loaded, X)):
        assert torch.equal(a, b)


def test_load_pretrained_honours_dropout(pretrained):
    folder, _, _ = pretrained
    bert, _ = load_pretrained_model(folder, H, FFN, HEADS, LAYERS, 0.3, MAX_LEN, CPU)
    assert bert.encoder.blks[0].addnorm1.dropout.p == 0.3
    assert bert.encoder.blks[1].attention.attention.dropout.p == 0.3
    assert bert.config.dropout == 0.3


def test_a_size_the_file_contradicts_names_the_key_and_both_shapes(pretrained):
    folder, _, _ = pretrained
    with pytest.raises(ValueError) as e:
        load_pretrained_model(folder, H, 64, HEADS, LAYERS, 0.1, MAX_LEN, CPU)
    msg = str(e.value)
    assert "encoder.blks.0.ffn.dense1.weight" in msg
    assert "(32, 16)" in msg and "(64, 16)" in msg
    assert "pretrained.params" in msg


def test_too_many_layers_reports_the_missing_keys(pretrained):
    folder, _, _ = pretrained
    with pytest.raises(ValueError, match=r"encoder\.blks\.2\.attention\.W_q\.weight"):
        load_pretrained_model(folder, H, FFN, HEADS, 3, 0.1, MAX_LEN, CPU)


def test_a_vocab_that_disagrees_with_the_embedding_is_an_error(pretrained):
    folder, _, _ = pretrained
    (folder / "vocab.json").write_text('["<unk>", "a", "b"]')
    with pytest.raises(ValueError, match=r"encoder\.token_embedding\.weight"):
        load_pretrained_model(folder, H, FFN, HEADS, LAYERS, 0.1, MAX_LEN, CPU)


def test_sizes_none_are_read_from_the_checkpoint(pretrained):
    folder, bert, _ = pretrained
    loaded, _ = load_pretrained_model(folder, None, None, None, None, None, None, CPU)
    assert loaded.config == bert.config  # num_heads and dropout from config.json, the rest off tensors
    X = inputs()
    for a, b in zip(outputs(bert, X), outputs(loaded, X)):
        assert torch.equal(a, b)


def test_sizes_none_work_on_a_book_folder_without_config(pretrained):
    folder, bert, _ = pretrained
    os.remove(folder / "config.json")
    loaded, _ = load_pretrained_model(folder, None, None, 2, None, 0.1, None, CPU)
    assert (loaded.config.num_hiddens, loaded.config.ffn_num_hiddens, loaded.config.num_layers,
            loaded.config.max_len, loaded.config.vocab_size) == (H, FFN, LAYERS, MAX_LEN, 40)


def test_hub_names_resolve_to_the_torch_archives(pretrained, tmp_path, monkeypatch):
    folder, bert, _ = pretrained
    cache = tmp_path / "cache"
    shutil.copytree(folder, cache / "bert.small.torch")  # as if already downloaded and extracted
    monkeypatch.setenv("NLIBERT_DATA", str(cache))
    loaded, _ = load_pretrained_model("bert.small", H, FFN, HEADS, LAYERS, 0.1, MAX_LEN, CPU)
    X = inputs()
    assert torch.equal(outputs(bert, X)[1], outputs(loaded, X)[1])
    with pytest.raises(FileNotFoundError, match="bert.nope"):
        load_pretrained_model("bert.nope", H, FFN, HEADS, LAYERS, 0.1, MAX_LEN, CPU)


# --- classifier folders ---------------------------------------------------------------------------

def test_classifier_round_trip(pretrained, tmp_path):
    _, bert, vocab = pretrained
    torch.manual_seed(3)
    net = BERTClassifier(bert).eval()
    out_folder = tmp_path / "clf"
    save_classifier(torch.nn.DataParallel(net), vocab, None, out_folder)  # a wrapped net saves plain keys
    assert sorted(os.listdir(out_folder)) == ["classifier.params", "config.json", "vocab.json"]
    state = read_params(out_folder / "classifier.params")
    assert len(state) == 39 and list(state)[-2:] == ["output.weight", "output.bias"]
    assert read_json(out_folder / "config.json")["kind"] == "classifier"

    loaded, loaded_vocab, cfg = load_classifier(out_folder, CPU)
    assert cfg == bert.config and loaded_vocab.idx_to_token == vocab.idx_to_token
    assert list(loaded.state_dict()) == list(net.state_dict())
    X = inputs()
    with torch.no_grad():
        assert torch.equal(net(X), loaded.eval()(X))


def test_load_classifier_refuses_a_pretrained_folder(pretrained):
    folder, _, _ = pretrained
    with pytest.raises(ValueError, match="classifier"):
        load_classifier(folder, CPU)
