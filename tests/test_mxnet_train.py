"""The MXNet training loop: device splitting, multi-device equivalence, the mean gradient (the loop in
every backend: tests/test_backend_train.py)."""
import numpy as onp
import pytest

from needs import require_backend

require_backend("mxnet")
import mxnet as mx  # noqa: E402
from mxnet import gluon, init, np, npx  # noqa: E402

from nlibert.backends.mxnet import (BERTClassifier, BERTModel, evaluate_accuracy,  # noqa: E402
                                    split_batch_multi_inputs)
from nlibert.backends.mxnet.train import train_batch_ch13  # noqa: E402

npx.set_np()

# gluon.utils.split_and_load (the book's splitter) calls MXNet's own deprecated as_in_context.
pytestmark = pytest.mark.filterwarnings("ignore:ndarray.as_in_context:DeprecationWarning")

TWO_CPUS = [mx.cpu(0), mx.cpu(1)]
from test_backend_train import V, batches, task  # noqa: E402  the toy task every backend learns


def _classifier(devices, dropout=0.0, seed=0):
    mx.random.seed(seed)
    bert = BERTModel(V, 16, 32, 2, 2, dropout, 16)
    bert.initialize(init.Xavier(), ctx=devices)
    net = BERTClassifier(bert)
    net.output.initialize(ctx=devices)
    return net


def test_split_batch_multi_inputs_splits_every_input_across_devices():
    tokens, segments, valid_lens, labels = task(5, seed=1)
    X = tuple(np.array(a) for a in (tokens, segments, valid_lens))
    X_shards, y_shards = split_batch_multi_inputs(X, np.array(labels), TWO_CPUS)
    assert len(X_shards) == len(y_shards) == 2
    assert [len(y) for y in y_shards] == [3, 2]  # even_split=False: uneven slices are fine
    for shard, y, ctx in zip(X_shards, y_shards, TWO_CPUS):
        assert len(shard) == 3 and all(a.ctx == ctx for a in shard) and y.ctx == ctx
    onp.testing.assert_array_equal(onp.concatenate([s[0].asnumpy() for s in X_shards]), tokens)
    onp.testing.assert_array_equal(onp.concatenate([y.asnumpy() for y in y_shards]), labels)
    X_shards, y_shards = split_batch_multi_inputs(tuple(a[:1] for a in X), np.array(labels[:1]), TWO_CPUS)
    assert len(X_shards) == len(y_shards) == 1  # one example: only the first device


def _params(net):
    return {k: p.data(p.list_ctx()[0]).asnumpy() for k, p in net._collect_params_with_prefix().items()}


def test_two_devices_train_like_one(tmp_path):
    """The book's data parallelism: shards' gradients are summed, so the step equals the one-device step.

    Plain SGD, so equal gradients give equal parameters. (With Adam, parameters whose gradient is
    analytically zero, such as the key bias W_k.bias that softmax cancels, take lr-sized steps
    driven by float noise, which differs with the summation order.)"""
    one, two = _classifier([mx.cpu(0)]), _classifier(TWO_CPUS)
    start = _params(one)
    assert all(onp.array_equal(start[k], v) for k, v in _params(two).items())  # same seed, same init
    steps = batches(task(21, seed=2), 7)  # shards of 4 and 3
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    results = []
    for net, devices in ((one, [mx.cpu(0)]), (two, TWO_CPUS)):
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
        results.append([train_batch_ch13(net, X, y, loss, trainer, devices) for X, y in steps])
    for (l1, c1), (l2, c2) in zip(*results):
        assert l1 == pytest.approx(l2, rel=1e-5) and c1 == c2
    after_one, after_two = _params(one), _params(two)
    assert max(onp.abs(after_one[k] - start[k]).max() for k in start) > 1e-3  # they did train
    for k in start:
        onp.testing.assert_allclose(after_two[k], after_one[k], rtol=1e-5, atol=1e-5, err_msg=k)
    # Both device copies of a parameter stay identical.
    for p in two.collect_params().values():
        onp.testing.assert_array_equal(p.data(mx.cpu(0)).asnumpy(), p.data(mx.cpu(1)).asnumpy())
    # Evaluation splits too, including a last batch smaller than the device count.
    test = batches(task(9, seed=3), 4)  # 4, 4, 1
    assert evaluate_accuracy(two, test, TWO_CPUS) == pytest.approx(evaluate_accuracy(one, test, [mx.cpu(0)]))


def test_a_step_follows_the_mean_gradient_of_the_batch():
    """trainer.step(batch_size) divides the summed per-example gradients by the batch size (the book's MXNet
    `train_batch_ch13` calls `trainer.step(labels.shape[0])`)."""
    from mxnet import autograd
    net, reference = _classifier([mx.cpu()]), _classifier([mx.cpu()])
    (X, y), = batches(task(8, seed=8), 8)
    Xm = (np.array(X[0]), np.array(X[1]), np.array(X[2], dtype="float32"))
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    with autograd.record():
        mean_loss = loss(reference(Xm), np.array(y)).mean()
    mean_loss.backward()
    lr = 0.5
    expected = {k: p.data().asnumpy() - lr * p.grad().asnumpy()
                for k, p in reference._collect_params_with_prefix().items()}
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": lr})
    train_batch_ch13(net, X, y, loss, trainer, [mx.cpu()])
    for k, value in _params(net).items():
        onp.testing.assert_allclose(value, expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_training_batch_smaller_than_the_device_count_is_refused():
    net = _classifier(TWO_CPUS)
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 1e-3})
    (X, y), = batches(task(1, seed=4), 1)
    with pytest.raises(ValueError, match="batch of 1 examples cannot be split across 2 devices"):
        train_batch_ch13(net, X, y, gluon.loss.SoftmaxCrossEntropyLoss(), trainer, TWO_CPUS)
