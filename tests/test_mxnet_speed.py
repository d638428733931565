"""The MXNet fast path's faster operators (backends/mxnet/_kernels.py, the fused attention's swapaxes)
compute what MXNet's own compute: the same gradients to float32 rounding, accumulated with grad_req
'add' too, the same training steps with clipping and AdamW, and the book's path untouched."""
import os
import subprocess
import sys

import numpy as onp
import pytest

from needs import require_backend

require_backend("mxnet")
import mxnet as mx  # noqa: E402
from mxnet import autograd, gluon, init, np, npx  # noqa: E402

from nlibert.backends.mxnet import BERTClassifier, BERTModel, make_trainer, set_fused_attention  # noqa: E402
from nlibert.backends.mxnet import _kernels  # noqa: E402
from nlibert.backends.mxnet.model import AddNorm, BERTEncoder, MultiHeadAttention  # noqa: E402
from nlibert.backends.mxnet.train import FinetuneStep  # noqa: E402

npx.set_np()
pytestmark = pytest.mark.filterwarnings("ignore:All children of this Sequential:UserWarning")

V, H, FFN, HEADS, LAYERS, MAX_LEN = 60, 32, 64, 4, 2, 40


def _set_fast_backward(net, enabled):
    """The faster backward alone, with the fused attention left as it is."""
    for block in _blocks(net):
        if isinstance(block, (AddNorm, BERTEncoder)):
            block.fast_backward = enabled
    return net


def _blocks(block):
    yield block
    for child in block._children.values():
        yield from _blocks(child)


def _classifier(fast_backward, embedding_norm=False, grad_req="write"):
    mx.random.seed(0)
    bert = BERTModel(V, H, FFN, HEADS, LAYERS, 0.0, MAX_LEN, fused_attention=True, embedding_norm=embedding_norm)
    bert.initialize(init.Xavier())
    net = BERTClassifier(bert, cls_only=True)
    net.output.initialize()
    for param in net.collect_params().values():
        param.grad_req = grad_req
    return _set_fast_backward(net, fast_backward)


