"""The PyTorch fine-tuning loop: devices, one step, accuracy, train_ch13 end to end, predictions."""
import re

import numpy as np
import pytest
from needs import require_backend

require_backend("torch")
import torch  # noqa: E402
from torch import nn  # noqa: E402

from nlibert.backends.torch import (BERTClassifier, BERTModel, evaluate_accuracy, predict_proba,  # noqa: E402
                                    train_ch13, try_all_gpus)
from nlibert.backends.torch.train import train_batch_ch13  # noqa: E402
from nlibert.core.batching import BatchIterator  # noqa: E402
from nlibert.core.training import EpochRecord  # noqa: E402

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


def test_try_all_gpus_falls_back_to_the_cpu():
    devices = try_all_gpus()
    if torch.cuda.is_available():
        assert devices == [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    else:
        assert devices == [torch.device("cpu")]


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


def test_train_ch13_learns_with_fewer_than_five_batches_and_prints_the_book_lines(capsys):
    net = tiny_classifier()
    train_iter, test_iter = separable_batches(3, seed=0), separable_batches(2, seed=1)
    trainer = torch.optim.Adam(net.parameters(), lr=5e-3)
    seen = []
    records = train_ch13(net, train_iter, test_iter, nn.CrossEntropyLoss(reduction="none"), trainer,
                         10, CPU, on_epoch=seen.append)
    assert len(records) == 10 and all(isinstance(r, EpochRecord) for r in records)
    assert seen == records
    assert [r.epoch for r in records] == list(range(1, 11))
    assert all(r.num_examples == 48 and r.examples_per_sec > 0 for r in records)
    assert records[0].loss > 1.0  # chance level is ln 3 = 1.10
    assert records[-1].loss < 0.5 * records[0].loss
    assert records[-1].train_acc > records[0].train_acc
    assert records[-1].test_acc >= 0.8

    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}", lines[0])
    assert re.fullmatch(r"\d+\.\d examples/sec on \[device\(type='cpu'\)\]", lines[1])
    last = records[-1]
    assert lines[0] == f"loss {last.loss:.3f}, train acc {last.train_acc:.3f}, test acc {last.test_acc:.3f}"


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


def test_train_ch13_rejects_an_empty_iterator_and_no_devices():
    net = tiny_classifier()
    trainer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ValueError, match="no batches"):
        train_ch13(net, [], [], loss, trainer, 1, CPU)
    with pytest.raises(ValueError, match="devices"):
        train_ch13(net, separable_batches(1), [], loss, trainer, 1, [])


def test_predict_proba_is_the_eval_mode_softmax_in_any_batch_size():
    net = tiny_classifier(dropout=0.5).train()
    (ids, segments, lens), _ = separable_batches(1, batch_size=7)[0]
    probs = predict_proba(net, ids, segments, lens, CPU)
    assert probs.shape == (7, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    net.eval()
    with torch.no_grad():
        expected = torch.softmax(net(tuple(torch.as_tensor(a) for a in (ids, segments, lens))), -1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predict_proba(net, ids, segments, lens, CPU, batch_size=3), probs,
                               rtol=1e-5, atol=1e-6)
    one = predict_proba(net, ids[2], segments[2], lens[2], CPU)  # one unbatched example
    np.testing.assert_allclose(one, probs[2:3], rtol=1e-5, atol=1e-6)
