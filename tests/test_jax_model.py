"""The JAX/Flax BERT: masking, head layout, parameter names and shapes (the canonical state_dict
names, core/names.py), forward shapes, invariances, the fast path, gradients and dropout.

Mirrors tests/test_torch_model.py and tests/test_mxnet_model.py. The model classes are linen
modules bound to their parameters: calling one is evaluation mode (dropout off); `apply(params,
..., training=True, rngs=...)` is the training pass, and gradients are `jax.grad` over `params`.
One tiny shape (V 50, H 16, F 32, 2 heads, 2 layers, max_len 24) is reused throughout, since
every new input shape is one more XLA compilation.
"""
from __future__ import annotations

import math

import numpy as onp
import pytest

from needs import require_backend

require_backend("jax")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import nlibert.backends.jax as jb  # noqa: E402
from nlibert.backends.jax.checkpoint import _flatten  # noqa: E402  (the parameter tree as canonical names)
from nlibert.backends.jax.model import MultiHeadAttention, masked_softmax  # noqa: E402
from nlibert.core.names import expected_shapes  # noqa: E402

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


def _softmax(x):
    e = onp.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- masked_softmax ---------------------------------------------------------------------------

# Softmax values are <= 1: rtol 1e-5 / atol 1e-6 against numpy's softmax of the kept keys;
# measured 3e-8 (1-D and 2-D lengths) and 6e-8 (no lengths).
def test_masked_softmax_1d_lens_zero_exactly_the_keys_past_each_length(rng):
    X = rng.normal(size=(2, 3, 5)).astype(onp.float32)
    out = onp.asarray(masked_softmax(jnp.asarray(X), jnp.asarray([2.0, 4.0])))
    for b, n in enumerate([2, 4]):
        assert onp.all(out[b, :, n:] == 0) and onp.all(out[b, :, :n] > 0)
        onp.testing.assert_allclose(out[b, :, :n], _softmax(X[b, :, :n]), rtol=1e-5, atol=1e-6)


def test_masked_softmax_2d_lens_are_per_query(rng):
    X = rng.normal(size=(2, 3, 5)).astype(onp.float32)
    lens = onp.array([[1, 3, 5], [2, 2, 4]], onp.int32)
    out = onp.asarray(masked_softmax(jnp.asarray(X), jnp.asarray(lens)))
    for b in range(2):
        for q in range(3):
            n = lens[b, q]
            assert onp.all(out[b, q, n:] == 0)
            onp.testing.assert_allclose(out[b, q, :n], _softmax(X[b, q, :n]), rtol=1e-5, atol=1e-6)


def test_masked_softmax_none_is_plain_softmax_and_float_lens_equal_int_lens(rng):
    X = jnp.asarray(rng.normal(size=(2, 3, 5)).astype(onp.float32))
    onp.testing.assert_allclose(onp.asarray(masked_softmax(X, None)), _softmax(onp.asarray(X)), rtol=1e-5, atol=1e-6)
    onp.testing.assert_array_equal(onp.asarray(masked_softmax(X, jnp.asarray([2.0, 4.0]))),
                                   onp.asarray(masked_softmax(X, jnp.asarray([2, 4], jnp.int32))))


def test_masked_softmax_sets_rather_than_adds_so_length_zero_is_uniform(rng):
    # The book replaces masked scores with -1e6: a fully masked row is uniform, never NaN, even for
    # scores far from 0 (an additive mask would keep their differences).
    X = jnp.asarray(rng.normal(size=(2, 2, 4)).astype(onp.float32) * 100)
    out = onp.asarray(masked_softmax(X, jnp.asarray([0, 4])))
    onp.testing.assert_array_equal(out[0], onp.full((2, 4), 0.25, onp.float32))
    out2 = onp.asarray(masked_softmax(X, jnp.asarray([[0, 2], [4, 0]])))
    onp.testing.assert_array_equal(out2[0, 0], onp.full(4, 0.25, onp.float32))
    onp.testing.assert_array_equal(out2[1, 1], onp.full(4, 0.25, onp.float32))
    assert onp.all(out2[0, 1, 2:] == 0)


