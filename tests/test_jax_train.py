"""The JAX training loop: devices, padding to a few compiled shapes, data parallelism over two host
devices, micro-batches, the mean gradient, learning a tiny task, printing, predicting.

tests/conftest.py asks XLA for two host devices (`--xla_force_host_platform_device_count=2`), so
`cpu:0,cpu:1` is the code path `--device cuda:0,cuda:1` takes with GPUs."""
import functools
import re
import types

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import optax  # noqa: E402

from nlibert.backends.jax import (BERTClassifier, BERTModel, FinetuneStep, evaluate_accuracy,  # noqa: E402
                                  make_loss, make_trainer, parse_devices, predict_proba, set_seed,
                                  split_batch_multi_inputs, train_ch13, try_all_gpus)
from nlibert.backends.jax.checkpoint import _flatten  # noqa: E402
from nlibert.backends.jax.train import _padded_size, _Sums, train_batch_ch13  # noqa: E402

V, T = 12, 6


def _task(n, seed):
    """A separable toy NLI: the label is which of three 'verb' tokens (5, 6, 7) sits at position 2."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    tokens = rng.integers(8, V, size=(n, T)).astype("int32")
    tokens[:, 0], tokens[:, 2], tokens[:, 3] = 2, 5 + labels, 3  # <cls> x verb <sep> ...
    valid_lens = rng.integers(4, T + 1, size=n).astype("int32")
    segments = (np.arange(T)[None, :] >= 4).astype("int32").repeat(n, axis=0)
    for i, n_valid in enumerate(valid_lens):
        tokens[i, n_valid:], segments[i, n_valid:] = 1, 0  # <pad>
    return tokens, segments, valid_lens, labels.astype("int64")


def _batches(arrays, batch_size):
    tokens, segments, valid_lens, labels = arrays
    return [((tokens[i:i + batch_size], segments[i:i + batch_size], valid_lens[i:i + batch_size]),
             labels[i:i + batch_size]) for i in range(0, len(labels), batch_size)]


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
    full, short = _batches(_task(40, seed=5), 32)  # 32 rows and the run's last 8, both padded to 32 x 8
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
    tokens, segments, valid_lens, labels = _task(5, seed=1)
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
    (X, y), = _batches(_task(8, seed=8), 8)
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
    (X, y), = _batches(_task(7, seed=9), 7)
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
    batches = _batches(_task(21, seed=2), 7)  # 7 rows: padded to 8, 4 per device
    results = []
    for net, devices in ((one, parse_devices("cpu")), (two, parse_devices("cpu:0,cpu:1"))):
        step = FinetuneStep(net, make_loss(), _sgd(net), devices)
        results.append([step.read(step(X, y)) for X, y in batches])
        assert all(len(leaf.devices()) == len(devices) for leaf in jax.tree_util.tree_leaves(net.params))
    for (l1, c1), (l2, c2) in zip(*results):
        assert l1 == pytest.approx(l2, rel=1e-5) and c1 == c2
    after_one, after_two = _params(one), _params(two)
    assert max(np.abs(after_one[k] - start[k]).max() for k in start) > 1e-3  # they did train
    for k in start:
        np.testing.assert_allclose(after_two[k], after_one[k], rtol=1e-5, atol=1e-5, err_msg=k)
    test = _batches(_task(9, seed=3), 4)  # 4, 4, 1: a last batch smaller than the device count
    assert evaluate_accuracy(two, test, parse_devices("cpu:0,cpu:1")) == \
        pytest.approx(evaluate_accuracy(one, test, parse_devices("cpu")))


def test_micro_batches_give_the_whole_batch_update():
    """`micro_batch` 3 computes 8 rows in chunks (3, 3, 2 padded to 3) under `lax.scan` and adds
    their gradients: the same step as the whole batch at once."""
    (X, y), = _batches(_task(8, seed=4), 8)
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


def test_train_ch13_learns_a_tiny_task_and_prints_the_books_lines(capsys):
    net = _classifier(dropout=0.1)
    train, test = _batches(_task(48, seed=5), 12), _batches(_task(24, seed=6), 12)
    seen = []
    records = train_ch13(net, train, test, make_loss(), make_trainer(net, 1e-2), 8, parse_devices("cpu"),
                         on_epoch=seen.append)
    assert [r.epoch for r in records] == list(range(1, 9)) and seen == records
    assert records[-1].loss < 0.5 * records[0].loss
    assert records[-1].train_acc >= 0.8 and records[-1].test_acc >= 0.8
    assert all(r.num_examples == 48 and r.examples_per_sec > 0 for r in records)
    out = capsys.readouterr().out
    assert re.fullmatch(r"loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}\n"
                        r"\d+\.\d examples/sec on \[CpuDevice\(id=0\)\]\n", out), out
    with pytest.raises(ValueError, match="no batches"):
        train_ch13(net, [], test, make_loss(), make_trainer(net, 1e-2), 1, parse_devices("cpu"))


def test_predict_proba_batches_and_single_examples():
    net = _classifier()
    device = parse_devices("cpu")
    tokens, segments, valid_lens, _ = _task(5, seed=7)
    probs = predict_proba(net, tokens, segments, valid_lens, device)
    assert probs.shape == (5, 3) and isinstance(probs, np.ndarray)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    logits = np.asarray(net((tokens, segments, valid_lens.astype(np.float32))))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(predict_proba(net, tokens, segments, valid_lens, device, batch_size=2), probs,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(predict_proba(net, tokens[3], segments[3], valid_lens[3], device), probs[3:4],
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="row counts differ"):
        predict_proba(net, tokens, segments[:4], valid_lens, device)


def test_an_unsupported_precision_is_refused():
    net = _classifier()
    with pytest.raises(ValueError, match="bfloat16.*float32"):
        FinetuneStep(net, make_loss(), make_trainer(net, 1e-3), parse_devices("cpu"), precision="bfloat16")
