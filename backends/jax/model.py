"""The book's BERT in JAX/Flax: encoder, pretraining heads, and the NLI classifier.

In the order of the other backends' model.py. The layers are Flax `linen` modules; the five
classes the book's code calls are linen modules bound to their parameters, so that
`bert(tokens, segments, valid_lens, pred_positions)` works as in the other backends (evaluation
mode) while `.module` and `.params` stay open for training. The torch backend's math (post-LN
blocks, -1e6 *set* on masked scores, LayerNorm with the biased variance, ReLU or erf GELU) and
its parameter layout: every parameter is named and shaped as its canonical (`state_dict`) name
says, `weight` (out, in), so the JAX format needs no rename rules and no transposes.

Shapes: B batch, T sequence length, H num_hiddens, h num_heads, F ffn_num_hiddens, V vocab size,
P number of masked positions to predict.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nlibert.core.config import BERTConfig

from ._layers import _draw_params, _Embedding, _LayerNorm, _Linear, _normal, _param
from .runtime import _next_key

_Params = Any  # a nested dict of arrays, keyed by the canonical names split at their dots


def masked_softmax(X: jax.Array, valid_lens: jax.Array | None) -> jax.Array:
    """Softmax over the last axis of X (B', T_q, T_k) that ignores keys at index >= valid_len.

    `valid_lens` is None (plain softmax), 1-D (B',): one length per row, shared by every query, or
    2-D (B', T_q): one length per query. Masked scores are *set* to -1e6, exactly as the book, so a
    row with valid_len 0 comes out uniform rather than NaN.
    """
    if valid_lens is None:
        return jax.nn.softmax(X, axis=-1)
    valid_lens = jnp.asarray(valid_lens)
    if valid_lens.ndim == 1:
        lens = valid_lens[:, None, None]  # (B', 1, 1): same length for every query
    elif valid_lens.ndim == 2:
        lens = valid_lens[:, :, None]  # (B', T_q, 1)
    else:
        raise ValueError(f"valid_lens must be 1-D or 2-D, got shape {valid_lens.shape}")
    keep = jnp.arange(X.shape[-1]) < lens  # (B', T_q or 1, T_k)
    return jax.nn.softmax(jnp.where(keep, X, -1e6), axis=-1)


class DotProductAttention(nn.Module):
    """Scaled dot-product attention with dropout on the attention weights (heads folded into the
    batch axis). The weights are kept only on request, as Flax keeps intermediates: apply with
    `mutable=['intermediates']` and read `attention_weights`."""

    dropout: float

    @nn.compact
    def __call__(self, queries: jax.Array, keys: jax.Array, values: jax.Array, valid_lens: jax.Array | None = None,
                 training: bool = False) -> jax.Array:
        d = queries.shape[-1]
        scores = queries @ jnp.swapaxes(keys, 1, 2) / math.sqrt(d)  # (B', T_q, T_k)
        weights = masked_softmax(scores, valid_lens)
        self.sow("intermediates", "attention_weights", weights)
        return nn.Dropout(self.dropout)(weights, deterministic=not training) @ values  # (B', T_q, d_v)


class MultiHeadAttention(nn.Module):
    """h parallel heads of size H/h, folded into the batch axis (the book's layout).

    `fused_attention=True` (the fast path; the same switch as the other backends') computes the
    heads in the (B, T, h, H/h) layout with one einsum each way and a boolean key mask, without
    the head transposes' copies: the same scores, -1e6 fill and softmax, so the same result. The
    JAX pinned here (0.4.23) has no fused attention kernel (`jax.nn.dot_product_attention` came in
    0.4.31); XLA fuses the mask, softmax and dropout into the einsums' neighbours itself.
    """

    num_hiddens: int
    num_heads: int
    dropout: float
    bias: bool = True
    fused_attention: bool = False

    def split_heads(self, X: jax.Array) -> jax.Array:
        """(B, T, H) -> (B*h, T, H/h), batch-major: rows b*h .. b*h+h-1 are example b's heads."""
        B, T, _ = X.shape
        X = X.reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)  # (B, h, T, H/h)
        return X.reshape(B * self.num_heads, T, -1)

    def merge_heads(self, X: jax.Array) -> jax.Array:
        """(B*h, T, H/h) -> (B, T, H), the inverse of split_heads."""
        _, T, d = X.shape
        X = X.reshape(-1, self.num_heads, T, d).transpose(0, 2, 1, 3)  # (B, T, h, H/h)
        return X.reshape(X.shape[0], T, -1)

    @nn.compact
    def __call__(self, queries: jax.Array, keys: jax.Array, values: jax.Array, valid_lens: jax.Array | None = None,
                 training: bool = False) -> jax.Array:
        if self.num_hiddens % self.num_heads:
            raise ValueError(f"num_hiddens={self.num_hiddens} is not divisible by num_heads={self.num_heads}")
        W_q, W_k, W_v, W_o = (_Linear(self.num_hiddens, self.bias, name=n) for n in ("W_q", "W_k", "W_v", "W_o"))
        if self.fused_attention:
            return W_o(self._fused(W_q(queries), W_k(keys), W_v(values), valid_lens, training))
        q, k, v = self.split_heads(W_q(queries)), self.split_heads(W_k(keys)), self.split_heads(W_v(values))
        if valid_lens is not None:
            # Each example's lengths repeated once per head, matching split_heads' batch-major order.
            valid_lens = jnp.repeat(jnp.asarray(valid_lens), self.num_heads, axis=0)
        out = DotProductAttention(self.dropout, name="attention")(q, k, v, valid_lens, training)  # (B*h, T_q, H/h)
        return W_o(self.merge_heads(out))  # (B, T_q, H)

    def _fused(self, q: jax.Array, k: jax.Array, v: jax.Array, valid_lens: jax.Array | None,
               training: bool) -> jax.Array:
        B, T_q, H = q.shape
        T_k, h = k.shape[1], self.num_heads
        q, k, v = q.reshape(B, T_q, h, -1), k.reshape(B, T_k, h, -1), v.reshape(B, T_k, h, -1)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(H // h)  # (B, h, T_q, T_k)
        if valid_lens is not None:
            lens = jnp.asarray(valid_lens)
            if lens.ndim not in (1, 2):
                raise ValueError(f"valid_lens must be 1-D or 2-D, got shape {lens.shape}")
            lens = lens[:, None, None, None] if lens.ndim == 1 else lens[:, None, :, None]
            scores = jnp.where(jnp.arange(T_k) < lens, scores, -1e6)
        weights = nn.Dropout(self.dropout)(jax.nn.softmax(scores, axis=-1), deterministic=not training)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, T_q, H)  # (B, T_q, H)


def _activation(name: str):
    """'relu' (the book's) or 'gelu' (BERT's exact erf form, not the tanh approximation)."""
    if name == "relu":
        return jax.nn.relu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {name!r}: use 'relu' or 'gelu'")


class PositionWiseFFN(nn.Module):
    """The same two-layer MLP at every position: H -> F -> H, ReLU (the book's) or GELU (BERT's)."""

    num_hiddens: int
    ffn_num_hiddens: int
    hidden_act: str = "relu"

    @nn.compact
    def __call__(self, X: jax.Array) -> jax.Array:
        hidden = _activation(self.hidden_act)(_Linear(self.ffn_num_hiddens, name="dense1")(X))
        return _Linear(self.num_hiddens, name="dense2")(hidden)  # (B, T, H)


class AddNorm(nn.Module):
    """Residual connection then LayerNorm (post-LN): ln(dropout(Y) + X)."""

    dropout: float
    layer_norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, X: jax.Array, Y: jax.Array, training: bool = False) -> jax.Array:
        return _LayerNorm(self.layer_norm_eps, name="ln")(nn.Dropout(self.dropout)(Y, deterministic=not training) + X)


class EncoderBlock(nn.Module):
    """One Transformer encoder block: self-attention, add & norm, FFN, add & norm."""

    num_hiddens: int
    ffn_num_hiddens: int
    num_heads: int
    dropout: float
    fused_attention: bool = False
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float | None = None

    @nn.compact
    def __call__(self, X: jax.Array, valid_lens: jax.Array | None, queries: jax.Array | None = None,
                 training: bool = False) -> jax.Array:
        """`queries` (B, T_q, H), when given, are the only positions computed (attending over all of
        X): the fast path passes X[:, :1] to the last block, whose <cls> output is all a classifier reads."""
        attention_dropout = self.dropout if self.attention_dropout is None else self.attention_dropout
        Q = X if queries is None else queries
        attended = MultiHeadAttention(self.num_hiddens, self.num_heads, attention_dropout, True,
                                      self.fused_attention, name="attention")(Q, X, X, valid_lens, training)
        Y = AddNorm(self.dropout, self.layer_norm_eps, name="addnorm1")(Q, attended, training)
        ffn = PositionWiseFFN(self.num_hiddens, self.ffn_num_hiddens, self.hidden_act, name="ffn")(Y)
        return AddNorm(self.dropout, self.layer_norm_eps, name="addnorm2")(Y, ffn, training)


class _Blocks(nn.Module):
    """The encoder's blocks, named 0, 1, ... (the canonical `encoder.blks.{i}.*`)."""

    config: tuple  # sorted (name, value) items of a BERTConfig (hashable, as linen fields are)
    fused_attention: bool = False

    @nn.compact
    def __call__(self, X: jax.Array, valid_lens: jax.Array | None, cls_only: bool = False,
                 training: bool = False) -> jax.Array:
        cfg = dict(self.config)
        for i in range(cfg["num_layers"]):
            block = EncoderBlock(cfg["num_hiddens"], cfg["ffn_num_hiddens"], cfg["num_heads"], cfg["dropout"],
                                 self.fused_attention, cfg["hidden_act"], cfg["layer_norm_eps"],
                                 cfg["attention_dropout"], name=str(i))
            last = i == cfg["num_layers"] - 1
            X = block(X, valid_lens, X[:, :1, :] if cls_only and last else None, training)
        return X


class _Encoder(nn.Module):
    """The linen module of `BERTEncoder`: token + segment + learned position embeddings, then the blocks.

    `pos_embedding` (1, max_len, H), N(0, 1) at first, is added *as the parameter*, so it is
    trained; `detach_pos_embedding=True` stops its gradient, as d2l r0.17's `.data` did (see the
    torch backend). `embedding_norm` (BERT's, off in the book) adds `embedding_ln` and dropout."""

    config: tuple
    detach_pos_embedding: bool = False
    fused_attention: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, segments: jax.Array, valid_lens: jax.Array | None, cls_only: bool = False,
                 training: bool = False) -> jax.Array:
        cfg = dict(self.config)
        H, max_len = cfg["num_hiddens"], cfg["max_len"]
        T = tokens.shape[1]
        if T > max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {max_len}")
        X = _Embedding(cfg["vocab_size"], H, name="token_embedding")(tokens) + \
            _Embedding(2, H, name="segment_embedding")(segments)  # (B, T, H)
        pos = _param(self, "pos_embedding", _normal, (1, max_len, H))
        X = X + (jax.lax.stop_gradient(pos) if self.detach_pos_embedding else pos)[:, :T, :]
        if cfg["embedding_norm"]:
            X = _LayerNorm(cfg["layer_norm_eps"], name="embedding_ln")(X)
            X = nn.Dropout(cfg["dropout"])(X, deterministic=not training)
        return _Blocks(self.config, self.fused_attention, name="blks")(X, valid_lens, cls_only, training)


class _Pooler(nn.Module):
    """`hidden`: Linear + Tanh on <cls> (the canonical `hidden.0.*`)."""

    num_hiddens: int

    @nn.compact
    def __call__(self, X: jax.Array) -> jax.Array:
        return jnp.tanh(_Linear(self.num_hiddens, name="0")(X))


class _MLMHead(nn.Module):
    """`mlm.mlp`: Linear, activation, LayerNorm, Linear to the vocabulary (indices 0, 2, 3 as the book's)."""

    vocab_size: int
    num_hiddens: int
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, X: jax.Array) -> jax.Array:
        X = _activation(self.hidden_act)(_Linear(self.num_hiddens, name="0")(X))
        return _Linear(self.vocab_size, name="3")(_LayerNorm(self.layer_norm_eps, name="2")(X))


class _MaskLM(nn.Module):
    vocab_size: int
    num_hiddens: int
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, X: jax.Array, pred_positions: jax.Array, training: bool = False) -> jax.Array:
        batch_idx = jnp.arange(X.shape[0])[:, None]  # (B, 1), broadcast against (B, P)
        masked_X = X[batch_idx, jnp.asarray(pred_positions).astype(jnp.int32)]  # (B, P, H)
        return _MLMHead(self.vocab_size, self.num_hiddens, self.hidden_act, self.layer_norm_eps,
                        name="mlp")(masked_X)  # (B, P, V)


