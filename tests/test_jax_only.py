"""What the JAX backend alone has: linen modules bound to their parameters (a classifier sharing
its BERT's arrays, the bound call as evaluation and `apply(..., training=True)` with a dropout key),
its head layout and attention weights sown as intermediates, jax.grad's exact zero for r0.17's
detached embedding, the fused layout with per-query lengths, the padding ladder of compiled shapes
and the compiles counted, shards and parameters placed by `jax.sharding`, the JAX book's mean
gradient, device-side sums. Everything every backend has is in the shared suite
(tests/test_backend_*.py).

One tiny shape (V 50, H 16, F 32, 2 heads, 2 layers, max_len 24) is reused throughout, since every
new input shape is one more XLA compilation. tests/conftest.py asks XLA for two host devices
(`--xla_force_host_platform_device_count=2`), so `cpu:0,cpu:1` is the code path `--device
cuda:0,cuda:1` takes with GPUs.
"""
from __future__ import annotations

import functools
import types

import numpy as onp
import pytest

from needs import require_backend

require_backend("jax")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import nlibert.backends.jax as jb  # noqa: E402
from nlibert.backends.jax.checkpoint import _flatten  # noqa: E402  (the parameter tree as canonical names)
from nlibert.backends.jax import (BERTClassifier, BERTModel, FinetuneStep, make_loss, parse_devices,  # noqa: E402
                                  set_seed, split_batch_multi_inputs, train_batch_ch13, try_all_gpus)
from nlibert.backends.jax.model import MultiHeadAttention  # noqa: E402
from nlibert.backends.jax.train import _padded_size, _Sums  # noqa: E402

from test_backend_train import T, batches, task  # noqa: E402  the toy task every backend learns

V, H, FFN, HEADS, LAYERS, MAX_LEN = 50, 16, 32, 2, 2, 24


def tiny_bert(dropout: float = 0.0, seed: int = 0, **kwargs) -> jb.BERTModel:
    jb.set_seed(seed)
    return jb.BERTModel(V, H, FFN, HEADS, LAYERS, dropout, MAX_LEN, **kwargs)


def batch(B=3, T=10, valid_lens=(10, 6, 3), seed=0):
    """(tokens, segments, valid_lens) as numpy: int32 ids, segment 1 in the second half, float32 lengths."""
    rng = onp.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(B, T)).astype(onp.int32)
    segments = onp.zeros((B, T), onp.int32)
    segments[:, T // 2:] = 1
    return tokens, segments, onp.asarray(valid_lens, onp.float32)


# --- the model -----------------------------------------------------------------------------------

def test_a_new_model_is_drawn_on_the_host_without_compiling():
    """A model is built from `jax.eval_shape`'s tree and numpy draws (`_layers._draw_params`): XLA
    compiles nothing, each parameter has a generator of its own (two blocks' alike layers differ),
    the seed decides the values, and each kind of layer gets torch's initial distribution."""
    first, compiles = _flatten(tiny_bert(seed=3).params), []  # (the seed's key functions compile once)
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None)
    net = BERTClassifier(jb.BERTModel(V + 1, H + 8, FFN + 8, HEADS, LAYERS + 1, 0.1, MAX_LEN + 1), num_classes=4)
    assert compiles == []  # a model of new shapes: flax's lazy_init compiled dozens of programs
    again, other = _flatten(tiny_bert(seed=3).params), _flatten(tiny_bert(seed=4).params)
    layer_norms = [k for k in first if ".ln." in k or k.startswith("mlm.mlp.2.")]
    assert all(onp.array_equal(first[k], again[k]) for k in first)
    assert not any(onp.array_equal(first[k], other[k]) for k in first if k not in layer_norms)
    w0, w1 = (first[f"encoder.blks.{i}.attention.W_q.weight"] for i in (0, 1))
    assert not onp.array_equal(w0, w1) and onp.abs(w0).max() <= 1 / onp.sqrt(H)  # torch's Linear: U(±1/sqrt(fan_in))
    assert abs(first["encoder.token_embedding.weight"].std() - 1) < 0.1  # torch's Embedding: N(0, 1)
    assert len(layer_norms) == 2 * 2 * LAYERS + 2 and all((first[k] == (1 if k.endswith("weight") else 0)).all() for k in layer_norms)
    output = onp.asarray(net.params["output"]["weight"])
    assert output.shape == (4, H + 8) and onp.abs(output).max() <= 1 / onp.sqrt(H + 8)

