"""The book's training API in every installed backend, through the contract's names only
(core/book.py binds it to each backend's steps): devices, one step's sums, accuracy, `train_ch13`
learning a separable toy task and printing the book's two lines on numpy, framework or core
batches, `predict_proba` as the evaluation-mode softmax in any batch size, dropout masks drawn per
step and repeated by a seed, splitting a batch across two devices and training there as on one,
precisions the backend does not have. What one framework alone has (each book's gradient scale,
DataParallel, MXNet's split_f, JAX's padding ladder and device-side sums) stays in
tests/test_{torch,mxnet,jax}_only.py.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from nlibert.backends import backend_info, installed_backends
from nlibert.core.batching import BatchIterator
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


def two_cpus(tester) -> list:
    """Two CPU devices (`cpu:0,cpu:1`, the code path `cuda:0,cuda:1` takes with GPUs; tests/conftest.py
    asks XLA for two host devices)."""
    devices = tester.backend.parse_devices("cpu:0,cpu:1")
    assert len(devices) == 2
    return devices


def test_try_all_gpus_falls_back_to_the_cpu_and_bad_specs_are_named(tester):
    devices = tester.backend.try_all_gpus()  # this machine has no GPU
    assert devices == tester.backend.parse_devices("cpu")[:1] == tester.backend.parse_devices(None)
    for spec, message in (("cuda", "no CUDA device"), ("cuda:0", "is not available")):
        with pytest.raises(ValueError, match=message):
            tester.backend.parse_devices(spec)


def test_train_batch_returns_the_loss_sum_and_correct_count_before_the_step(tester, tmp_path):
    net = tester.classifier(tester.bert(BERTConfig(**{**CONFIG.to_dict(), "dropout": 0.0})))
    tokens, segments, valid_lens, labels = task(16, seed=0)
    logits = tester.logits(net, tokens, segments, valid_lens).astype(np.float64)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    before = tester.params(net, tmp_path / "before")["output.weight"]
    loss_sum, correct = tester.backend.train_batch_ch13(net, (tokens, segments, valid_lens), labels,
                                                       tester.backend.make_loss(),
                                                       tester.backend.make_trainer(net, 0.1), [tester.device])
    assert isinstance(loss_sum, float) and isinstance(correct, float)
    assert loss_sum == pytest.approx(-log_probs[np.arange(16), labels].sum(), rel=1e-5)
    assert correct == (logits.argmax(1) == labels).sum()
    assert not np.array_equal(before, tester.params(net, tmp_path / "after")["output.weight"])  # a step was taken


def test_evaluate_accuracy_counts_exactly(tester):
    net = tester.classifier(tester.bert(CONFIG))
    tokens, segments, valid_lens, labels = task(20, seed=1)
    predicted = tester.logits(net, tokens, segments, valid_lens).argmax(1)
    labels = predicted.copy()
    labels[:4] = (labels[:4] + 1) % 3  # 4 wrong labels out of 20, in the first of two batches
    accuracy = tester.backend.evaluate_accuracy(net, batches((tokens, segments, valid_lens, labels), 10),
                                                [tester.device])
    assert accuracy == pytest.approx(16 / 20)
    assert np.isnan(tester.backend.evaluate_accuracy(net, [], [tester.device]))


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


def test_train_ch13_is_quiet_on_request_and_takes_the_frameworks_batches(tester, capsys):
    net = tester.classifier(tester.bert(CONFIG))
    framework_batches = [(tester.arrays(*X), tester.arrays(y)[0]) for X, y in batches(task(24, seed=5), 12)]
    records = tester.backend.train_ch13(net, framework_batches, framework_batches, tester.backend.make_loss(),
                                        tester.backend.make_trainer(net, 1e-3), 1, [tester.device], verbose=False)
    assert len(records) == 1 and records[0].num_examples == 24 and 0.0 <= records[0].test_acc <= 1.0
    assert capsys.readouterr().out == ""


def test_train_ch13_takes_the_core_batch_iterator_trimmed_or_not(tester):
    tokens, segments, valid_lens, labels = task(40, seed=2)
    for trim in (False, True):
        net = tester.classifier(tester.bert(CONFIG))
        train_iter = BatchIterator((tokens, segments, valid_lens), labels, 16, shuffle=True, trim=trim)
        test_iter = BatchIterator((tokens, segments, valid_lens), labels, 16)
        records = tester.backend.train_ch13(net, train_iter, test_iter, tester.backend.make_loss(),
                                            tester.backend.make_trainer(net, 1e-3), 2, [tester.device], verbose=False)
        assert [r.num_examples for r in records] == [40, 40]  # 3 batches, the last one short


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


# --- dropout masks ---------------------------------------------------------------------------------

@pytest.fixture
def dropout_net_and_trainer(tester):
    """A one-layer classifier at dropout 0.5 and an Adam at lr 0 (the parameters never move, so only
    dropout masks change a step's loss)."""
    cfg = BERTConfig(**{**CONFIG.to_dict(), "dropout": 0.5, "num_layers": 1})
    net = tester.classifier(tester.bert(cfg))
    return net, tester.backend.make_trainer(net, 0.0)


def _lr0_losses(step, calls=3):
    (X, y), = batches(task(6, seed=3), 6)
    return [step(X, y) for _ in range(calls)]


def test_finetune_step_draws_new_dropout_masks_per_call_and_reseed_repeats_them(tester, dropout_net_and_trainer,
                                                                                tmp_path):
    net, trainer = dropout_net_and_trainer
    before = tester.params(net, tmp_path / "before")
    step = tester.backend.FinetuneStep(net, tester.backend.make_loss(), trainer, [tester.device])
    first = _lr0_losses(lambda *b: step.read(step(*b))[0])
    after = tester.params(net, tmp_path / "after")
    assert all(np.array_equal(before[k], after[k]) for k in before)  # lr 0
    assert len(set(first)) == 3, first  # a new mask per step
    step.reseed(5)
    seeded = _lr0_losses(lambda *b: step.read(step(*b))[0])
    step.reseed(5)
    assert _lr0_losses(lambda *b: step.read(step(*b))[0]) == seeded != first  # the masks are the seed's


def test_train_batch_ch13_draws_new_dropout_masks_on_every_call(tester, dropout_net_and_trainer):
    net, trainer = dropout_net_and_trainer
    loss = tester.backend.make_loss()
    losses = _lr0_losses(lambda *b: tester.backend.train_batch_ch13(net, *b, loss, trainer, [tester.device])[0])
    assert len(set(losses)) == 3, f"the same loss sum on every call at lr 0 (same masks): {losses}"


# --- two devices -------------------------------------------------------------------------------------

def test_split_batch_multi_inputs_splits_every_input_across_devices(tester):
    devices = two_cpus(tester)
    tokens, segments, valid_lens, labels = task(5, seed=1)
    X_shards, y_shards = tester.backend.split_batch_multi_inputs((tokens, segments, valid_lens), labels, devices)
    assert len(X_shards) == len(y_shards) == 2
    assert [len(y) for y in y_shards] == [3, 2]  # uneven slices are fine
    assert all(len(shard) == 3 for shard in X_shards)
    for i, array in enumerate((tokens, segments, valid_lens)):
        np.testing.assert_array_equal(np.concatenate([tester.numpy(s[i]) for s in X_shards]), array)
    np.testing.assert_array_equal(np.concatenate([tester.numpy(y) for y in y_shards]), labels)
    X_shards, y_shards = tester.backend.split_batch_multi_inputs(tuple(a[:1] for a in (tokens, segments, valid_lens)),
                                                                 labels[:1], devices)
    assert len(X_shards) == len(y_shards) == 1  # one example: only the first device


def test_two_devices_train_like_one(tester, tmp_path):
    """The book's data parallelism: the shards' gradients are reduced, so a step on two devices is the
    step on one, up to the summation order: the same loss sums and counts, step by step, and the
    function after three steps (`predict_proba` within 1e-6), the same parameters but the key bias
    W_k.bias: Adam turns the float noise of its gradient, 0 in exact arithmetic (the softmax cancels
    it), into lr-sized steps that differ with the summation order and change no output."""
    devices = two_cpus(tester)
    cfg = BERTConfig(**{**CONFIG.to_dict(), "dropout": 0.0})
    steps = batches(task(21, seed=2), 7)  # shards of 4 and 3
    test = batches(task(9, seed=3), 4)  # 4, 4, 1: a last batch smaller than the device count
    nets, results = [], []
    for on in ([tester.device], devices):
        net = tester.classifier(tester.bert(cfg, devices=on), devices=on)
        start = tester.params(net, tmp_path / f"start{len(on)}")
        step = tester.backend.FinetuneStep(net, tester.backend.make_loss(), tester.backend.make_trainer(net, 1e-2), on,
                                           tester.backend.split_batch_multi_inputs)
        results.append([step.read(step(X, y)) for X, y in steps])
        nets.append((net, on))
    for (l1, c1), (l2, c2) in zip(*results):
        assert l1 == pytest.approx(l2, rel=1e-5) and c1 == c2
    tokens, segments, valid_lens, _ = task(9, seed=3)
    (one, _), (two, _) = nets
    probs = [tester.backend.predict_proba(net, tokens, segments, valid_lens, on) for net, on in nets]
    np.testing.assert_allclose(probs[1], probs[0], rtol=0, atol=1e-6)
    untrained = tester.classifier(tester.bert(cfg))
    assert np.abs(tester.backend.predict_proba(untrained, tokens, segments, valid_lens, [tester.device])
                  - probs[0]).max() > 1e-2  # they did train
    assert tester.backend.evaluate_accuracy(two, test, devices) == \
        pytest.approx(tester.backend.evaluate_accuracy(one, test, [tester.device]))
    after = [tester.params(net, tmp_path / f"after{len(on)}") for net, on in nets]
    for k in start:
        if k.endswith("W_k.bias"):
            assert np.abs(after[1][k] - after[0][k]).max() <= 2 * 1e-2 * len(steps), k
        else:
            np.testing.assert_allclose(after[1][k], after[0][k], rtol=1e-4, atol=1e-5, err_msg=k)