def _batch(n=12, T=16, seed=0):
    rng = onp.random.default_rng(seed)
    valid_lens = rng.integers(3, T + 1, n)
    ids = onp.where(onp.arange(T) < valid_lens[:, None], rng.integers(5, V, (n, T)), 1).astype(onp.int32)
    segments = (onp.arange(T) >= valid_lens[:, None] // 2).astype(onp.int32)
    return (ids, segments, valid_lens.astype(onp.int32)), rng.integers(0, 3, n).astype(onp.int64)


def _gradients(net, rounds=1):
    (ids, segments, lens), y = _batch()
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(rounds):
        with autograd.record():
            total = loss(net((np.array(ids), np.array(segments), np.array(lens, dtype="float32"))), np.array(y)).sum()
        total.backward()
    return {k: p.grad().asnumpy() for k, p in net._collect_params_with_prefix().items()}


def _assert_close(got, want, what):
    for k in want:
        if k.endswith("W_k.bias"):
            continue  # its true gradient is 0 (softmax ignores a shift shared by every key): rounding noise
        scale = max(onp.abs(want[k]).max(), 1e-6)
        assert onp.abs(got[k] - want[k]).max() <= 1e-5 * scale, f"{what}: {k}"


def test_layer_norm_backward_is_mxnets(rng):
    """The operator alone, on rows of every scale: dx, dgamma and dbeta to float32 rounding."""
    x = np.array(rng.normal(size=(6, 5, 48)) * rng.uniform(0.1, 10, size=(6, 5, 1)) + 3, dtype="float32")
    gamma, beta = (np.array(rng.normal(size=48), dtype="float32") for _ in range(2))
    dy = np.array(rng.normal(size=x.shape), dtype="float32")
    results = []
    for fast in (False, True):
        inputs = [a.copy() for a in (x, gamma, beta)]
        for a in inputs:
            a.attach_grad()
        with autograd.record():
            y = _kernels.layer_norm(*inputs, 1e-5) if fast else npx.layer_norm(*inputs, axis=-1, eps=1e-5)
        y.backward(dy)
        results.append([y.asnumpy()] + [a.grad.asnumpy() for a in inputs])
    for name, want, got in zip(("y", "dx", "dgamma", "dbeta"), *results):
        onp.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * onp.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("embedding_norm", [False, True])
def test_fast_backward_gives_mxnets_gradients(embedding_norm):
    """Every parameter's gradient, LayerNorms (the embedding's too) and position embedding included."""
    want = _gradients(_classifier(False, embedding_norm))
    _assert_close(_gradients(_classifier(True, embedding_norm)), want, "fast backward")


def test_fast_backward_adds_to_gradients_with_grad_req_add():
    """Micro-batches add gradients (grad_req 'add'); MXNet 1.9.1's autograd.Function would write
    over a parameter's: two backward passes must give twice one pass's gradient."""
    once = _gradients(_classifier(True))
    net = _classifier(True, grad_req="add")
    net.collect_params().zero_grad()
    _assert_close(_gradients(net, rounds=2), {k: 2 * g for k, g in once.items()}, "grad_req add")


@pytest.mark.parametrize("options", [dict(), dict(max_grad_norm=0.05), dict(optimizer="adamw", weight_decay=0.1),
                                     dict(micro_batch=5)])
def test_fast_backward_steps_are_mxnets_steps(options):
    """Three Adam(W) steps of the fast path with and without the faster backward: the same parameters
    (clipping, AdamW and micro-batches included)."""
    step_options = {k: v for k, v in options.items() if k in ("max_grad_norm", "micro_batch")}
    trainer_options = {k: v for k, v in options.items() if k in ("optimizer", "weight_decay")}
    params = []
    for fast in (False, True):
        net = _classifier(fast)
        step = FinetuneStep(net, gluon.loss.SoftmaxCrossEntropyLoss(), make_trainer(net, 1e-3, **trainer_options),
                            [mx.cpu()], **step_options)
        for seed in range(3):
            step.read(step(*_batch(seed=seed)))
        params.append({k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()})
    for k in params[0]:
        if not k.endswith("W_k.bias"):  # see _assert_close
            onp.testing.assert_allclose(params[1][k], params[0][k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_fused_heads_split_and_merge_as_the_books(rng):
    """swapaxes (fused attention) and transpose (the book's) move the same numbers: equal bit for bit."""
    X = np.array(rng.normal(size=(3, 7, 32)), dtype="float32")
    book, fused = MultiHeadAttention(32, 4, 0.0), MultiHeadAttention(32, 4, 0.0, fused_attention=True)
    split = fused.split_heads(X)
    assert (split.asnumpy() == book.split_heads(X).asnumpy()).all()
    assert (fused.merge_heads(split).asnumpy() == book.merge_heads(split).asnumpy()).all()


def test_set_fused_attention_switches_the_fast_backward_and_the_book_path_never_uses_it(monkeypatch):
    net = _classifier(False)
    set_fused_attention(net, False)
    switched = [b for b in _blocks(net) if isinstance(b, (AddNorm, BERTEncoder))]
    assert len(switched) == 1 + 2 * LAYERS and not any(b.fast_backward for b in switched)
    calls = []
    monkeypatch.setattr(_kernels, "layer_norm", lambda *a: calls.append("ln") or npx.layer_norm(*a[:3], axis=-1))
    monkeypatch.setattr(_kernels, "add_to_every_row", lambda x, p: calls.append("pos") or x + p)
    _gradients(net)
    assert calls == []  # the book's operators
    set_fused_attention(net, True)
    assert all(b.fast_backward for b in switched)
    _gradients(net)
    assert calls.count("ln") == 2 * LAYERS and calls.count("pos") == 1
    calls.clear()
    net((np.array(_batch()[0][0]), np.array(_batch()[0][1]), np.array(_batch()[0][2], dtype="float32")))
    assert calls == []  # outside autograd (evaluation, prediction) MXNet's own forward runs


def test_under_the_shared_pool_engine_mxnets_own_operators_run(tmp_path):
    """MXNET_ENGINE_TYPE=ThreadedEngine deadlocks a Python Function's backward once steps queue up:
    there the fast path keeps MXNet's operators, and queued steps finish."""
    script = tmp_path / "steps.py"
    script.write_text(
        "import nlibert, mxnet as mx\n"
        "from nlibert.backends.mxnet import _kernels\n"
        "import test_mxnet_speed as t\n"
        "assert not _kernels.ENGINE_ALLOWS\n"
        "net = t._classifier(True)\n"
        "for _ in range(20):\n"
        "    t._gradients(net)\n"
        "mx.nd.waitall()\n"
        "print('finished')\n")
    env = {**os.environ, "MXNET_ENGINE_TYPE": "ThreadedEngine",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "finished" in proc.stdout, proc.stderr[-2000:]