class _NextSentencePred(nn.Module):
    @nn.compact
    def __call__(self, X: jax.Array, training: bool = False) -> jax.Array:
        return _Linear(2, name="output")(X)  # (B, 2)


class _BERT(nn.Module):
    config: tuple
    detach_pos_embedding: bool = False
    fused_attention: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, segments: jax.Array, valid_lens: jax.Array | None = None,
                 pred_positions: jax.Array | None = None, training: bool = False):
        cfg = dict(self.config)
        encoded_X = _Encoder(self.config, self.detach_pos_embedding, self.fused_attention, name="encoder")(
            tokens, segments, valid_lens, False, training)  # (B, T, H)
        mlm = _MaskLM(cfg["vocab_size"], cfg["num_hiddens"], cfg["hidden_act"], cfg["layer_norm_eps"], name="mlm")
        mlm_Y_hat = mlm(encoded_X, pred_positions) if pred_positions is not None else None
        pooled = _Pooler(cfg["num_hiddens"], name="hidden")(encoded_X[:, 0, :])
        return encoded_X, mlm_Y_hat, _NextSentencePred(name="nsp")(pooled)


class _Classifier(nn.Module):
    """`BERTClassifier`'s module: encoder, pooler and a new `num_classes`-way `output` layer."""

    config: tuple
    detach_pos_embedding: bool = False
    fused_attention: bool = False
    cls_only: bool = False
    num_classes: int = 3

    @nn.compact
    def __call__(self, tokens: jax.Array, segments: jax.Array, valid_lens: jax.Array | None,
                 training: bool = False) -> jax.Array:
        encoded_X = _Encoder(self.config, self.detach_pos_embedding, self.fused_attention, name="encoder")(
            tokens, segments, valid_lens, self.cls_only, training)  # (B, T, H) or (B, 1, H)
        pooled = _Pooler(dict(self.config)["num_hiddens"], name="hidden")(encoded_X[:, 0, :])
        return _Linear(self.num_classes, name="output")(pooled)  # (B, num_classes) logits


