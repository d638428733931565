"""The MXNet fast path computes what the book path computes: fused attention, hybridized blocks,
trimmed and bucketed batches, the device-side training loop."""
import re
import time

import numpy as onp
import pytest

from needs import require_backend

require_backend("mxnet")
import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon, init, np, npx  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

from nlibert.backends.mxnet import (BERTClassifier, BERTModel, evaluate_accuracy, set_fused_attention,  # noqa: E402
                                    train_ch13, train_fast)
from nlibert.backends.mxnet.model import MultiHeadAttention, masked_softmax  # noqa: E402
from nlibert.backends.mxnet.train import FinetuneStep, train_batch_ch13  # noqa: E402
from nlibert.core.batching import BatchIterator, bucket_batch_indices  # noqa: E402

npx.set_np()
pytestmark = pytest.mark.filterwarnings("ignore:ndarray.as_in_context:DeprecationWarning",
                                        "ignore:All children of this Sequential:UserWarning")

V, H, FFN, HEADS, LAYERS, MAX_LEN = 60, 32, 64, 4, 2, 40
CPU = [mx.cpu()]


def tiny_classifier(dropout=0.0, fused=False, seed=0, cls_only=None):
    """`fused` alone means the whole fast model: fused attention and the last block at <cls> only."""
    mx.random.seed(seed)
    bert = BERTModel(V, H, FFN, HEADS, LAYERS, dropout, MAX_LEN, fused_attention=fused)
    bert.initialize(init.Xavier())
    net = BERTClassifier(bert, cls_only=fused if cls_only is None else cls_only)
    net.output.initialize()
    return net


def params_of(net):
    return {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}


def copy_params(src, dst):
    for (k, p), (k2, q) in zip(src._collect_params_with_prefix().items(), dst._collect_params_with_prefix().items()):
        assert k == k2
        q.set_data(p.data())


