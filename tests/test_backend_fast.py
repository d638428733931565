"""The fast path of every installed backend computes what the book path computes, through the
contract's names only: fused attention, the last block at <cls> only, trimmed and bucketed batches,
`FinetuneStep` (sums left on the device) against the book's `train_batch_ch13`, micro-batches,
`train_fast` against `train_ch13` (one device and two), its printed lines, precisions and the options
it refuses. What one framework alone has (fused attention inside one attention layer and its
gradients, hybridized graphs, forward hooks counting micro-batch chunks, MXNet's engine timing)
stays in tests/test_{torch,mxnet,jax}_only.py.

Steps are compared through what a step computes (its loss sums and counts) and the parameters it
leaves, with the book's Adam (`make_trainer`): a first Adam step moves an entry by lr * g / (|g| + eps),
so equal gradients give equal steps, except where the gradient is 0 in exact arithmetic (the key
bias `W_k.bias`, which the softmax cancels): there Adam turns float noise into steps of up to lr
whose sign depends on the summation order, and which change no output. Those are held to 2 lr.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from nlibert.backends import backend_info, installed_backends
from nlibert.core.batching import BatchIterator, bucket_batch_indices
from nlibert.core.config import BERTConfig

from test_backend_model import BackendTester
from test_backend_train import two_cpus

CONFIG = BERTConfig(vocab_size=60, num_hiddens=32, ffn_num_hiddens=64, num_heads=4, num_layers=2, dropout=0.0,
                    max_len=40)
pytestmark = pytest.mark.filterwarnings("ignore:ndarray.as_in_context:DeprecationWarning",
                                        "ignore:All children of this Sequential:UserWarning")


@pytest.fixture(scope="module", params=installed_backends())
def tester(request) -> BackendTester:
    return BackendTester(request.param)


def classifier(tester, dropout=0.0, fused=False, cls_only=None, devices=None):
    """`fused` alone means the whole fast model: fused attention and the last block at <cls> only."""
    bert = tester.bert(BERTConfig(**{**CONFIG.to_dict(), "dropout": dropout}), devices=devices, fused_attention=fused)
    return tester.classifier(bert, devices=devices, cls_only=fused if cls_only is None else cls_only)


def packed_batch(n=24, T=20, seed=0):
    """Packed rows: <cls> tokens <sep> tokens <sep>, then <pad> (1) up to T; lengths 3..T."""
    rng = np.random.default_rng(seed)
    valid_lens = rng.integers(3, T + 1, n).astype(np.int32)
    valid_lens[0] = T  # one row uses the full width
    columns = np.arange(T)
    ids = np.where(columns < valid_lens[:, None], rng.integers(5, CONFIG.vocab_size, (n, T)), 1).astype(np.int32)
    ids[:, 0] = 2
    split = np.maximum(valid_lens // 2, 2)
    segments = ((columns >= split[:, None]) & (columns < valid_lens[:, None])).astype(np.int32)
    labels = rng.integers(0, 3, n).astype(np.int64)
    return (ids, segments, valid_lens), labels


def separable(num_batches, batch_size=16, seed=0):
    """The label is which of 3 marker tokens follows <cls>."""
    rng = np.random.default_rng(seed)
    n = num_batches * batch_size
    (ids, segments, lens), _ = packed_batch(n=n, T=12, seed=seed)
    labels = rng.integers(0, 3, n).astype(np.int64)
    ids[:, 1] = 3 + labels
    lens = np.maximum(lens, 4).astype(np.int32)
    columns = np.arange(12)
    ids = np.where(columns < lens[:, None], ids, 1).astype(np.int32)
    segments = np.where(columns < lens[:, None], segments, 0).astype(np.int32)
    return (ids, segments, lens), labels


def assert_same_step(tester, tmp_path, after: list, before: dict, lr: float, steps: int = 3, rtol=1e-4,
                     atol=1e-5) -> None:
    """Parameters (canonical names) that two nets reached from the same `before` in `steps` steps:
    equal within rtol/atol, `W_k.bias` within 2 lr a step (the module docstring's reason); and they
    did move. Adam's step is about lr whatever a gradient's size, so an entry whose gradient sits at
    float rounding level moves by rounding noise times lr/|gradient|: a few such entries (at most
    0.5% of a tensor) may differ up to 2 lr a step too (measured: JAX's staged step, 1 of 1,024
    entries of `hidden.0.weight` 4.8e-5 off after 6 steps at lr 1e-3)."""
    reached = [tester.params(net, tmp_path / f"after{i}") for i, net in enumerate(after)]
    assert max(np.abs(reached[0][k] - before[k]).max() for k in before) > 0.5 * lr  # they did train
    for k in before:
        diff = np.abs(reached[1][k] - reached[0][k])
        assert diff.max() <= 2 * lr * steps + 1e-6, k
        if k.endswith("W_k.bias"):
            continue
        off = diff > atol + rtol * np.abs(reached[0][k])
        assert off.sum() <= max(1, 0.005 * off.size), (k, int(off.sum()), float(diff.max()))


# --- the model -----------------------------------------------------------------------------------

def test_fused_attention_gives_the_book_paths_outputs_and_the_switch_goes_both_ways(tester):
    """set_fused_attention: the same scores, -1e6 fill and softmax, so every output equals the book
    path's within atol 5e-6; measured (encoded_X, mlm_Y_hat, nsp_Y_hat, logits) torch 9.5e-7, 6.0e-7,
    1.2e-7, 1.5e-7; mxnet 1.2e-6, 9.5e-7, 6.0e-7, 1.0e-7; jax 0 (XLA computes both layouts alike
    here; it ran the fused branch). Switched back, the book path's outputs exactly; a model built
    fused gives the switched model's."""
    bert = tester.bert(BERTConfig(**{**CONFIG.to_dict(), "dropout": 0.1}))  # evaluation: dropout off
    net = tester.classifier(bert)
    (tokens, segments, lens), _ = packed_batch()
    positions = np.array([[0, 9]] * len(lens), np.int32)

    def outputs():
        return [*tester.outputs(bert, tokens, segments, lens, positions), tester.logits(net, tokens, segments, lens)]
    book = outputs()
    assert tester.backend.set_fused_attention(bert, True) is bert
    assert tester.backend.set_fused_attention(net, True) is net
    fused = outputs()
    for name, a, b in zip(("encoded_X", "mlm_Y_hat", "nsp_Y_hat", "logits"), book, fused):
        np.testing.assert_allclose(b, a, rtol=0, atol=5e-6, err_msg=name)
    tester.backend.set_fused_attention(bert, False)
    tester.backend.set_fused_attention(net, False)
    for name, a, b in zip(("encoded_X", "mlm_Y_hat", "nsp_Y_hat", "logits"), book, outputs()):
        np.testing.assert_array_equal(b, a, err_msg=name)
    built = tester.classifier(tester.bert(BERTConfig(**{**CONFIG.to_dict(), "dropout": 0.1}), fused_attention=True))
    np.testing.assert_allclose(tester.logits(built, tokens, segments, lens), fused[3], rtol=0, atol=1e-6)


def test_fused_attention_drops_out_in_training_only(tester):
    net = classifier(tester, dropout=0.5, fused=True)
    (X, y) = packed_batch(n=8)
    step = tester.backend.FinetuneStep(net, tester.backend.make_loss(), tester.backend.make_trainer(net, 0.0),
                                       [tester.device])
    losses = [step.read(step(X, y))[0] for _ in range(2)]
    assert losses[0] != losses[1]  # lr 0: only the masks differ
    np.testing.assert_array_equal(tester.logits(net, *X), tester.logits(net, *X))


@pytest.mark.parametrize("fused", [False, True])
def test_the_last_block_at_cls_only_gives_the_same_logits_and_step(tester, tmp_path, fused):
    """The last block computing <cls> only changes nothing the classifier reads: the same logits
    (atol 1e-6; JAX measured 8.9e-8 book path, 7.5e-8 fused), the same loss and gradients, so the
    same Adam step (the module docstring)."""
    (X, y) = packed_batch()
    nets = [classifier(tester, fused=fused, cls_only=cls_only) for cls_only in (False, True)]
    before = tester.params(nets[0], tmp_path / "before")
    assert all(np.array_equal(v, tester.params(nets[1], tmp_path / "cls")[k]) for k, v in before.items())
    np.testing.assert_allclose(tester.logits(nets[1], *X), tester.logits(nets[0], *X), rtol=0, atol=1e-6)
    lr, sums = 1e-3, []
    for net in nets:
        step = tester.backend.FinetuneStep(net, tester.backend.make_loss(), tester.backend.make_trainer(net, lr),
                                           [tester.device])
        sums.append(step.read(step(X, y)))
    assert sums[1][0] == pytest.approx(sums[0][0], rel=1e-5) and sums[1][1] == sums[0][1]
    assert_same_step(tester, tmp_path, nets, before, lr)


@pytest.mark.parametrize("fused", [False, True])
def test_trimmed_and_bucketed_batches_give_the_padded_logits(tester, fused):
    net = classifier(tester, fused=fused)
    (ids, segments, lens), _ = packed_batch(n=40, T=20)
    padded = tester.logits(net, ids, segments, lens)
    it = BatchIterator((ids, segments, lens), np.arange(40), 8, shuffle=True, seed=0,
                       sampler=bucket_batch_indices(lens, multiple=4), trim=True, pad_multiple=4)
    seen = []
    for X, idx in it:
        assert X[0].shape[1] < 20 or lens[idx].max() > 16
        np.testing.assert_allclose(tester.logits(net, *X), padded[idx], rtol=1e-5, atol=1e-5)
        seen += idx.tolist()
    assert sorted(seen) == list(range(40))


# --- steps -----------------------------------------------------------------------------------------

def test_a_fast_step_is_the_book_step(tester, tmp_path):
    """FinetuneStep on the fast model is train_batch_ch13 on the book's: the same loss sum, count and
    parameters after a step; its sums stay on the device (not floats) until `read`."""
    X, y = packed_batch(n=16)
    lr, results, nets = 1e-3, [], []
    for fast in (False, True):
        net = classifier(tester, fused=fast)
        if not fast:
            before = tester.params(net, tmp_path / "before")
        trainer, loss = tester.backend.make_trainer(net, lr), tester.backend.make_loss()
        if fast:
            step = tester.backend.FinetuneStep(net, loss, trainer, [tester.device])
            sums = step(X, y)
            assert not any(isinstance(s, (float, int)) for s in sums)
            results.append(step.read(sums))
        else:
            results.append(tester.backend.train_batch_ch13(net, X, y, loss, trainer, [tester.device]))
        nets.append(net)
    (book_loss, book_correct), (fast_loss, fast_correct) = results
    assert fast_loss == pytest.approx(book_loss, rel=1e-5) and fast_correct == book_correct
    assert_same_step(tester, tmp_path, nets, before, lr)


def test_micro_batches_make_the_whole_batch_step(tester, tmp_path):
    """`micro_batch` 5: 16 rows as chunks of 5, 5, 5, 1, their gradients summed, give the loss, count
    and parameters of the whole batch at once, three steps running. Measured: losses 2.4e-8 (torch),
    1.0e-8 (mxnet), 1.1e-7 (jax) relative; parameters but W_k.bias 2.1e-6, 5.2e-7, 1.2e-7."""
    X, y = packed_batch(n=16)
    lr, results, nets = 1e-3, [], []
    for micro_batch in (None, 5):
        net = classifier(tester, fused=True)
        before = tester.params(net, tmp_path / "before")
        step = tester.backend.FinetuneStep(net, tester.backend.make_loss(), tester.backend.make_trainer(net, lr),
                                           [tester.device], micro_batch=micro_batch)
        results.append([step.read(step(X, y)) for _ in range(3)])
        nets.append(net)
    for (a_loss, a_correct), (b_loss, b_correct) in zip(*results):
        assert b_loss == pytest.approx(a_loss, rel=1e-6) and b_correct == a_correct
    assert_same_step(tester, tmp_path, nets, before, lr)


# --- train_fast ------------------------------------------------------------------------------------

def test_train_fast_learns_and_prints_the_book_lines(tester, capsys):
    """30 epochs of 4 batches sorted by length (this toy learns more slowly than with random
    batches): measured, the best of the last ten losses / the first: torch < 0.01, mxnet 0.35, jax 0.04;
    best test acc of the last ten 1.0, 0.97, 1.0."""
    (ids, segments, lens), labels = separable(4)
    test_X, test_y = separable(2, seed=1)
    train_iter = BatchIterator((ids, segments, lens), labels, 16, shuffle=True, seed=0,
                               sampler=bucket_batch_indices(lens), trim=True)
    test_iter = BatchIterator(test_X, test_y, 16, sampler=bucket_batch_indices(test_X[2]), trim=True)
    net = classifier(tester, dropout=0.1, fused=True)
    seen = []
    records = tester.backend.train_fast(net, train_iter, test_iter, tester.backend.make_loss(),
                                        tester.backend.make_trainer(net, 1e-2), 30, [tester.device],
                                        on_epoch=seen.append)
    assert [r.epoch for r in records] == list(range(1, 31)) and seen == records
    assert all(r.num_examples == 64 and r.examples_per_sec > 0 and r.seconds > 0 for r in records)
    # At lr 1e-2 this toy's loss bounces in the last epochs (MXNet, measured: 0.42 to 0.84 between
    # epochs 25 and 30, and float rounding alone moves which epoch is low), so judge the last ten.
    assert min(r.loss for r in records[-10:]) < 0.5 * records[0].loss
    assert max(r.test_acc for r in records[-10:]) >= 0.8  # chance is 1/3
    assert records[-1].test_acc == pytest.approx(tester.backend.evaluate_accuracy(net, test_iter, [tester.device]))
    out = capsys.readouterr().out
    assert re.fullmatch(r"loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}\n"
                        rf"\d+\.\d examples/sec on {re.escape(str([tester.device]))}\n", out), out
    assert out.startswith(f"loss {records[-1].loss:.3f}, train acc {records[-1].train_acc:.3f}, "
                          f"test acc {records[-1].test_acc:.3f}\n")


def test_train_fast_follows_train_ch13_step_for_step_on_the_same_batches(tester, request):
    """Same seed, same (unbucketed) batches, dropout on: the fast loop (fused attention) draws the
    book loop's dropout masks, so its records are the book loop's. (Same dropout draws need the same
    positions: the last block in full here.)"""
    if tester.name == "jax":
        # Measured: with the book's attention in both loops the records are equal to the last digit;
        # JAX's fused attention draws its attention-dropout mask over (B, h, T, T), the book path over
        # (B*h, T, T), so the same key gives other masks (2 epochs: losses 1.2236, 1.0513 vs 1.2225, 1.0691).
        request.applymarker(pytest.mark.xfail(strict=True, reason="JAX's fused attention draws other dropout masks "
                                              "than its book attention (another layout of the same weights)"))
    histories = []
    for loop, fused in (("train_ch13", False), ("train_fast", True)):
        (ids, segments, lens), labels = separable(4)
        train_iter = BatchIterator((ids, segments, lens), labels, 16, shuffle=True, seed=0)
        test_iter = BatchIterator(*separable(2, seed=1), 16)
        net = classifier(tester, dropout=0.1, fused=fused, cls_only=False)
        records = getattr(tester.backend, loop)(net, train_iter, test_iter, tester.backend.make_loss(),
                                                tester.backend.make_trainer(net, 1e-2), 6, [tester.device],
                                                verbose=False)
        histories.append([(r.loss, r.train_acc, r.test_acc) for r in records])
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-4, atol=1e-5)