# --- attention ---------------------------------------------------------------------------------

def test_split_heads_is_batch_major_and_merge_inverts_it(rng):
    attn = MultiHeadAttention(num_hiddens=8, num_heads=2, dropout=0.0)
    X = rng.normal(size=(3, 5, 8)).astype(onp.float32)
    split = onp.asarray(attn.split_heads(jnp.asarray(X)))
    assert split.shape == (6, 5, 4)
    for b in range(3):
        for h in range(2):
            onp.testing.assert_array_equal(split[b * 2 + h], X[b, :, h * 4:(h + 1) * 4])
    onp.testing.assert_array_equal(onp.asarray(attn.merge_heads(jnp.asarray(split))), X)


def test_multihead_attention_matches_an_independent_numpy_reference(rng):
    mha = MultiHeadAttention(H, HEADS, dropout=0.0)
    X = rng.normal(size=(3, 7, H)).astype(onp.float32)
    lens = onp.array([7, 4, 1], onp.float32)
    params = mha.init(jax.random.PRNGKey(0), X, X, X, lens)["params"]
    got = onp.asarray(mha.apply({"params": params}, X, X, X, lens))

    def linear(name, x):  # torch's layout: x @ weight.T + bias
        return x @ onp.asarray(params[name]["weight"]).T + onp.asarray(params[name]["bias"])

    def heads(t):  # (B, T, H) -> (B, h, T, d)
        return t.reshape(3, 7, HEADS, H // HEADS).transpose(0, 2, 1, 3)
    q, k, v = heads(linear("W_q", X)), heads(linear("W_k", X)), heads(linear("W_v", X))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(H // HEADS)
    scores = onp.where(onp.arange(7)[None, None, None, :] < lens[:, None, None, None], scores, -onp.inf)
    ref = linear("W_o", (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(3, 7, H))
    onp.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)  # measured 8.9e-8 on |out| <= 1.3


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

def test_classifier_has_39_keys_no_pretraining_heads_and_shares_bert_arrays():
    bert = tiny_bert()
    net = jb.BERTClassifier(bert)
    found = {k: tuple(v.shape) for k, v in _flatten(net.params).items()}
    assert found == expected_shapes(bert.config, "classifier") and len(found) == 39
    assert not any(k.startswith(("mlm.", "nsp.")) for k in found)
    assert found["output.weight"] == (3, H) and found["output.bias"] == (3,)
    assert net.params["encoder"] is bert.params["encoder"] and net.params["hidden"] is bert.params["hidden"]
    assert net.config == bert.config


def test_parameters_are_seeded():
    # set_seed resets the generator parameters are drawn from: the same seed, the same arrays.
    a, b, c = tiny_bert(seed=4), tiny_bert(seed=4), tiny_bert(seed=5)
    leaves = [jax.tree_util.tree_leaves(m.params) for m in (a, b, c)]
    assert all(onp.array_equal(x, y) for x, y in zip(leaves[0], leaves[1]))
    assert not onp.array_equal(leaves[0][-1], leaves[2][-1])


# --- forward -----------------------------------------------------------------------------------

def test_mlm_head_reads_the_requested_positions():
    """mlm_Y_hat[b, p] is the MLM MLP (Linear, ReLU, LayerNorm, Linear) of encoded_X[b, positions[b, p]],
    checked against a numpy reference of that MLP on the gathered rows."""
    bert = tiny_bert()
    tokens, segments, lens = batch(B=2, T=8, valid_lens=(8, 5))
    positions = onp.array([[1, 5, 2], [6, 1, 5]], onp.int32)
    encoded, mlm, _ = (onp.asarray(o) for o in bert(tokens, segments, lens, positions))
    p = jax.tree_util.tree_map(onp.asarray, bert.params["mlm"]["mlp"])
    x = onp.stack([encoded[b, positions[b]] for b in range(2)])  # (B, P, H)
    x = onp.maximum(x @ p["0"]["weight"].T + p["0"]["bias"], 0)
    x = (x - x.mean(-1, keepdims=True)) / onp.sqrt(x.var(-1, keepdims=True) + 1e-5) * p["2"]["weight"] + p["2"]["bias"]
    # measured 2.4e-7 on |logits| <= 1.7 (float32 vs float64 LayerNorm and matmuls)
    onp.testing.assert_allclose(mlm, x @ p["3"]["weight"].T + p["3"]["bias"], rtol=1e-5, atol=1e-5)


def test_classifier_accepts_a_tuple_or_three_arguments():
    net = jb.BERTClassifier(tiny_bert())
    tokens, segments, lens = batch()
    out = onp.asarray(net((tokens, segments, lens)))
    assert out.shape == (3, 3)
    onp.testing.assert_array_equal(onp.asarray(net(tokens, segments, lens)), out)


# --- the fast path: fused attention, cls_only --------------------------------------------------

def test_fused_attention_gives_the_book_paths_outputs():
    """set_fused_attention switches the (B, T, h, H/h) einsum layout on: the same scores, -1e6 fill
    and softmax, so every output equals the book path's within atol 1e-6 (measured, worst of two
    init draws: 4.8e-7 on encoded_X, 3.6e-7 on mlm_Y_hat, 6e-8 on nsp_Y_hat, 7.5e-8 on the classifier
    logits, 3.6e-7 on encoded_X with 2-D (per-query) valid lengths), so 2x margin on O(1) outputs."""
    bert = tiny_bert(dropout=0.1)
    net = jb.BERTClassifier(bert)
    tokens, segments, lens = batch(B=3, T=10, valid_lens=(10, 1, 3))
    positions = onp.array([[0, 9], [0, 4], [2, 1]], onp.int32)
    lens2d = onp.array([[10] * 10, [1] * 10, [3, 3, 2, 2, 1, 1, 1, 1, 1, 1]], onp.float32)

    def outputs():  # encoded_X, mlm_Y_hat, nsp_Y_hat, logits, encoded_X with 2-D lengths
        encoded_2d = jax.jit(lambda p, *X: bert.apply(p, *X)[0])(bert.params, tokens, segments, lens2d)
        return [onp.asarray(o) for o in (*bert(tokens, segments, lens, positions), net((tokens, segments, lens)),
                                         encoded_2d)]
    book = outputs()
    assert jb.set_fused_attention(bert, True) is bert and jb.set_fused_attention(net, True) is net
    assert bert.module.fused_attention and net.module.fused_attention
    fused = outputs()
    for name, a, b in zip(("encoded_X", "mlm_Y_hat", "nsp_Y_hat", "logits", "encoded_X 2-D lens"), book, fused):
        onp.testing.assert_allclose(b, a, rtol=0, atol=1e-6, err_msg=name)
    jb.set_fused_attention(bert, False)
    assert not bert.module.fused_attention
    onp.testing.assert_array_equal(onp.asarray(bert(tokens, segments, lens, positions)[0]), book[0])


@pytest.mark.parametrize("fused", [False, True])
def test_cls_only_gives_the_full_classifiers_logits(fused):
    """The last block computing <cls> only changes nothing the classifier reads: the same logits within
    atol 1e-6 (measured: 8.9e-8 book path, 7.5e-8 fused; the encoder's <cls> row <= 2.4e-7)."""
    bert = tiny_bert(fused_attention=fused)
    full, fast = jb.BERTClassifier(bert), jb.BERTClassifier(bert, cls_only=True)
    fast.params = full.params  # the output layer is drawn per classifier: give both the same one
    tokens, segments, lens = batch(B=3, T=10, valid_lens=(10, 1, 3))
    onp.testing.assert_allclose(onp.asarray(fast((tokens, segments, lens))),
                                onp.asarray(full((tokens, segments, lens))), rtol=0, atol=1e-6)
    # And the encoder's cls_only output is the <cls> row of the full output.
    enc = jb.BERTEncoder(V, H, FFN, HEADS, LAYERS, 0.0, MAX_LEN, fused_attention=fused)
    enc.params = bert.params["encoder"]
    cls = onp.asarray(enc(tokens, segments, lens, cls_only=True))
    assert cls.shape == (3, 1, H)
    onp.testing.assert_allclose(cls, onp.asarray(enc(tokens, segments, lens))[:, :1], rtol=0, atol=1e-6)


# --- gradients and dropout ---------------------------------------------------------------------

def _pos_grad(**kwargs):
    bert = tiny_bert(**kwargs)
    tokens, segments, lens = batch()

    def objective(params):
        encoded_X, _, nsp = bert.apply(params, tokens, segments, lens)
        return encoded_X.sum() + nsp.sum()
    return onp.asarray(jax.jit(jax.grad(objective))(bert.params)["encoder"]["pos_embedding"])


def test_pos_embedding_is_trained():
    grad = _pos_grad()
    assert grad.shape == (1, MAX_LEN, H)
    assert onp.abs(grad[:, :10]).sum() > 0 and onp.all(onp.abs(grad[:, :10]).sum(-1) > 0)
    assert onp.all(grad[:, 10:] == 0)  # positions past the sequence length are unused


def test_detach_flag_reproduces_the_r017_bug():
    assert not _pos_grad(detach_pos_embedding=True).any()  # stop_gradient: exactly zero
    # The parameter stays in the tree either way, so r0.17 files load into both.
    assert "pos_embedding" in tiny_bert(detach_pos_embedding=True).params["encoder"]


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


@pytest.fixture(scope="module")
def dropout_net_and_trainer():
    """A one-layer classifier at dropout 0.5 and an Adam at lr 0 (the parameters never move, so only
    dropout masks change a step's loss). Shared, so both tests below run one compiled step (the jitted
    step is cached per module, loss and optimizer; one layer halves its compile time)."""
    jb.set_seed(0)
    net = jb.BERTClassifier(jb.BERTModel(V, H, FFN, HEADS, 1, 0.5, MAX_LEN))
    return net, jb.make_trainer(net, 0.0)


def _lr0_losses(step, calls=3):
    X, y = batch(), onp.array([0, 1, 2])
    return [step(X, y) for _ in range(calls)]


def test_finetune_step_draws_new_dropout_masks_per_call_and_reseed_repeats_them(dropout_net_and_trainer):
    net, trainer = dropout_net_and_trainer
    before = jax.tree_util.tree_leaves(net.params)
    step = jb.FinetuneStep(net, jb.make_loss(), trainer, jb.parse_devices("cpu"))
    first = _lr0_losses(lambda *b: step.read(step(*b))[0])
    assert all(onp.array_equal(a, b) for a, b in zip(before, jax.tree_util.tree_leaves(net.params)))  # lr 0
    assert len(set(first)) == 3, first  # a new key per step
    step.reseed(5)
    seeded = _lr0_losses(lambda *b: step.read(step(*b))[0])
    step.reseed(5)
    assert _lr0_losses(lambda *b: step.read(step(*b))[0]) == seeded != first  # the masks are the seed's


def test_train_batch_ch13_draws_new_dropout_masks_on_every_call(dropout_net_and_trainer):
    net, trainer = dropout_net_and_trainer
    loss, devices = jb.make_loss(), jb.parse_devices("cpu")
    losses = _lr0_losses(lambda *b: jb.train_batch_ch13(net, *b, loss, trainer, devices)[0])
    assert len(set(losses)) == 3, f"the same loss sum on every call at lr 0 (same masks): {losses}"
