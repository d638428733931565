"""The JAX training loop: devices, padding to a few compiled shapes, data parallelism over two host
devices, micro-batches, the mean gradient (the loop in every backend: tests/test_backend_train.py).

tests/conftest.py asks XLA for two host devices (`--xla_force_host_platform_device_count=2`), so
`cpu:0,cpu:1` is the code path `--device cuda:0,cuda:1` takes with GPUs."""
import functools
import types

import numpy as np
import pytest

from needs import require_backend

require_backend("jax")
import jax  # noqa: E402
import optax  # noqa: E402

from nlibert.backends.jax import (BERTClassifier, BERTModel, FinetuneStep, evaluate_accuracy,  # noqa: E402
                                  make_loss, parse_devices, set_seed, split_batch_multi_inputs,
                                  try_all_gpus)
from nlibert.backends.jax.checkpoint import _flatten  # noqa: E402
from nlibert.backends.jax.train import _padded_size, _Sums, train_batch_ch13  # noqa: E402

from test_backend_train import T, V, batches, task  # noqa: E402  the toy task every backend learns


def _classifier(dropout=0.0, seed=0, max_len=16):
    set_seed(seed)
    return BERTClassifier(BERTModel(V, 16, 32, 2, 2, dropout, max_len))


@functools.lru_cache(maxsize=None)
def _sgd_transform(lr):
    return optax.sgd(lr)  # one object per rate: the compiled steps are cached per transform


def _sgd(net, lr=0.5):
    """A trainer as FinetuneStep reads one (`tx`, `state`), with plain SGD: equal gradients give
    equal parameters (Adam would turn float noise in zero gradients into lr-sized steps)."""
    tx = _sgd_transform(lr)
    return types.SimpleNamespace(tx=tx, state=tx.init(net.params))


def _params(net):
    return {k: np.asarray(v) for k, v in _flatten(net.params).items()}


def test_devices_fall_back_to_the_cpu_and_bad_specs_are_named():
    assert try_all_gpus() == [jax.devices("cpu")[0]]  # no GPU on this machine
    assert parse_devices(None) == parse_devices("cpu") == [jax.devices("cpu")[0]]
    assert parse_devices("cpu:0,cpu:1") == jax.devices("cpu")[:2]
    for spec, message in (("cuda", "no CUDA device"), ("cuda:0", "is not available"), ("cpu:7", "is not available"),
                          ("tpu", "is not a device")):
        with pytest.raises(ValueError, match=message):
            parse_devices(spec)


def test_padded_sizes_are_a_short_ladder():
    assert [_padded_size(n) for n in (1, 8, 9, 12, 13, 17, 33, 65, 100, 128, 129, 512)] == \
        [8, 8, 12, 12, 16, 24, 48, 96, 128, 128, 192, 512]
    assert len({_padded_size(n) for n in range(1, 129)}) == 9  # widths 1..128: 9 compiled shapes
    assert all(n <= _padded_size(n) <= max(8, 1.5 * n) for n in range(1, 600))


def test_a_short_batch_shares_the_full_batches_program_and_compiles_are_counted():
    net = _classifier(max_len=T + 1)  # a module no other test compiled (jit's caches are per module's fields)
    step = FinetuneStep(net, make_loss(), _sgd(net), try_all_gpus())
    full, short = batches(task(40, seed=5), 32)  # 32 rows and the run's last 8, both padded to 32 x 8
    step.read(step(*full))
    first = step.compiles
    assert first["compiles"] >= 1 and first["compile_seconds"] > 0
    step.read(step(*short))
    assert step.evaluate([full, short]) >= 0
    after_eval = step.compiles
    step.evaluate([short])
    assert step.compiles == after_eval  # evaluation's short batch, too, ran the program its full batch compiled
    assert after_eval["compiles"] == first["compiles"] + 1  # one more: evaluation's


def test_split_batch_multi_inputs_splits_every_input_across_devices():
    devices = parse_devices("cpu:0,cpu:1")
    tokens, segments, valid_lens, labels = task(5, seed=1)
    X_shards, y_shards = split_batch_multi_inputs((tokens, segments, valid_lens), labels, devices)
    assert [len(y) for y in y_shards] == [3, 2]
    for shard, y, device in zip(X_shards, y_shards, devices):
        assert len(shard) == 3 and all(a.devices() == {device} for a in shard) and y.devices() == {device}
    np.testing.assert_array_equal(np.concatenate([np.asarray(s[0]) for s in X_shards]), tokens)
    X_shards, y_shards = split_batch_multi_inputs(tuple(a[:1] for a in (tokens, segments, valid_lens)),
                                                  labels[:1], devices)
    assert len(X_shards) == len(y_shards) == 1  # one example: only the first device