def test_train_fast_and_train_ch13_reach_the_same_weights_on_the_same_batches(tester, tmp_path):
    """Dropout 0, the same batches, the fast model in the fast loop and the book's in the book's: the
    same optimisation (3 batches, 2 epochs)."""
    batches = [separable(1, seed=s) for s in range(3)]
    lr, nets = 1e-3, []
    for loop, fused in (("train_ch13", False), ("train_fast", True)):
        net = classifier(tester, fused=fused)
        if not fused:
            before = tester.params(net, tmp_path / "before")
        getattr(tester.backend, loop)(net, batches, None, tester.backend.make_loss(),
                                      tester.backend.make_trainer(net, lr), 2, [tester.device], verbose=False)
        nets.append(net)
    assert_same_step(tester, tmp_path, nets, before, lr, steps=6)


def test_train_fast_on_two_devices_equals_train_ch13(tester, tmp_path):
    """Same batches, dropout 0: both loops, each splitting batches across two CPU devices, reach the
    same weights (3 batches, 2 epochs) and compute the same function (`predict_proba` within 1e-5;
    MXNet measured 1.6e-6)."""
    devices = two_cpus(tester)
    batches = [separable(1, seed=s) for s in range(3)]
    lr, probs, nets = 1e-2, [], []
    for loop, fused in (("train_ch13", False), ("train_fast", True)):
        net = classifier(tester, fused=fused, cls_only=False, devices=devices)
        if not fused:
            before = tester.params(net, tmp_path / "before")
        getattr(tester.backend, loop)(net, batches, None, tester.backend.make_loss(),
                                      tester.backend.make_trainer(net, lr), 2, devices, verbose=False)
        probs.append(tester.backend.predict_proba(net, *batches[0][0], devices))
        nets.append(net)
    np.testing.assert_allclose(probs[1], probs[0], rtol=0, atol=1e-5)
    assert_same_step(tester, tmp_path, nets, before, lr, steps=6)


