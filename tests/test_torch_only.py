"""What the PyTorch backend alone has: `nn.Module`'s train/eval switch and attribute names, autograd
(the book's summed gradient, r0.17's missing gradient), how attention weights are kept, one attention
layer's fused kernel and its gradients, the forward calls a micro-batched step makes, `torch.load`
reading the params file the book's way, and `nn.DataParallel`. Everything every backend has is in
the shared suite (tests/test_backend_*.py)."""
import numpy as np
import pytest
from needs import require_backend

require_backend("torch")
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from nlibert.backends.torch import (BERTClassifier, BERTModel, FinetuneStep, evaluate_accuracy,  # noqa: E402
                                    load_classifier, load_pretrained_model, read_params, save_classifier,
                                    save_pretrained, set_fused_attention, train_batch_ch13)
from nlibert.backends.torch.model import AddNorm, MultiHeadAttention  # noqa: E402
from nlibert.core.vocab import RESERVED_TOKENS, Vocab  # noqa: E402

from test_backend_fast import packed_batch  # noqa: E402
from test_backend_model import batch  # noqa: E402

torch.set_num_threads(1)  # tests run two workers on shared cores

V, H, FFN, HEADS, LAYERS, MAX_LEN = 50, 16, 32, 2, 2, 24
CPU = [torch.device("cpu")]


def tiny_bert(dropout: float = 0.0, **kwargs) -> BERTModel:
    torch.manual_seed(0)
    return BERTModel(V, H, FFN, HEADS, LAYERS, dropout, MAX_LEN, **kwargs)


def tensors(*arrays):
    return tuple(torch.as_tensor(a) for a in arrays)


# --- the model ---------------------------------------------------------------------------------

def test_attention_weights_are_kept_only_on_request():
    mha = MultiHeadAttention(H, HEADS, dropout=0.0).eval()
    X = torch.randn(3, 7, H)
    mha(X, X, X, torch.tensor([7, 4, 1]))
    assert mha.attention.attention_weights is None
    mha.attention.keep_attention_weights = True
    mha(X, X, X, torch.tensor([7, 4, 1]))
    weights = mha.attention.attention_weights
    assert weights.shape == (3 * HEADS, 7, 7)
    # Rows are batch-major: example b's heads are rows b*h .. b*h+h-1.
    assert torch.all(weights[HEADS:2 * HEADS, :, 4:] == 0) and torch.all(weights[HEADS:2 * HEADS, :, :4] > 0)
    assert torch.all(weights[2 * HEADS:, :, 1:] == 0) and torch.all(weights[2 * HEADS:, :, 0] == 1)


def test_addnorm_is_post_ln_with_the_book_names():
    an = AddNorm(H, 0.5).eval()
    assert isinstance(an.dropout, torch.nn.Dropout) and an.ln.eps == 1e-5
    X, Y = torch.randn(2, 3, H), torch.randn(2, 3, H)
    torch.testing.assert_close(an(X, Y), F.layer_norm(X + Y, (H,), eps=1e-5))


def test_dropout_is_active_in_train_mode_only():
    net = BERTClassifier(tiny_bert(dropout=0.5))
    X = tensors(*batch())
    net.train()
    assert not torch.equal(net(X), net(X))
    net.eval()
    assert torch.equal(net(X), net(X))


def test_detach_flag_leaves_no_gradient_and_keeps_the_parameter():
    bert = tiny_bert(detach_pos_embedding=True)
    encoded_X, _, nsp = bert(*tensors(*batch()))
    (encoded_X.sum() + nsp.sum()).backward()
    assert bert.encoder.pos_embedding.grad is None
    # The parameter stays in the state_dict either way, so r0.17 files load into both.
    assert "encoder.pos_embedding" in bert.state_dict()


