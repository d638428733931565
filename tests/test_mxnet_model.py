"""The MXNet model: masking, head layout, parameter names and counts (the book's
`save_parameters` names; bert.small has 13 + 16 per layer tensors), padding invariance,
gradients reaching the positional embedding, and the MLM gather."""
import numpy as onp
import pytest

from needs import require_backend

require_backend("mxnet")
import mxnet as mx  # noqa: E402
from mxnet import autograd, init, np, npx  # noqa: E402

from nlibert.backends.mxnet.model import (BERTClassifier, BERTModel, MultiHeadAttention,  # noqa: E402
                                          masked_softmax)
from nlibert.core.config import BERTConfig  # noqa: E402

npx.set_np()


def _softmax(x):
    e = onp.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _tiny(vocab_size=20, dropout=0.0, seed=0, **sizes):
    cfg = dict(num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=2, dropout=dropout, max_len=24)
    cfg.update(sizes)
    mx.random.seed(seed)
    bert = BERTModel(vocab_size, **cfg)
    bert.initialize(init.Xavier())
    return bert


def test_masked_softmax_1d_2d_and_none(rng):
    X = rng.normal(size=(2, 3, 5)).astype("float32")
    out = masked_softmax(np.array(X), np.array([2, 4], dtype="float32")).asnumpy()
    for b, n in enumerate([2, 4]):
        onp.testing.assert_allclose(out[b, :, :n], _softmax(X[b, :, :n]), rtol=1e-5, atol=1e-6)
        assert onp.all(out[b, :, n:] == 0)
    lens2d = onp.array([[1, 2, 3], [5, 4, 0]], dtype="int32")
    out2 = masked_softmax(np.array(X), np.array(lens2d)).asnumpy()
    for b in range(2):
        for q in range(3):
            n = lens2d[b, q]
            if n == 0:  # every score replaced by -1e6: uniform, not NaN, as the book
                onp.testing.assert_allclose(out2[b, q], onp.full(5, 0.2), rtol=1e-6)
            else:
                onp.testing.assert_allclose(out2[b, q, :n], _softmax(X[b, q, :n]), rtol=1e-5, atol=1e-6)
                assert onp.all(out2[b, q, n:] == 0)
    onp.testing.assert_allclose(masked_softmax(np.array(X), None).asnumpy(), _softmax(X), rtol=1e-5, atol=1e-6)


def test_split_heads_is_batch_major_and_merge_inverts_it(rng):
    attn = MultiHeadAttention(num_hiddens=8, num_heads=2, dropout=0.0)
    X = rng.normal(size=(3, 5, 8)).astype("float32")
    split = attn.split_heads(np.array(X)).asnumpy()
    assert split.shape == (6, 5, 4)
    for b in range(3):
        for h in range(2):
            onp.testing.assert_array_equal(split[b * 2 + h], X[b, :, h * 4:(h + 1) * 4])
    onp.testing.assert_array_equal(attn.merge_heads(np.array(split)).asnumpy(), X)


def _expected_bert_small_keys(V):
    """The book's MXNet `save_parameters` names, in its order, for bert.small (H=256, F=512, L=2, max_len=512)."""
    keys = [("encoder.pos_embedding", (1, 512, 256)),
            ("encoder.token_embedding.weight", (V, 256)),
            ("encoder.segment_embedding.weight", (2, 256))]
    for i in (0, 1):
        b = f"encoder.blks.{i}."
        for w in ("W_q", "W_k", "W_v", "W_o"):
            keys += [(b + f"attention.{w}.weight", (256, 256)), (b + f"attention.{w}.bias", (256,))]
        keys += [(b + "addnorm1.ln.gamma", (256,)), (b + "addnorm1.ln.beta", (256,)),
                 (b + "ffn.dense1.weight", (512, 256)), (b + "ffn.dense1.bias", (512,)),
                 (b + "ffn.dense2.weight", (256, 512)), (b + "ffn.dense2.bias", (256,)),
                 (b + "addnorm2.ln.gamma", (256,)), (b + "addnorm2.ln.beta", (256,))]
    keys += [("hidden.weight", (256, 256)), ("hidden.bias", (256,)),
             ("mlm.mlp.0.weight", (256, 256)), ("mlm.mlp.0.bias", (256,)),
             ("mlm.mlp.1.gamma", (256,)), ("mlm.mlp.1.beta", (256,)),
             ("mlm.mlp.2.weight", (V, 256)), ("mlm.mlp.2.bias", (V,)),
             ("nsp.output.weight", (2, 256)), ("nsp.output.bias", (2,))]
    return keys