def test_a_step_follows_the_mean_gradient_of_the_batch():
    """The JAX book differentiates `softmax_cross_entropy_with_integer_labels(...).mean()`."""
    net, lr = _classifier(), 0.5
    (X, y), = batches(task(8, seed=8), 8)
    before = net.params

    def mean_loss(params):
        logits = net.apply(params, *(np.asarray(a) for a in X[:2]), X[2].astype(np.float32))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y.astype(np.int32)).mean()

    grads = jax.grad(mean_loss)(before)
    expected = {k: np.asarray(v) for k, v in _flatten(jax.tree_util.tree_map(lambda p, g: p - lr * g, before,
                                                                             grads)).items()}
    loss_sum, correct = train_batch_ch13(net, X, y, make_loss(), _sgd(net, lr), parse_devices("cpu"))
    assert loss_sum == pytest.approx(float(mean_loss(before)) * 8, rel=1e-5) and 0 <= correct <= 8
    for k, value in _params(net).items():
        np.testing.assert_allclose(value, expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_padding_rows_and_columns_changes_neither_the_step_nor_the_sums():
    """A batch the caller padded to the full width, or one the step pads to its compiled shape
    (7 rows -> 8, width 6 -> 8), trains exactly like the tight batch would: padded columns are
    masked keys, padded rows have weight 0."""
    (X, y), = batches(task(7, seed=9), 7)
    wide = (np.pad(X[0], ((0, 0), (0, 10)), constant_values=1), np.pad(X[1], ((0, 0), (0, 10))), X[2])
    results = []
    for batch in (X, wide):
        net = _classifier()
        results.append((train_batch_ch13(net, batch, y, make_loss(), _sgd(net), parse_devices("cpu")), _params(net)))
    (sums_tight, tight), (sums_wide, padded) = results
    assert sums_tight[0] == pytest.approx(sums_wide[0], rel=1e-6) and sums_tight[1] == sums_wide[1]
    for k in tight:
        np.testing.assert_allclose(padded[k], tight[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_two_devices_train_like_one():
    """Data parallel over `cpu:0,cpu:1`: parameters replicated, rows sharded, the gradient reduced
    across the devices by XLA: the same steps as one device, up to the summation order."""
    one, two = _classifier(), _classifier()
    start = _params(one)
    steps = batches(task(21, seed=2), 7)  # 7 rows: padded to 8, 4 per device
    results = []
    for net, devices in ((one, parse_devices("cpu")), (two, parse_devices("cpu:0,cpu:1"))):
        step = FinetuneStep(net, make_loss(), _sgd(net), devices)
        results.append([step.read(step(X, y)) for X, y in steps])
        assert all(len(leaf.devices()) == len(devices) for leaf in jax.tree_util.tree_leaves(net.params))
    for (l1, c1), (l2, c2) in zip(*results):
        assert l1 == pytest.approx(l2, rel=1e-5) and c1 == c2
    after_one, after_two = _params(one), _params(two)
    assert max(np.abs(after_one[k] - start[k]).max() for k in start) > 1e-3  # they did train
    for k in start:
        np.testing.assert_allclose(after_two[k], after_one[k], rtol=1e-5, atol=1e-5, err_msg=k)
    test = batches(task(9, seed=3), 4)  # 4, 4, 1: a last batch smaller than the device count
    assert evaluate_accuracy(two, test, parse_devices("cpu:0,cpu:1")) == \
        pytest.approx(evaluate_accuracy(one, test, parse_devices("cpu")))


def test_micro_batches_give_the_whole_batch_update():
    """`micro_batch` 3 computes 8 rows in chunks (3, 3, 2 padded to 3) under `lax.scan` and adds
    their gradients: the same step as the whole batch at once."""
    (X, y), = batches(task(8, seed=4), 8)
    results = []
    for micro_batch in (None, 3):
        net = _classifier()
        step = FinetuneStep(net, make_loss(), _sgd(net), parse_devices("cpu"), micro_batch=micro_batch)
        results.append((step.read(step(X, y)), _params(net)))
    (whole_sums, whole), (chunk_sums, chunked) = results
    assert chunk_sums[0] == pytest.approx(whole_sums[0], rel=1e-6) and chunk_sums[1] == whole_sums[1]
    for k in whole:
        np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_step_sums_stay_on_the_device_until_read():
    sums = _Sums([jax.numpy.float32(1.5)]) + _Sums([jax.numpy.float32(2.25)])
    total = sum([sums, _Sums([jax.numpy.float32(0.25)])])  # sum() starts from 0
    assert len(total.parts) == 3 and total.total() == 4.0