@pytest.mark.parametrize("lens", [torch.tensor([7, 4, 1]), torch.tensor([[1, 3, 7, 7, 2, 5, 6]] * 3), None])
def test_fused_attention_equals_the_book_attention_with_its_gradients(lens):
    torch.manual_seed(0)
    book = MultiHeadAttention(32, 4, dropout=0.0).eval()
    fused = MultiHeadAttention(32, 4, dropout=0.0, fused_attention=True).eval()
    fused.load_state_dict(book.state_dict())
    X = torch.randn(3, 7, 32, requires_grad=True)
    expected = book(X, X, X, lens)
    got = fused(X, X, X, lens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    g_book = torch.autograd.grad(expected.square().sum(), [X, *book.parameters()])
    g_fused = torch.autograd.grad(got.square().sum(), [X, *fused.parameters()])
    for a, b in zip(g_fused, g_book):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_switch_reaches_every_attention_layer_and_cls_only_is_the_cls_row():
    net = BERTClassifier(tiny_bert(), cls_only=True).eval()
    set_fused_attention(net, True)
    assert all(m.fused_attention for m in net.modules() if isinstance(m, MultiHeadAttention))
    X = tensors(*batch())
    encoded = net.encoder(*X, cls_only=True)
    assert encoded.shape == (3, 1, H)
    torch.testing.assert_close(encoded[:, 0], net.encoder(*X)[:, 0], rtol=1e-5, atol=1e-5)


# --- training ------------------------------------------------------------------------------------

def test_the_gradient_is_a_sum_over_the_batch_as_the_book_and_the_net_stays_in_training_mode():
    torch.manual_seed(0)
    net = BERTClassifier(BERTModel(V, 16, 32, 2, 2, 0.0, max_len=16))
    (X, y) = packed_batch(n=8, T=10)
    X = (np.minimum(X[0], V - 1), X[1], X[2])
    trainer = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: look at the gradient only
    train_batch_ch13(net, X, y, nn.CrossEntropyLoss(reduction="none"), trainer, CPU)
    assert net.training
    summed = net.output.bias.grad.clone()
    net.zero_grad()
    nn.functional.cross_entropy(net(tensors(*X)), torch.as_tensor(y), reduction="mean").backward()
    torch.testing.assert_close(summed, net.output.bias.grad * len(y))


class FixedLogits(nn.Module):
    """Predicts class (token at position 1) - 3, whatever else is in the batch."""

    def forward(self, X):
        return nn.functional.one_hot((X[0][:, 1] - 3).long().clamp(0, 2), 3).float()


def test_evaluate_accuracy_restores_the_mode_of_any_module():
    tokens = np.full((20, 4), 5, np.int32)
    labels = np.arange(20) % 3
    tokens[:, 1] = 3 + labels
    labels[:4] = (labels[:4] + 1) % 3  # 4 wrong labels out of 20
    batches = [((tokens[i:i + 10], tokens[i:i + 10] * 0, np.full(10, 4)), labels[i:i + 10]) for i in (0, 10)]
    net = FixedLogits().train()
    assert evaluate_accuracy(net, batches, CPU) == pytest.approx(16 / 20)
    assert net.training


def test_a_micro_batched_step_calls_the_net_once_per_chunk():
    """16 rows in chunks of at most 5: forward calls of 5, 5, 5, 1 (the shared suite checks the step)."""
    X, y = packed_batch(n=16)
    for micro_batch, expected in ((None, [16]), (5, [5, 5, 5, 1])):
        torch.manual_seed(0)
        net = BERTClassifier(BERTModel(60, 32, 64, 4, 2, 0.0, 40, fused_attention=True), cls_only=True)
        calls = []
        net.register_forward_hook(lambda module, inputs, output: calls.append(len(output)))
        step = FinetuneStep(net, nn.CrossEntropyLoss(reduction="none"), torch.optim.SGD(net.parameters(), lr=0.1),
                            CPU, micro_batch=micro_batch)
        for _ in range(3):
            step.read(step(X, y))
        assert calls == expected * 3


# --- checkpoints ---------------------------------------------------------------------------------

def _vocab(n: int = V) -> Vocab:
    return Vocab.from_idx_to_token(["<unk>"] + RESERVED_TOKENS + [f"w{i}" for i in range(n - 5)])


def test_read_params_names_a_torch_file_that_is_not_a_state_dict(tmp_path):
    a_list = tmp_path / "list.params"
    torch.save([torch.ones(2)], a_list)
    with pytest.raises(ValueError, match="list.params"):
        read_params(a_list)


def test_the_params_file_is_a_plain_state_dict_and_dropout_reaches_every_layer(tmp_path):
    bert = tiny_bert(dropout=0.1)
    save_pretrained(bert, _vocab(), tmp_path / "bert")
    state = torch.load(tmp_path / "bert" / "pretrained.params", weights_only=True)  # the book's way
    assert list(state) == list(bert.state_dict())
    loaded, _ = load_pretrained_model(tmp_path / "bert", H, FFN, HEADS, LAYERS, 0.3, MAX_LEN, CPU)
    assert loaded.encoder.blks[0].addnorm1.dropout.p == 0.3
    assert loaded.encoder.blks[1].attention.attention.dropout.p == 0.3


def test_a_data_parallel_classifier_saves_plain_keys_and_round_trips(tmp_path):
    torch.manual_seed(3)
    net = BERTClassifier(tiny_bert()).eval()
    save_classifier(torch.nn.DataParallel(net), _vocab(), None, tmp_path / "clf")  # a wrapped net saves plain keys
    state = read_params(tmp_path / "clf" / "classifier.params")
    assert len(state) == 39 and list(state)[-2:] == ["output.weight", "output.bias"]
    loaded, _, _ = load_classifier(tmp_path / "clf", CPU)
    assert list(loaded.state_dict()) == list(net.state_dict())
    X = tensors(*batch())
    with torch.no_grad():
        assert torch.equal(net(X), loaded.eval()(X))