# --- the book's classes: linen modules bound to their parameters --------------------------------

def _config_items(cfg: BERTConfig) -> tuple:
    return tuple(sorted(cfg.to_dict().items()))


class _Bound:
    """A linen `module` with its `params`: calling it applies the module in evaluation mode
    (dropout off), compiled once per input shape. Training steps apply `module` themselves with
    `training=True` and put the new parameters back in `params`."""

    module: nn.Module
    params: _Params

    def _init(self, module: nn.Module, *example_inputs) -> None:
        self.module = module
        shapes = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in example_inputs]
        self.params = _draw_params(module, _next_key(), *shapes)  # (shapes alone inside `_shapes_only()`)
        self._compiled = None

    def _rebuild(self, **changes) -> None:
        """Swap the module for one with `changes` (same parameters); the compiled apply is dropped."""
        self.module = self.module.clone(**changes)
        self._compiled = None

    def apply(self, params: _Params, *args, training: bool = False, rngs: dict | None = None, **kwargs):
        return self.module.apply({"params": params}, *args, training=training, rngs=rngs, **kwargs)

    def _evaluate(self, *inputs):
        """The module on `inputs` with this object's parameters, dropout off, compiled."""
        if self._compiled is None:
            self._compiled = jax.jit(lambda params, *X: self.apply(params, *X))
        return self._compiled(self.params, *(None if a is None else jnp.asarray(a) for a in inputs))

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class _Sized(_Bound):
    """What `BERTEncoder` and `BERTModel` share: built from a `BERTConfig`'s sizes and options
    (`config`), parameters drawn at construction from the backend's generator (`runtime.set_seed`)
    with the torch backend's distributions."""

    _linen: type  # the linen module class
    _example_positions: bool  # whether creating every parameter takes MLM positions

    def __init__(self, vocab_size: int, num_hiddens: int, ffn_num_hiddens: int, num_heads: int,
                 num_layers: int, dropout: float, max_len: int = 1000, *,
                 detach_pos_embedding: bool = False, fused_attention: bool = False, hidden_act: str = "relu",
                 layer_norm_eps: float = 1e-5, embedding_norm: bool = False,
                 attention_dropout: float | None = None) -> None:
        self.config = BERTConfig(vocab_size=vocab_size, num_hiddens=num_hiddens, ffn_num_hiddens=ffn_num_hiddens,
                                 num_heads=num_heads, num_layers=num_layers, dropout=dropout, max_len=max_len,
                                 hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
                                 embedding_norm=embedding_norm, attention_dropout=attention_dropout)
        T = min(2, max_len)  # a batch of one short example creates every parameter
        example = [jnp.zeros((1, T), jnp.int32), jnp.zeros((1, T), jnp.int32), jnp.full((1,), T, jnp.float32)]
        self._init(self._linen(_config_items(self.config), detach_pos_embedding, fused_attention),
                   *example, *([jnp.zeros((1, 1), jnp.int32)] if self._example_positions else []))

    @classmethod
    def from_config(cls, cfg: BERTConfig, *, detach_pos_embedding: bool = False, fused_attention: bool = False):
        return cls(cfg.vocab_size, cfg.num_hiddens, cfg.ffn_num_hiddens, cfg.num_heads, cfg.num_layers,
                   cfg.dropout, cfg.max_len, detach_pos_embedding=detach_pos_embedding,
                   fused_attention=fused_attention, **cfg.architecture())


