"""The PyTorch checkpoint format: params files, pretrained folders, classifier folders."""
import os

import pytest
from needs import require_backend

require_backend("torch")
import torch  # noqa: E402

from nlibert.backends.torch import (BERTClassifier, BERTModel, load_classifier, load_pretrained_model,  # noqa: E402
                                    read_params, save_classifier, save_pretrained)
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


def test_load_pretrained_honours_dropout(pretrained):
    folder, _, _ = pretrained
    bert, _ = load_pretrained_model(folder, H, FFN, HEADS, LAYERS, 0.3, MAX_LEN, CPU)
    assert bert.encoder.blks[0].addnorm1.dropout.p == 0.3
    assert bert.encoder.blks[1].attention.attention.dropout.p == 0.3
    assert bert.config.dropout == 0.3


# --- classifier folders ---------------------------------------------------------------------------

def test_a_data_parallel_classifier_saves_plain_keys_and_round_trips(pretrained, tmp_path):
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