def test_split_heads_is_batch_major_and_merge_inverts_it(rng):
    attn = MultiHeadAttention(num_hiddens=8, num_heads=2, dropout=0.0)
    X = rng.normal(size=(3, 5, 8)).astype(onp.float32)
    split = onp.asarray(attn.split_heads(jnp.asarray(X)))
    assert split.shape == (6, 5, 4)
    for b in range(3):
        for h in range(2):
            onp.testing.assert_array_equal(split[b * 2 + h], X[b, :, h * 4:(h + 1) * 4])
    onp.testing.assert_array_equal(onp.asarray(attn.merge_heads(jnp.asarray(split))), X)


def test_attention_weights_are_kept_only_on_request():
    bert = tiny_bert()
    tokens, segments, lens = batch(B=3, T=7, valid_lens=(7, 4, 1))
    plain = jax.jit(lambda p, *X: bert.apply(p, *X))(bert.params, tokens, segments, lens)
    assert len(plain) == 3 and plain[1] is None  # the outputs alone: no intermediates by default
    sown = jax.jit(lambda p, *X: bert.apply(p, *X, mutable=["intermediates"]))
    _, state = sown(bert.params, tokens, segments, lens)
    (weights,) = state["intermediates"]["encoder"]["blks"]["0"]["attention"]["attention"]["attention_weights"]
    weights = onp.asarray(weights)
    assert weights.shape == (3 * HEADS, 7, 7)  # (B*h, T_q, T_k)
    onp.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-6)
    # Rows are batch-major: example b's heads are rows b*h .. b*h+h-1.
    assert onp.all(weights[HEADS:2 * HEADS, :, 4:] == 0) and onp.all(weights[HEADS:2 * HEADS, :, :4] > 0)
    assert onp.all(weights[2 * HEADS:, :, 1:] == 0) and onp.all(weights[2 * HEADS:, :, 0] == 1)


# --- names, shapes and counts (the canonical state_dict) ---------------------------------------


def test_a_classifier_shares_its_berts_arrays():
    bert = tiny_bert()
    net = jb.BERTClassifier(bert)
    assert net.params["encoder"] is bert.params["encoder"] and net.params["hidden"] is bert.params["hidden"]
    assert net.config == bert.config


def test_the_fused_layout_takes_per_query_lengths_and_cls_only_is_the_cls_row():
    """Fused attention with 2-D (per-query) valid lengths gives the book path's encoded_X (atol 1e-6;
    measured 3.6e-7); `set_fused_attention` flips the module's field both ways; the encoder's
    cls_only output is the <cls> row of its full output."""
    bert = tiny_bert(dropout=0.1)
    tokens, segments, _ = batch(B=3, T=10, valid_lens=(10, 1, 3))
    lens2d = onp.array([[10] * 10, [1] * 10, [3, 3, 2, 2, 1, 1, 1, 1, 1, 1]], onp.float32)

    def encoded_2d():
        return onp.asarray(jax.jit(lambda p, *X: bert.apply(p, *X)[0])(bert.params, tokens, segments, lens2d))
    book = encoded_2d()
    jb.set_fused_attention(bert, True)
    assert bert.module.fused_attention
    onp.testing.assert_allclose(encoded_2d(), book, rtol=0, atol=1e-6)
    jb.set_fused_attention(bert, False)
    assert not bert.module.fused_attention
    for fused in (False, True):
        enc = jb.BERTEncoder(V, H, FFN, HEADS, LAYERS, 0.0, MAX_LEN, fused_attention=fused)
        enc.params = bert.params["encoder"]
        lens = onp.array([10, 1, 3], onp.float32)
        cls = onp.asarray(enc(tokens, segments, lens, cls_only=True))
        assert cls.shape == (3, 1, H)
        onp.testing.assert_allclose(cls, onp.asarray(enc(tokens, segments, lens))[:, :1], rtol=0, atol=1e-6)


def test_the_detached_embedding_gets_exactly_zero_and_stays_in_the_tree():
    bert = tiny_bert(detach_pos_embedding=True)
    tokens, segments, lens = batch()

    def objective(params):
        encoded_X, _, nsp = bert.apply(params, tokens, segments, lens)
        return encoded_X.sum() + nsp.sum()
    grad = onp.asarray(jax.jit(jax.grad(objective))(bert.params)["encoder"]["pos_embedding"])
    assert grad.shape == (1, MAX_LEN, H) and not grad.any()  # stop_gradient: exactly zero
    # The parameter stays in the tree either way, so r0.17 files load into both.
    assert "pos_embedding" in bert.params["encoder"]