class BERTEncoder(_Sized):
    """Token + segment + learned position embeddings, summed (BERT's LayerNorm after them with
    `embedding_norm`), then `num_layers` post-LN Transformer blocks."""

    _linen, _example_positions = _Encoder, False

    def forward(self, tokens, segments, valid_lens, cls_only: bool = False) -> jax.Array:
        """(B, T, H) hidden states; (B, 1, H), the <cls> row, with `cls_only`."""
        return self.apply(self.params, jnp.asarray(tokens), jnp.asarray(segments),
                          None if valid_lens is None else jnp.asarray(valid_lens), cls_only)


class MaskLM(_Bound):
    """Masked-LM head: gather the hidden states at `pred_positions`, then an MLP to vocab logits."""

    def __init__(self, vocab_size: int, num_hiddens: int, hidden_act: str = "relu",
                 layer_norm_eps: float = 1e-5) -> None:
        self._init(_MaskLM(vocab_size, num_hiddens, hidden_act, layer_norm_eps),
                   jnp.zeros((1, 1, num_hiddens), jnp.float32), jnp.zeros((1, 1), jnp.int32))

    def forward(self, X, pred_positions) -> jax.Array:
        """(B, P, V) logits at the (B, P) positions."""
        return self._evaluate(X, pred_positions)