def packed_batch(n=24, T=20, seed=0):
    rng = onp.random.default_rng(seed)
    valid_lens = rng.integers(3, T + 1, n).astype(onp.int32)
    valid_lens[0] = T
    columns = onp.arange(T)
    ids = onp.where(columns < valid_lens[:, None], rng.integers(5, V, (n, T)), 1).astype(onp.int32)
    ids[:, 0] = 2
    split = onp.maximum(valid_lens // 2, 2)
    segments = ((columns >= split[:, None]) & (columns < valid_lens[:, None])).astype(onp.int32)
    labels = rng.integers(0, 3, n).astype(onp.int64)
    return (ids, segments, valid_lens), labels


def as_mx(X):
    return (np.array(X[0], dtype="int32"), np.array(X[1], dtype="int32"), np.array(X[2], dtype="float32"))


class _Softmax(nn.HybridBlock):
    def hybrid_forward(self, F, X, valid_lens):
        return masked_softmax(X, valid_lens)


def test_masked_softmax_in_a_graph_is_the_imperative_one(rng):
    X = np.array(rng.normal(size=(4, 3, 6)).astype("float32"))
    lens = np.array([6, 2, 1, 4], dtype="float32")
    block = _Softmax()
    expected = block(X, lens).asnumpy()
    block.hybridize()
    onp.testing.assert_array_equal(block(X, lens).asnumpy(), expected)
    onp.testing.assert_array_equal(expected, masked_softmax(X, lens).asnumpy())


def test_fused_attention_equals_the_book_attention(rng):
    book = MultiHeadAttention(H, HEADS, dropout=0.0)
    book.initialize(init.Xavier())
    fused = MultiHeadAttention(H, HEADS, dropout=0.0, fused_attention=True)
    fused.initialize()
    copy_params(book, fused)
    X = np.array(rng.normal(size=(3, 7, H)).astype("float32"))
    lens = np.array([7, 4, 1], dtype="float32")
    grads = []
    for block in (book, fused):
        X.attach_grad()
        with autograd.record():
            out = block(X, X, X, lens)
            loss = (out * out).sum()
        loss.backward()
        grads.append((out.asnumpy(), X.grad.asnumpy(),
                      {k: p.grad().asnumpy() for k, p in block._collect_params_with_prefix().items()}))
    (out_b, gx_b, gp_b), (out_f, gx_f, gp_f) = grads
    onp.testing.assert_allclose(out_f, out_b, rtol=1e-5, atol=1e-5)
    onp.testing.assert_allclose(gx_f, gx_b, rtol=1e-4, atol=1e-5)
    for k in gp_b:
        onp.testing.assert_allclose(gp_f[k], gp_b[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("fused", [False, True])
def test_hybridized_equals_imperative_forward_and_backward(fused):
    imperative, hybrid = tiny_classifier(fused=fused), tiny_classifier(fused=fused)
    copy_params(imperative, hybrid)
    hybrid.hybridize()
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    for T in (20, 12, 20):  # a second width, then the first again: the graph follows the shape
        (X, y) = packed_batch(T=T, seed=T)
        X, y = as_mx(X), np.array(y)
        out = []
        for net in (imperative, hybrid):
            with autograd.record():
                logits = net(X)
                l = loss(logits, y).sum()
            l.backward()
            grads = {k: p.grad().asnumpy() for k, p in net._collect_params_with_prefix().items()}
            out.append((logits.asnumpy(), grads))
        onp.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
        for k in out[0][1]:
            onp.testing.assert_allclose(out[1][1][k], out[0][1][k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert hybrid.encoder.blks[0]._cached_op is not None  # it really ran as a graph


def test_fused_logits_equal_book_logits_and_the_switch_drops_stale_graphs():
    net = tiny_classifier()
    X = as_mx(packed_batch()[0])
    book = net(X).asnumpy()
    net.hybridize()
    onp.testing.assert_allclose(net(X).asnumpy(), book, rtol=1e-6, atol=1e-6)
    set_fused_attention(net, True)
    assert net.encoder.blks[0]._cached_op is None
    fused = net(X).asnumpy()
    assert onp.abs(fused - book).max() <= 1e-5
    set_fused_attention(net, False)
    onp.testing.assert_allclose(net(X).asnumpy(), book, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_trimmed_and_bucketed_batches_give_the_padded_logits(fused):
    net = tiny_classifier(fused=fused)
    (ids, segments, lens), _ = packed_batch(n=40, T=20)
    padded = net(as_mx((ids, segments, lens))).asnumpy()
    it = BatchIterator((ids, segments, lens), onp.arange(40), 8, shuffle=True, seed=0,
                       sampler=bucket_batch_indices(lens, multiple=4), trim=True, pad_multiple=4)
    seen = []
    for X, idx in it:
        onp.testing.assert_allclose(net(as_mx(X)).asnumpy(), padded[idx], rtol=1e-5, atol=1e-5)
        seen += idx.tolist()
    assert sorted(seen) == list(range(40))


def test_a_fast_step_is_the_book_step():
    X, y = packed_batch(n=16)
    results = []
    for fast in (False, True):
        net = tiny_classifier(fused=fast)
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
        loss = gluon.loss.SoftmaxCrossEntropyLoss()
        out = FinetuneStep(net, loss, trainer, CPU)(X, y) if fast else train_batch_ch13(net, X, y, loss, trainer, CPU)
        results.append((out, params_of(net)))
    (book_loss, book_correct), book_params = results[0]
    (fast_loss, fast_correct), fast_params = results[1]
    assert all(isinstance(a, np.ndarray) and a.ndim == 0 for a in (fast_loss, fast_correct))  # on the device
    assert float(fast_loss) == pytest.approx(book_loss, rel=1e-5)
    assert float(fast_correct) == book_correct
    for k in book_params:
        onp.testing.assert_allclose(fast_params[k], book_params[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_micro_batches_make_the_whole_batch_step():
    """--micro-batch: 16 rows as chunks of 5, 5, 5, 1, their gradients summed, give the loss, count
    and parameters of the whole batch at once (SGD, so a parameter moves by lr * gradient)."""
    (X, y) = packed_batch(n=16)
    results = []
    for micro_batch in (None, 5):
        net = tiny_classifier(fused=True)
        calls = []
        net.register_forward_hook(lambda block, inputs, output: calls.append(len(output)))
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
        step = FinetuneStep(net, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, CPU, micro_batch=micro_batch)
        sums = [step.read(step(X, y)) for _ in range(3)]
        results.append((sums, calls, params_of(net)))
    (whole_sums, whole_calls, whole_params), (chunk_sums, chunk_calls, chunk_params) = results
    assert whole_calls == [16] * 3 and chunk_calls == [5, 5, 5, 1] * 3
    for (a_loss, a_correct), (b_loss, b_correct) in zip(whole_sums, chunk_sums):
        assert b_loss == pytest.approx(a_loss, rel=1e-5) and b_correct == a_correct
    for k in whole_params:
        onp.testing.assert_allclose(chunk_params[k], whole_params[k], rtol=1e-4, atol=1e-6, err_msg=k)


def separable(num_batches, batch_size=16, seed=0):
    rng = onp.random.default_rng(seed)
    n = num_batches * batch_size
    (ids, segments, lens), _ = packed_batch(n=n, T=12, seed=seed)
    labels = rng.integers(0, 3, n).astype(onp.int64)
    ids[:, 1] = 3 + labels
    lens = onp.maximum(lens, 4).astype(onp.int32)
    columns = onp.arange(12)
    ids = onp.where(columns < lens[:, None], ids, 1).astype(onp.int32)
    segments = onp.where(columns < lens[:, None], segments, 0).astype(onp.int32)
    return (ids, segments, lens), labels


@pytest.mark.parametrize("graph", [False, True])
def test_train_fast_learns_and_prints_the_book_lines(capsys, graph):
    (ids, segments, lens), labels = separable(4)
    test_X, test_y = separable(2, seed=1)
    train_iter = BatchIterator((ids, segments, lens), labels, 16, shuffle=True, seed=0,
                               sampler=bucket_batch_indices(lens, 4 if graph else 1), trim=True,
                               pad_multiple=4 if graph else 1)
    test_iter = BatchIterator(test_X, test_y, 16, sampler=bucket_batch_indices(test_X[2]), trim=True)
    net = tiny_classifier(dropout=0.1, fused=True)
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 1e-2})
    seen = []
    records = train_fast(net, train_iter, test_iter, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, 15, CPU,
                         graph=graph, on_epoch=seen.append)
    assert [r.epoch for r in records] == list(range(1, 16)) and seen == records
    assert all(r.num_examples == 64 and r.examples_per_sec > 0 for r in records)
    # (On 4 batches sorted by length this toy learns more slowly than with random batches.)
    assert records[-1].loss < 0.6 * records[0].loss
    assert records[-1].test_acc >= 0.6  # chance is 1/3
    assert records[-1].test_acc == pytest.approx(evaluate_accuracy(net, test_iter, CPU))
    out = capsys.readouterr().out
    assert re.fullmatch(r"loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}\n"
                        r"\d+\.\d examples/sec on \[cpu\(0\)\]\n", out), out
    if graph:
        assert net.encoder.blks[0]._cached_op is not None


def test_train_fast_follows_train_ch13_step_for_step_on_the_same_batches():
    """Same seed, same (unbucketed) batches, dropout on: the fast loop's records are the book loop's."""
    histories = []
    for loop, fused in ((train_ch13, False), (train_fast, True)):
        (ids, segments, lens), labels = separable(4)
        train_iter = BatchIterator((ids, segments, lens), labels, 16, shuffle=True, seed=0)
        test_iter = BatchIterator(*separable(2, seed=1), 16)
        # (Same dropout draws need the same positions: the last block in full here.)
        net = tiny_classifier(dropout=0.1, fused=fused, cls_only=False)
        trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 1e-2})
        records = loop(net, train_iter, test_iter, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, 6, CPU,
                       verbose=False)
        histories.append([(r.loss, r.train_acc, r.test_acc) for r in records])
    onp.testing.assert_allclose(histories[1], histories[0], rtol=1e-4, atol=1e-5)


def test_train_fast_on_two_devices_equals_train_ch13():
    """Same batches, dropout 0, SGD: both loops (each splitting batches across two CPU contexts)
    reach the same weights."""
    devices = [mx.cpu(0), mx.cpu(1)]
    batches = [separable(1, seed=s) for s in range(3)]
    nets = []
    for loop, fused in ((train_ch13, False), (train_fast, True)):
        mx.random.seed(0)
        bert = BERTModel(V, H, FFN, HEADS, LAYERS, 0.0, MAX_LEN, fused_attention=fused)
        bert.initialize(init.Xavier(), ctx=devices)
        net = BERTClassifier(bert)
        net.output.initialize(ctx=devices)
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
        loop(net, batches, None, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, 2, devices, verbose=False)
        nets.append({k: p.data(mx.cpu(0)).asnumpy() for k, p in net._collect_params_with_prefix().items()})
    for k in nets[0]:
        onp.testing.assert_allclose(nets[1][k], nets[0][k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_bad_options_are_refused():
    net = tiny_classifier()
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 1e-3})
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    batches = [separable(1)]
    with pytest.raises(ValueError, match="bfloat16"):
        train_fast(net, batches, None, loss, trainer, 1, CPU, precision="bfloat16")
    with pytest.raises(ValueError, match="no batches"):
        train_fast(net, [], None, loss, trainer, 1, CPU)
    with pytest.raises(ValueError, match="devices"):
        train_fast(net, batches, None, loss, trainer, 1, [])


@pytest.mark.parametrize("hybridize", [False, True])
def test_the_last_block_at_cls_only_gives_the_same_logits_and_gradients(hybridize):
    full, cls = tiny_classifier(fused=True, cls_only=False), tiny_classifier(fused=True, cls_only=True)
    copy_params(full, cls)
    if hybridize:
        cls.hybridize()
    X, y = packed_batch()
    X, y = as_mx(X), np.array(y)
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    outs = []
    for net in (full, cls):
        with autograd.record():
            logits = net(X)
            l = loss(logits, y).sum()
        l.backward()
        outs.append((logits.asnumpy(), {k: p.grad().asnumpy() for k, p in net._collect_params_with_prefix().items()}))
    onp.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    for k in outs[0][1]:
        onp.testing.assert_allclose(outs[1][1][k], outs[0][1][k], rtol=1e-4, atol=1e-6, err_msg=k)
    # The shared encoder still gives every position to a caller that wants them all.
    assert cls.encoder(*X).shape == (len(y), X[0].shape[1], H)
    assert cls.encoder(X[0], X[1], X[2], True).shape == (len(y), 1, H)


class _SlowBackward(mx.operator.CustomOp):
    """The identity, whose backward sleeps before noting that it ran: MXNet's engine is still busy
    with the step after its loss has been read."""
    backward_done = False

    def forward(self, is_train, req, in_data, out_data, aux):
        _SlowBackward.backward_done = False  # runs after the previous step's update (it reads its weights)
        self.assign(out_data[0], req[0], in_data[0])

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        time.sleep(0.2)
        _SlowBackward.backward_done = True
        self.assign(in_grad[0], req[0], out_grad[0])


@mx.operator.register("nlibert_test_slow_backward")
class _SlowBackwardProp(mx.operator.CustomOpProp):
    def __init__(self):
        super().__init__(need_top_grad=True)

    def create_operator(self, ctx, shapes, dtypes):
        return _SlowBackward()


class _WithSlowBackward(gluon.Block):
    """The classifier plus 0 x a slow-backward branch from a parameter of its own: the loss does not
    depend on the branch's backward, so reading the loss does not wait for it (at the top of the net,
    MXNet's CPU engine would run it before the loss read anyway)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.w = gluon.Parameter("w", shape=(1,), init=init.One())

    def forward(self, X):
        slow = mx.nd.Custom(self.w.data().as_nd_ndarray(), op_type="nlibert_test_slow_backward").as_np_ndarray()
        return self.net(X) + 0 * slow


@pytest.mark.parametrize("loop", [train_ch13, train_fast])
def test_the_timer_stops_after_the_whole_step_not_the_loss_read(monkeypatch, loop):
    """Reading the loss waits for the forward pass only; the examples/sec must cover backward and the update."""
    from nlibert.core import training as training_module
    from nlibert.core.training import Timer
    seen = []

    class RecordingTimer(Timer):
        def stop(self):
            seen.append(_SlowBackward.backward_done)
            return super().stop()

    monkeypatch.setattr(training_module, "Timer", RecordingTimer)  # the loop driver's timer
    net = _WithSlowBackward(tiny_classifier())
    net.w.initialize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    loop(net, [separable(1, seed=s) for s in range(2)], None, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, 1,
         CPU, verbose=False)
    npx.waitall()  # leave nothing running into the next test, whatever the loop did
    assert seen and all(seen), seen