def test_bert_small_save_parameters_names_shapes_and_count():
    V = 1000
    bert = BERTModel.from_config(BERTConfig(vocab_size=V))  # bert.small sizes are the defaults
    found = [(k, tuple(p.shape)) for k, p in bert._collect_params_with_prefix().items()]
    assert found == _expected_bert_small_keys(V)
    assert len(found) == 45
    assert sum(int(onp.prod(s)) for _, s in found) == 1_318_402 + 513 * V
    assert bert.config == BERTConfig(vocab_size=V)


def test_classifier_has_39_keys_and_no_pretraining_heads():
    V = 1000
    net = BERTClassifier(BERTModel.from_config(BERTConfig(vocab_size=V)))
    params = net._collect_params_with_prefix()
    expected = [kv for kv in _expected_bert_small_keys(V) if not kv[0].startswith(("mlm.", "nsp."))]
    expected += [("output.weight", (3, 256)), ("output.bias", (3,))]
    assert [(k, tuple(p.shape)) for k, p in params.items()] == expected
    assert len(params) == 39
    assert sum(int(onp.prod(p.shape)) for p in params.values()) == 1_252_355 + 256 * V
    # The trainer is built from collect_params(): the MLM/NSP heads must not be in it.
    assert len(list(net.collect_params().values())) == 39


def test_mlm_head_reads_the_requested_positions():
    bert = _tiny()
    tokens = np.array([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 10, 3]], dtype="int32")
    segments = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype="int32")
    positions = onp.array([[1, 4], [5, 2]])
    encoded, mlm, _ = bert(tokens, segments, np.array([5, 6]), np.array(positions))
    gathered = onp.stack([encoded.asnumpy()[b, positions[b]] for b in range(2)])  # (B, P, H)
    onp.testing.assert_allclose(mlm.asnumpy(), bert.mlm.mlp(np.array(gathered)).asnumpy(), rtol=1e-5, atol=1e-6)


def test_classifier_accepts_a_tuple_or_three_arguments():
    bert = _tiny()
    net = BERTClassifier(bert)
    net.output.initialize()
    tokens = np.array([[2, 5, 6, 3, 7, 8, 3], [2, 9, 3, 4, 3, 0, 0]], dtype="int32")
    segments = np.array([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]], dtype="int32")
    lens = np.array([7, 5], dtype="float32")
    onp.testing.assert_array_equal(net(tokens, segments, lens).asnumpy(), net((tokens, segments, lens)).asnumpy())


def test_pos_embedding_is_trained():
    bert = _tiny(dropout=0.1)
    net = BERTClassifier(bert)
    net.output.initialize()
    tokens = np.array([[2, 5, 6, 3, 0], [2, 7, 3, 8, 3]], dtype="int32")
    segments = np.array([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]], dtype="int32")
    with autograd.record():
        loss = net((tokens, segments, np.array([4.0, 5.0]))).sum()
    loss.backward()
    grad = bert.encoder.pos_embedding.grad().asnumpy()
    assert onp.abs(grad[0, :5]).sum() > 0  # used positions get a gradient (r0.17 torch's did not)
    assert onp.all(grad[0, 5:] == 0)  # positions beyond T are not used


def test_attention_weights_are_kept_only_on_request():
    bert = _tiny()
    attention = bert.encoder.blks[0].attention.attention
    tokens, segments = np.array([[2, 5, 6, 3, 0]], dtype="int32"), np.zeros((1, 5), dtype="int32")
    bert(tokens, segments, np.array([4.0]))
    assert attention.attention_weights is None  # the default: nothing pinned between steps
    attention.keep_attention_weights = True
    bert(tokens, segments, np.array([4.0]))
    weights = attention.attention_weights.asnumpy()
    assert weights.shape == (2, 5, 5)  # (B*h, T_q, T_k)
    onp.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-6)
    assert onp.all(weights[:, :, 4] == 0)  # the pad key gets no weight