class NextSentencePred(_Bound):
    """Next-sentence head: a 2-way linear classifier on the pooled <cls> representation."""

    def __init__(self, num_hiddens: int) -> None:
        self._init(_NextSentencePred(), jnp.zeros((1, num_hiddens), jnp.float32))

    def forward(self, X) -> jax.Array:
        """(B, 2) logits of the pooled <cls> states."""
        return self._evaluate(X)


class BERTModel(_Sized):
    """BERT as pretrained in the book: encoder, pooler (`hidden`), masked-LM and NSP heads;
    `config` is its `BERTConfig`."""

    _linen, _example_positions = _BERT, True

    def forward(self, tokens, segments, valid_lens=None, pred_positions=None):
        """(encoded_X (B, T, H), mlm_Y_hat (B, P, V) or None without `pred_positions`, nsp_Y_hat (B, 2))."""
        return self._evaluate(tokens, segments, valid_lens, pred_positions)


class BERTClassifier(_Bound):
    """The chapter's NLI model: `bert`'s encoder and pooler plus a new `num_classes`-way `output`
    layer (the MLM and NSP heads are not kept; 3: SNLI's labels, as the chapter). `cls_only`: the
    last block computes <cls> only (same logits).

    The classifier starts from `bert`'s very arrays (as the torch classifier shares bert's modules):
    train the classifier, not `bert`, from then on."""

    def __init__(self, bert: BERTModel, cls_only: bool = False, num_classes: int = 3) -> None:
        self.config: BERTConfig | None = getattr(bert, "config", None)
        self.cls_only = cls_only
        self.module = _Classifier(_config_items(bert.config), bert.module.detach_pos_embedding,
                                  bert.module.fused_attention, cls_only, num_classes)
        H = bert.config.num_hiddens
        output = _draw_params(_Linear(num_classes), _next_key(), jax.ShapeDtypeStruct((1, H), jnp.float32))  # torch's init
        self.params = {"encoder": bert.params["encoder"], "hidden": bert.params["hidden"], "output": output}
        self._compiled = None

    @property
    def num_classes(self) -> int:
        return self.module.num_classes

    def forward(self, inputs, segments=None, valid_lens=None) -> jax.Array:
        """(B, num_classes) logits, of `net((tokens, segments, valid_lens))` as the book calls it or of
        `net(tokens, segments, valid_lens)`."""
        if segments is None:
            inputs, segments, valid_lens = inputs
        return self._evaluate(inputs, segments, valid_lens)


def set_fused_attention(net: _Bound, enabled: bool = True) -> _Bound:
    """Switch every attention layer of `net` (a BERTModel, BERTClassifier or BERTEncoder) to the
    fused layout or back to the book's; returns `net`. Compiled steps built before must be built again."""
    if hasattr(net.module, "fused_attention"):
        net._rebuild(fused_attention=enabled)
    return net

