"""The book's training API in every installed backend, through the contract's names only
(core/book.py binds it to each backend's steps): devices, `train_ch13` learning a separable toy task
and printing the book's two lines, `predict_proba` as the evaluation-mode softmax in any batch size,
precisions the backend does not have. What one framework alone has (DataParallel and the summed
gradient, MXNet's split_f across two devices, JAX's padding ladder and device-side sums) stays in
tests/test_{torch,mxnet,jax}_train.py.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from nlibert.backends import backend_info, installed_backends
from nlibert.core.config import BERTConfig

from test_backend_model import BackendTester

V, T = 12, 6
CONFIG = BERTConfig(vocab_size=V, num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=2, dropout=0.1,
                    max_len=16)


@pytest.fixture(scope="module", params=installed_backends())
def tester(request) -> BackendTester:
    return BackendTester(request.param)


def task(n: int, seed: int) -> tuple:
    """A separable toy NLI: the label is which of three 'verb' tokens (5, 6, 7) sits at position 2."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    tokens = rng.integers(8, V, size=(n, T)).astype(np.int32)
    tokens[:, 0], tokens[:, 2], tokens[:, 3] = 2, 5 + labels, 3  # <cls> x verb <sep> ...
    valid_lens = rng.integers(4, T + 1, size=n).astype(np.int32)
    segments = (np.arange(T)[None, :] >= 4).astype(np.int32).repeat(n, axis=0)
    for i, n_valid in enumerate(valid_lens):
        tokens[i, n_valid:], segments[i, n_valid:] = 1, 0  # <pad>
    return tokens, segments, valid_lens, labels.astype(np.int64)


def batches(arrays: tuple, batch_size: int) -> list:
    tokens, segments, valid_lens, labels = arrays
    return [((tokens[i:i + batch_size], segments[i:i + batch_size], valid_lens[i:i + batch_size]),
             labels[i:i + batch_size]) for i in range(0, len(labels), batch_size)]


def test_try_all_gpus_falls_back_to_the_cpu(tester):
    devices = tester.backend.try_all_gpus()  # this machine has no GPU
    assert devices == tester.backend.parse_devices("cpu")[:1]


def test_train_ch13_learns_a_tiny_task_and_prints_the_books_lines(tester, capsys):
    net = tester.classifier(tester.bert(CONFIG))
    train, test = batches(task(48, seed=5), 12), batches(task(24, seed=6), 12)  # 4 batches: fewer than 5
    trainer, loss = tester.backend.make_trainer(net, 1e-2), tester.backend.make_loss()
    seen = []
    records = tester.backend.train_ch13(net, train, test, loss, trainer, 8, [tester.device], on_epoch=seen.append)
    assert [r.epoch for r in records] == list(range(1, 9)) and seen == records
    assert records[-1].loss < 0.5 * records[0].loss
    assert records[-1].train_acc >= 0.8 and records[-1].test_acc >= 0.8
    assert all(r.num_examples == 48 and r.examples_per_sec > 0 for r in records)
    out = capsys.readouterr().out
    assert re.fullmatch(r"loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}\n"
                        rf"\d+\.\d examples/sec on {re.escape(str([tester.device]))}\n", out), out
    assert f"loss {records[-1].loss:.3f}, train acc {records[-1].train_acc:.3f}" in out
    with pytest.raises(ValueError, match="no batches"):
        tester.backend.train_ch13(net, [], test, loss, trainer, 1, [tester.device])
    with pytest.raises(ValueError, match="devices"):
        tester.backend.train_ch13(net, train, test, loss, trainer, 1, [])


def test_train_fast_gives_train_ch13s_records_with_one_read_per_epoch(tester, capsys):
    """The same optimisation on the same batches (dropout 0): the same per-epoch figures."""
    records = {}
    for name in ("train_ch13", "train_fast"):
        net = tester.classifier(tester.bert(BERTConfig(**{**CONFIG.to_dict(), "dropout": 0.0})))
        train, test = batches(task(48, seed=5), 12), batches(task(24, seed=6), 12)
        records[name] = getattr(tester.backend, name)(net, train, test, tester.backend.make_loss(),
                                                      tester.backend.make_trainer(net, 1e-2), 3, [tester.device],
                                                      verbose=False)
    for book, fast in zip(records["train_ch13"], records["train_fast"]):
        assert fast.loss == pytest.approx(book.loss, rel=1e-4)
        assert (fast.train_acc, fast.test_acc) == (book.train_acc, book.test_acc)
    assert capsys.readouterr().out == ""


def test_predict_proba_is_the_evaluation_softmax_in_any_batch_size(tester):
    net = tester.classifier(tester.bert(CONFIG))
    tokens, segments, valid_lens, _ = task(5, seed=7)
    device = [tester.device]
    probs = tester.backend.predict_proba(net, tokens, segments, valid_lens, device)
    assert probs.shape == (5, 3) and isinstance(probs, np.ndarray)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    logits = tester.logits(net, tokens, segments, valid_lens)  # dropout 0.1 in the model: must be off
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tester.backend.predict_proba(net, tokens, segments, valid_lens, device, batch_size=2),
                               probs, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(tester.backend.predict_proba(net, tokens[3], segments[3], valid_lens[3], device),
                               probs[3:4], rtol=1e-6, atol=1e-7)
    assert tester.backend.predict_proba(net, tokens[:0], segments[:0], valid_lens[:0], device).shape == (0, 3)
    with pytest.raises(ValueError, match="row counts differ"):
        tester.backend.predict_proba(net, tokens, segments[:4], valid_lens, device)


def test_a_precision_the_backend_lacks_is_refused_by_its_step(tester):
    net = tester.classifier(tester.bert(CONFIG))
    missing = [p for p in ("float32", "bfloat16") if p not in backend_info(tester.name).precisions]
    for precision in missing:
        with pytest.raises(ValueError, match=precision):
            tester.backend.FinetuneStep(net, tester.backend.make_loss(), tester.backend.make_trainer(net, 1e-3),
                                        [tester.device], precision=precision)