def test_bad_options_are_refused(tester):
    net = classifier(tester)
    loss, trainer = tester.backend.make_loss(), tester.backend.make_trainer(net, 1e-3)
    batches = [separable(1)]
    for precision in ["float16"] + [p for p in ("bfloat16",) if p not in backend_info(tester.name).precisions]:
        with pytest.raises(ValueError, match=precision):
            tester.backend.train_fast(net, batches, None, loss, trainer, 1, [tester.device], precision=precision)
    with pytest.raises(ValueError, match="no batches"):
        tester.backend.train_fast(net, [], None, loss, trainer, 1, [tester.device])
    with pytest.raises(ValueError, match="devices"):
        tester.backend.train_fast(net, batches, None, loss, trainer, 1, [])


@pytest.mark.parametrize("precision", ["bfloat16"])
def test_a_lower_precision_the_backend_has_trains_with_float32_parameters(tester, tmp_path, precision):
    if precision not in backend_info(tester.name).precisions:
        pytest.skip(f"the {tester.name} backend trains in {', '.join(backend_info(tester.name).precisions)} only "
                    "(test_bad_options_are_refused checks it says so)")
    batches = [separable(2)]
    net = classifier(tester, fused=True)
    records = tester.backend.train_fast(net, batches, batches, tester.backend.make_loss(),
                                        tester.backend.make_trainer(net, 1e-3), 1, [tester.device],
                                        precision=precision, verbose=False)
    assert np.isfinite(records[0].loss) and 0 <= records[0].test_acc <= 1
    assert all(v.dtype == np.float32 for v in tester.params(net, tmp_path / "net").values())