def test_dropout_is_off_when_calling_the_bound_model_and_on_with_training():
    net = jb.BERTClassifier(tiny_bert(dropout=0.5))
    X = batch()
    onp.testing.assert_array_equal(onp.asarray(net(X)), onp.asarray(net(X)))
    apply = jax.jit(lambda p, key, *X, training: net.apply(p, *X, training=training, rngs={"dropout": key}),
                    static_argnames="training")

    def run(seed, training=True):
        return onp.asarray(apply(net.params, jax.random.PRNGKey(seed), *X, training=training))
    # training=False is the bound call's function: a key changes nothing. Another compilation of it may
    # round differently (measured: 0 here; the uncompiled apply differed from the bound call by 7.5e-8).
    onp.testing.assert_array_equal(run(1, training=False), run(2, training=False))
    onp.testing.assert_allclose(run(1, training=False), onp.asarray(net(X)), rtol=0, atol=1e-6)
    assert not onp.allclose(run(1), run(2), atol=1e-3)  # two keys, two dropout masks
    onp.testing.assert_array_equal(run(1), run(1))  # the mask is the key's, nothing else
    assert not onp.allclose(run(1), onp.asarray(net(X)), atol=1e-3)


# --- training ------------------------------------------------------------------------------------

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
    return {k: onp.asarray(v) for k, v in _flatten(net.params).items()}


def test_devices_are_xlas_and_bad_specs_are_named():
    assert try_all_gpus() == [jax.devices("cpu")[0]]  # no GPU on this machine
    assert parse_devices("cpu:0,cpu:1") == jax.devices("cpu")[:2]
    for spec, message in (("cpu:7", "is not available"), ("tpu", "is not a device")):
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


def test_split_batch_multi_inputs_places_each_shard_on_its_device():
    devices = parse_devices("cpu:0,cpu:1")
    tokens, segments, valid_lens, labels = task(5, seed=1)
    X_shards, y_shards = split_batch_multi_inputs((tokens, segments, valid_lens), labels, devices)
    for shard, y, device in zip(X_shards, y_shards, devices):
        assert len(shard) == 3 and all(a.devices() == {device} for a in shard) and y.devices() == {device}


def test_a_step_follows_the_mean_gradient_of_the_batch():
    """The JAX book differentiates `softmax_cross_entropy_with_integer_labels(...).mean()`."""
    net, lr = _classifier(), 0.5
    (X, y), = batches(task(8, seed=8), 8)
    before = net.params

    def mean_loss(params):
        logits = net.apply(params, *(onp.asarray(a) for a in X[:2]), X[2].astype(onp.float32))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y.astype(onp.int32)).mean()

    grads = jax.grad(mean_loss)(before)
    expected = {k: onp.asarray(v) for k, v in _flatten(jax.tree_util.tree_map(lambda p, g: p - lr * g, before,
                                                                             grads)).items()}
    loss_sum, correct = train_batch_ch13(net, X, y, make_loss(), _sgd(net, lr), parse_devices("cpu"))
    assert loss_sum == pytest.approx(float(mean_loss(before)) * 8, rel=1e-5) and 0 <= correct <= 8
    for k, value in _params(net).items():
        onp.testing.assert_allclose(value, expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_padding_rows_and_columns_changes_neither_the_step_nor_the_sums():
    """A batch the caller padded to the full width, or one the step pads to its compiled shape
    (7 rows -> 8, width 6 -> 8), trains exactly like the tight batch would: padded columns are
    masked keys, padded rows have weight 0."""
    (X, y), = batches(task(7, seed=9), 7)
    wide = (onp.pad(X[0], ((0, 0), (0, 10)), constant_values=1), onp.pad(X[1], ((0, 0), (0, 10))), X[2])
    results = []
    for batch in (X, wide):
        net = _classifier()
        results.append((train_batch_ch13(net, batch, y, make_loss(), _sgd(net), parse_devices("cpu")), _params(net)))
    (sums_tight, tight), (sums_wide, padded) = results
    assert sums_tight[0] == pytest.approx(sums_wide[0], rel=1e-6) and sums_tight[1] == sums_wide[1]
    for k in tight:
        onp.testing.assert_allclose(padded[k], tight[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_on_two_devices_every_parameter_is_replicated():
    """Data parallel over `cpu:0,cpu:1`: parameters replicated, rows sharded (7 rows: padded to 8, 4
    per device), the gradient reduced by XLA (the shared suite checks that two devices train like one)."""
    net = _classifier()
    devices = parse_devices("cpu:0,cpu:1")
    step = FinetuneStep(net, make_loss(), _sgd(net), devices)
    for X, y in batches(task(21, seed=2), 7):
        step.read(step(X, y))
    assert all(len(leaf.devices()) == len(devices) for leaf in jax.tree_util.tree_leaves(net.params))


def test_step_sums_stay_on_the_device_until_read():
    sums = _Sums([jax.numpy.float32(1.5)]) + _Sums([jax.numpy.float32(2.25)])
    total = sum([sums, _Sums([jax.numpy.float32(0.25)])])  # sum() starts from 0
    assert len(total.parts) == 3 and total.total() == 4.0
