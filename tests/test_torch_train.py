"""The PyTorch fine-tuning loop: one step, the summed gradient, accuracy, train_ch13 on tensors and
the core batch iterator (the loop in every backend: tests/test_backend_train.py)."""
import numpy as np
import pytest
from needs import require_backend

require_backend("torch")
import torch  # noqa: E402
from torch import nn  # noqa: E402

from nlibert.backends.torch import BERTClassifier, BERTModel, evaluate_accuracy, train_ch13  # noqa: E402
from nlibert.backends.torch.train import train_batch_ch13  # noqa: E402
from nlibert.core.batching import BatchIterator  # noqa: E402

torch.set_num_threads(1)

V, T = 30, 8
CPU = [torch.device("cpu")]


def separable_batches(num_batches: int, batch_size: int = 16, seed: int = 0):
    """A task a tiny BERT learns in a few steps: the label is which of 3 marker tokens follows <cls>."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(num_batches):
        labels = rng.integers(0, 3, batch_size).astype(np.int64)
        ids = rng.integers(6, V, (batch_size, T)).astype(np.int32)
        ids[:, 0] = 2  # <cls>
        ids[:, 1] = 3 + labels  # the marker
        valid_lens = rng.integers(4, T + 1, batch_size).astype(np.int32)
        ids[np.arange(T)[None, :] >= valid_lens[:, None]] = 1  # <pad>
        segments = np.zeros((batch_size, T), dtype=np.int32)
        batches.append(((ids, segments, valid_lens), labels))
    return batches


def tiny_classifier(dropout: float = 0.1, seed: int = 0) -> BERTClassifier:
    torch.manual_seed(seed)
    return BERTClassifier(BERTModel(V, 16, 32, 2, 2, dropout, max_len=16))


def test_train_batch_returns_the_loss_sum_and_correct_count_before_the_step():
    net = tiny_classifier(dropout=0.0)
    (X, y), = separable_batches(1)
    Xt = tuple(torch.as_tensor(a) for a in X)
    with torch.no_grad():
        logits = net(Xt)
    expected_loss = nn.functional.cross_entropy(logits, torch.as_tensor(y), reduction="sum").item()
    expected_correct = int((logits.argmax(1).numpy() == y).sum())
    before = net.output.weight.detach().clone()
    trainer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_sum, correct = train_batch_ch13(net, X, y, nn.CrossEntropyLoss(reduction="none"), trainer, CPU)
    assert loss_sum == pytest.approx(expected_loss, rel=1e-5)
    assert correct == expected_correct
    assert not torch.equal(before, net.output.weight)  # a step was taken
    assert net.training


def test_the_gradient_is_a_sum_over_the_batch_as_the_book():
    net = tiny_classifier(dropout=0.0)
    (X, y), = separable_batches(1)
    trainer = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: look at the gradient only
    train_batch_ch13(net, X, y, nn.CrossEntropyLoss(reduction="none"), trainer, CPU)
    summed = net.output.bias.grad.clone()
    net.zero_grad()
    logits = net(tuple(torch.as_tensor(a) for a in X))
    nn.functional.cross_entropy(logits, torch.as_tensor(y), reduction="mean").backward()
    torch.testing.assert_close(summed, net.output.bias.grad * len(y))


class FixedLogits(nn.Module):
    """Predicts class (token at position 1) - 3, whatever else is in the batch."""

    def forward(self, X):
        tokens = X[0]
        return nn.functional.one_hot((tokens[:, 1] - 3).long().clamp(0, 2), 3).float()


def test_evaluate_accuracy_counts_exactly_and_restores_the_mode():
    batches = separable_batches(2, batch_size=10)
    batches[1][1][:4] = (batches[1][1][:4] + 1) % 3  # 4 wrong labels out of 20
    net = FixedLogits().train()
    assert evaluate_accuracy(net, batches, CPU) == pytest.approx(16 / 20)
    assert net.training


def test_train_ch13_quiet_and_with_tensor_batches(capsys):
    net = tiny_classifier()
    batches = [(tuple(torch.as_tensor(a) for a in X), torch.as_tensor(y)) for X, y in separable_batches(2)]
    trainer = torch.optim.Adam(net.parameters(), lr=1e-3)
    records = train_ch13(net, batches, batches, nn.CrossEntropyLoss(reduction="none"), trainer, 1, CPU,
                         verbose=False)
    assert len(records) == 1 and 0.0 <= records[0].test_acc <= 1.0
    assert capsys.readouterr().out == ""


def test_train_ch13_takes_the_core_batch_iterator_trimmed_or_not(capsys):
    (ids, segments, lens), labels = separable_batches(1, batch_size=40)[0]
    for trim in (False, True):
        net = tiny_classifier()
        train_iter = BatchIterator((ids, segments, lens), labels, 16, shuffle=True, trim=trim)
        test_iter = BatchIterator((ids, segments, lens), labels, 16)
        trainer = torch.optim.Adam(net.parameters(), lr=1e-3)
        records = train_ch13(net, train_iter, test_iter, nn.CrossEntropyLoss(reduction="none"), trainer,
                             2, CPU, verbose=False)
        assert [r.num_examples for r in records] == [40, 40]  # 3 batches, the last one short
