"""The book's BERT in MXNet Gluon: encoder, pretraining heads, and the NLI classifier.

Read top to bottom it is the model: attention (masked softmax, dot product, multi-head), the two
sublayers of a post-LN Transformer block (position-wise FFN, add & norm), the block, the BERT
encoder (token + segment + learned position embeddings, then the blocks), the two pretraining
heads (masked LM, next-sentence prediction), BERT itself, and the fine-tuning classifier.

It computes what d2l's MXNet `BERTModel` computes (post-LN blocks, a learned
positional embedding, no embedding LayerNorm) and its `save_parameters` names are
the book's, so the book's `bert.small` / `bert.base` files load unchanged. By default
the differences from HF BERT are the book's, kept on purpose: ReLU not GELU, LayerNorm eps 1e-5, no
embedding LayerNorm or dropout. Hugging Face checkpoints switch on BERT's options
(`hidden_act='gelu'`, `layer_norm_eps`, `embedding_norm`, `attention_dropout`: see `BERTConfig`).
Either way valid-length masking *replaces* scores with -1e6, which gives the masked keys the same
zero weight as BERT's additive mask.

Two things differ from the book's text but not from what it computes:
- every layer is told its input size (`in_units`, `in_channels`), as torch's `nn.Linear(in, out)`
  is, so `initialize()` allocates real arrays at once instead of deferring to the first forward;
  the parameter names, shapes and initializers are unchanged.
- heads are split and merged with `npx.reshape` codes instead of reading `X.shape`, so those two
  steps would survive a later move to `HybridBlock`.

Parameters are not initialised by the constructors (Gluon's convention): call
`net.initialize(init.Xavier(), ctx=devices)` as the book's pretraining does, or load a checkpoint.

Shapes: B batch, T sequence length, H num_hiddens, h num_heads, F ffn_num_hiddens, V vocab size,
P number of masked positions to predict.
"""
from __future__ import annotations

import math
from typing import Sequence

import mxnet as mx
from mxnet import np, npx
from mxnet.gluon import nn

from nlibert.core.config import BERTConfig

from . import _kernels

npx.set_np()


def _namespace(x):
    """`mxnet.symbol` for a symbol (inside a hybridized block), else `mxnet.ndarray`: the `F` that a
    `hybrid_forward` receives, for helpers called with arrays only."""
    return mx.sym if isinstance(x, mx.sym.Symbol) else mx.nd


def _is_symbol(x) -> bool:
    return isinstance(x, mx.sym.Symbol)


def masked_softmax(X: np.ndarray, valid_lens: np.ndarray | None) -> np.ndarray:
    """Softmax over the last axis of X (B', T_q, T_k) that ignores keys at index >= valid_len.

    `valid_lens` is None (plain softmax), 1-D (B',): one length per batch row, shared by every
    query, or 2-D (B', T_q): one length per query. Masked scores are *set* to -1e6 (not -inf, not
    added), exactly as the book, so a row with valid_len 0 comes out uniform rather than NaN.
    Lengths may be integer or float (the book feeds float32). Inside a hybridized block (X a
    symbol, whose shape is unknown) `valid_lens` must be 1-D; the arithmetic is the same.
    """
    F = _namespace(X)
    if valid_lens is None:
        return F.npx.softmax(X, axis=-1)
    if _is_symbol(X):
        # One length per (row, query): the row's length broadcast along the query axis.
        lens = F.np.expand_dims(valid_lens, -1) + F.npx.arange_like(X, axis=1) * 0  # (B', T_q)
        X2 = F.npx.sequence_mask(F.npx.reshape(X, (-5, -2)), F.np.reshape(lens, -1),
                                 use_sequence_length=True, value=-1e6, axis=1)
        return F.npx.reshape_like(F.npx.softmax(X2, axis=-1), X)
    shape = X.shape
    if valid_lens.ndim == 1:
        lens = valid_lens.repeat(shape[1])  # (B'*T_q,): each row's length once per query
    elif valid_lens.ndim == 2:
        lens = valid_lens.reshape(-1)  # (B'*T_q,)
    else:
        raise ValueError(f"valid_lens must be 1-D or 2-D, got shape {valid_lens.shape}")
    # sequence_mask works on (rows, T_k) with the length axis 1: one length per row.
    X = npx.sequence_mask(X.reshape(-1, shape[-1]), lens, use_sequence_length=True,
                          value=-1e6, axis=1)
    return npx.softmax(X, axis=-1).reshape(shape)


def _scaled_scores(F, queries, keys):
    """Q K^T / sqrt(d), d the last axis of Q (read off the shape, or computed in a symbol graph)."""
    scores = F.npx.batch_dot(queries, keys, transpose_b=True)  # (B', T_q, T_k)
    if not _is_symbol(queries):
        return scores / math.sqrt(queries.shape[-1])
    d = F.npx.slice(F.npx.shape_array(queries), begin=(-1,), end=(None,)).astype("float32")
    return scores / F.np.sqrt(d)


class DotProductAttention(nn.HybridBlock):
    """Scaled dot-product attention with dropout on the attention weights.

    The book always keeps the last weights in `attention_weights`; that pins a (B*h, T, T) array
    per layer between steps (about 130 MB per layer at batch 512, length 128, 4 heads), so here it
    is kept only when `keep_attention_weights` is set to True, for inspection (not when hybridized).
    A `HybridBlock` (as are the blocks below, up to `EncoderBlock`) so that `hybridize()` can run
    each encoder block as one cached graph; called imperatively it runs the same operators.
    """

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.keep_attention_weights = False
        self.attention_weights: np.ndarray | None = None

    def hybrid_forward(self, F, queries: np.ndarray, keys: np.ndarray, values: np.ndarray,
                       valid_lens: np.ndarray | None = None) -> np.ndarray:
        scores = _scaled_scores(F, queries, keys)  # (B', T_q, T_k)
        weights = masked_softmax(scores, valid_lens)  # (B', T_q, T_k)
        if self.keep_attention_weights and not _is_symbol(weights):
            self.attention_weights = weights.detach()
        return F.npx.batch_dot(self.dropout(weights), values)  # (B', T_q, d_v)


class MultiHeadAttention(nn.HybridBlock):
    """h parallel heads of size H/h; the heads are folded into the batch axis for one batch_dot.

    `fused_attention=True` (the fast path; the same switch as the torch backend's) masks with the
    softmax operator's own length argument, one operator instead of the book's repeat, reshape,
    sequence_mask, softmax and reshape, and splits and merges the heads with `swapaxes`. Same result
    for every valid_len >= 1 (BERT inputs have at least 3): masked keys get weight exactly 0 either
    way. Needs 1-D `valid_lens`; attention weights are not kept.
    """

    def __init__(self, num_hiddens: int, num_heads: int, dropout: float, bias: bool = True, *,
                 fused_attention: bool = False) -> None:
        super().__init__()
        if num_hiddens % num_heads:
            raise ValueError(f"num_hiddens={num_hiddens} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.fused_attention = fused_attention
        self.attention = DotProductAttention(dropout)
        # flatten=False: a Dense on (B, T, H) acts on the last axis, like torch's nn.Linear.
        self.W_q = nn.Dense(num_hiddens, use_bias=bias, flatten=False, in_units=num_hiddens)
        self.W_k = nn.Dense(num_hiddens, use_bias=bias, flatten=False, in_units=num_hiddens)
        self.W_v = nn.Dense(num_hiddens, use_bias=bias, flatten=False, in_units=num_hiddens)
        self.W_o = nn.Dense(num_hiddens, use_bias=bias, flatten=False, in_units=num_hiddens)

    def split_heads(self, X: np.ndarray) -> np.ndarray:
        """(B, T, H) -> (B*h, T, H/h), batch-major: rows b*h .. b*h+h-1 are example b's heads."""
        F = _namespace(X)
        # npx.reshape codes: -2 keeps an axis, -1 infers it, -5 merges two axes into one.
        X = F.npx.reshape(X, (-2, -2, self.num_heads, -1))  # (B, T, h, H/h)
        X = self._swap_axes(F, X)  # (B, h, T, H/h)
        return F.npx.reshape(X, (-5, -2, -2))  # (B*h, T, H/h)

    def merge_heads(self, X: np.ndarray) -> np.ndarray:
        """(B*h, T, H/h) -> (B, T, H), the inverse of split_heads."""
        F = _namespace(X)
        # -6 splits one axis in two (here into B inferred and h), -2 keeps, -5 merges.
        X = F.npx.reshape(X, (-6, -1, self.num_heads, -2, -2))  # (B, h, T, H/h)
        X = self._swap_axes(F, X)  # (B, T, h, H/h)
        return F.npx.reshape(X, (-2, -2, -5))  # (B, T, H)

    def _swap_axes(self, F, X: np.ndarray) -> np.ndarray:
        """Axes 1 and 2 swapped: the book's `transpose(0, 2, 1, 3)`, or on the fused path `swapaxes`, the
        same copy in a quarter of the time on the CPU (MXNet 1.9.1's transpose goes element by element)."""
        return F.np.swapaxes(X, 1, 2) if self.fused_attention else X.transpose(0, 2, 1, 3)

    def hybrid_forward(self, F, queries: np.ndarray, keys: np.ndarray, values: np.ndarray,
                       valid_lens: np.ndarray | None = None) -> np.ndarray:
        q = self.split_heads(self.W_q(queries))  # (B*h, T_q, H/h)
        k = self.split_heads(self.W_k(keys))  # (B*h, T_k, H/h)
        v = self.split_heads(self.W_v(values))  # (B*h, T_k, H/h)
        if valid_lens is not None:
            # Each example's lengths repeated once per head, matching split_heads' batch-major order.
            valid_lens = F.np.repeat(valid_lens, self.num_heads, axis=0)
        if self.fused_attention and valid_lens is not None:
            out = self._fused_attention(F, q, k, v, valid_lens)
        else:
            out = self.attention(q, k, v, valid_lens)  # (B*h, T_q, H/h)
        return self.W_o(self.merge_heads(out))  # (B, T_q, H)

    def _fused_attention(self, F, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                         valid_lens: np.ndarray) -> np.ndarray:
        scores = _scaled_scores(F, q, k)  # (B*h, T_q, T_k)
        # The softmax operator masks keys at index >= length itself: one (B*h, T_q) length per query row.
        lens = (F.np.expand_dims(valid_lens, -1) + F.npx.arange_like(scores, axis=1) * 0).astype("int32")
        weights = F.npx.softmax(scores, length=lens, use_length=True, axis=-1)
        return F.npx.batch_dot(self.attention.dropout(weights), v)  # (B*h, T_q, H/h)


class _GELUDense(nn.Dense):
    """A Dense followed by GELU (the exact erf form), with a Dense's parameters and names: Gluon's
    `Dense(activation=...)` knows no GELU, and a separate activation child would shift the
    `Sequential` indices that the masked-LM head's parameter names carry."""

    def hybrid_forward(self, F, x, weight, bias=None):
        return F.npx.leaky_relu(super().hybrid_forward(F, x, weight, bias), act_type="gelu")


def _dense_with_activation(units: int, in_units: int, hidden_act: str, flatten: bool = False) -> nn.Dense:
    """A Dense with the activation fused in: 'relu' (the book's) or 'gelu' (BERT's)."""
    if hidden_act == "relu":
        return nn.Dense(units, activation="relu", flatten=flatten, in_units=in_units)
    if hidden_act == "gelu":
        return _GELUDense(units, flatten=flatten, in_units=in_units)
    raise ValueError(f"unknown activation {hidden_act!r}: use 'relu' or 'gelu'")


class PositionWiseFFN(nn.HybridBlock):
    """The same two-layer MLP at every position: H -> F -> H, ReLU (the book's) or GELU (BERT's)."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, hidden_act: str = "relu") -> None:
        super().__init__()
        # The activation is fused into dense1, so there is no separate activation child (nor key).
        self.dense1 = _dense_with_activation(ffn_num_hiddens, num_hiddens, hidden_act)
        self.dense2 = nn.Dense(num_hiddens, flatten=False, in_units=ffn_num_hiddens)

    def hybrid_forward(self, F, X: np.ndarray) -> np.ndarray:
        return self.dense2(self.dense1(X))  # (B, T, H)


class AddNorm(nn.HybridBlock):
    """Residual connection then LayerNorm (post-LN): ln(dropout(Y) + X). `fast_backward` (the fast
    path's, set with the fused attention) differentiates the LayerNorm with `_kernels.layer_norm`."""

    def __init__(self, num_hiddens: int, dropout: float, layer_norm_eps: float = 1e-5, *,
                 fast_backward: bool = False) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(epsilon=layer_norm_eps, in_channels=num_hiddens)  # params gamma / beta
        self.fast_backward = fast_backward

    def hybrid_forward(self, F, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return _kernels.normalize(self.ln, self.dropout(Y) + X, self.fast_backward)


class EncoderBlock(nn.HybridBlock):
    """One Transformer encoder block: self-attention, add & norm, FFN, add & norm.

    The unit that `hybridize()` turns into one cached graph (see `BERTEncoder`)."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, num_heads: int, dropout: float, *,
                 fused_attention: bool = False, hidden_act: str = "relu", layer_norm_eps: float = 1e-5,
                 attention_dropout: float | None = None) -> None:
        super().__init__()
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.attention = MultiHeadAttention(num_hiddens, num_heads, attention_dropout, bias=True,
                                            fused_attention=fused_attention)
        self.addnorm1 = AddNorm(num_hiddens, dropout, layer_norm_eps, fast_backward=fused_attention)
        self.ffn = PositionWiseFFN(num_hiddens, ffn_num_hiddens, hidden_act)
        self.addnorm2 = AddNorm(num_hiddens, dropout, layer_norm_eps, fast_backward=fused_attention)

    def hybrid_forward(self, F, X: np.ndarray, valid_lens: np.ndarray | None,
                       queries: np.ndarray | None = None) -> np.ndarray:
        """`queries` (B, T_q, H), when given, are the only positions computed (attending over all of
        X): the fast path passes X[:, :1] to the last block, whose <cls> output is all a classifier
        reads. The result is then (B, T_q, H), those positions' outputs exactly."""
        Q = X if queries is None else queries
        Y = self.addnorm1(Q, self.attention(Q, X, X, valid_lens))  # (B, T, H)
        return self.addnorm2(Y, self.ffn(Y))  # (B, T, H)


class BERTEncoder(nn.Block):
    """Token + segment + learned position embeddings, summed, then `num_layers` encoder blocks.

    `pos_embedding` is a Parameter of shape (1, max_len, H) with no initializer of its own, so it
    takes the one passed to `initialize` (Xavier in the book's pretraining). Assigning it as an
    attribute registers it, so `save_parameters` names it `encoder.pos_embedding`. Reading it with
    `.data()` inside `autograd.record` is tracked, so unlike r0.17's torch code it is trained;
    `detach_pos_embedding=True` reproduces r0.17 torch's untrained embedding (as the torch twin).

    `embedding_norm=True` (BERT's, off in the book) adds `embedding_ln` and dropout after the sum.
    `fast_backward` (the fast path's, set with the fused attention) differentiates the position
    embedding's sum and `embedding_ln` with `_kernels`' faster backward.
    """

    def __init__(self, vocab_size: int, num_hiddens: int, ffn_num_hiddens: int, num_heads: int,
                 num_layers: int, dropout: float, max_len: int = 1000, *,
                 detach_pos_embedding: bool = False, fused_attention: bool = False, hidden_act: str = "relu",
                 layer_norm_eps: float = 1e-5, embedding_norm: bool = False,
                 attention_dropout: float | None = None) -> None:
        super().__init__()
        self.fast_backward = fused_attention
        self.token_embedding = nn.Embedding(vocab_size, num_hiddens)
        self.segment_embedding = nn.Embedding(2, num_hiddens)
        if embedding_norm:
            self.embedding_ln = nn.LayerNorm(epsilon=layer_norm_eps, in_channels=num_hiddens)
            self.embedding_dropout = nn.Dropout(dropout)
        self.embedding_norm = embedding_norm
        self.blks = nn.Sequential()  # children '0', '1', ... -> keys encoder.blks.{i}.*
        for _ in range(num_layers):
            self.blks.add(EncoderBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout,
                                       fused_attention=fused_attention, hidden_act=hidden_act,
                                       layer_norm_eps=layer_norm_eps, attention_dropout=attention_dropout))
        self.pos_embedding = self.params.get("pos_embedding", shape=(1, max_len, num_hiddens))
        self.detach_pos_embedding = detach_pos_embedding

    @classmethod
    def from_config(cls, cfg: BERTConfig, *, detach_pos_embedding: bool = False,
                    fused_attention: bool = False) -> "BERTEncoder":
        return cls(cfg.vocab_size, cfg.num_hiddens, cfg.ffn_num_hiddens, cfg.num_heads, cfg.num_layers,
                   cfg.dropout, cfg.max_len, detach_pos_embedding=detach_pos_embedding,
                   fused_attention=fused_attention, **cfg.architecture())

    def forward(self, tokens: np.ndarray, segments: np.ndarray,
                valid_lens: np.ndarray | None, cls_only: bool = False) -> np.ndarray:
        """(B, T, H) hidden states; with `cls_only` the last block computes position 0 (<cls>) only
        and the result is (B, 1, H): exactly the <cls> row of the full result, for a fraction of the
        last block's work (its keys and values still cover every position)."""
        T = tokens.shape[1]
        max_len = self.pos_embedding.shape[1]
        if T > max_len:
            raise ValueError(f"sequence length {T} exceeds max_len {max_len}")
        X = self.token_embedding(tokens) + self.segment_embedding(segments)  # (B, T, H)
        pos = self.pos_embedding.data(ctx=X.ctx)
        pos = pos.detach() if self.detach_pos_embedding else pos  # r0.17 torch's untrained embedding
        pos = pos[:, :T, :]  # no sqrt(H) scaling, in the book as in BERT
        X = _kernels.add_to_every_row(X, pos) if _kernels.in_use(self.fast_backward) else X + pos
        if self.embedding_norm:
            X = self.embedding_dropout(_kernels.normalize(self.embedding_ln, X, self.fast_backward))
        last = len(self.blks) - 1
        for i, blk in enumerate(self.blks):
            if i == last and getattr(blk, "_cls_only_graph", cls_only) != cls_only:
                blk._clear_cached_op()  # a hybridized block's graph has a fixed number of inputs
            if i == last:
                blk._cls_only_graph = cls_only
            X = blk(X, valid_lens, X[:, :1, :]) if cls_only and i == last else blk(X, valid_lens)
        return X  # (B, T, H), or (B, 1, H) with cls_only


class MaskLM(nn.Block):
    """Masked-LM head: gather the hidden states at `pred_positions`, then an MLP to vocab logits."""

    def __init__(self, vocab_size: int, num_hiddens: int, hidden_act: str = "relu",
                 layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        # Three children, keys mlm.mlp.{0,1,2}.*: the activation is fused into the first Dense
        # (torch needs a fourth module for it, hence its mlm.mlp.{0,2,3}).
        self.mlp = nn.Sequential()
        self.mlp.add(_dense_with_activation(num_hiddens, num_hiddens, hidden_act),
                     nn.LayerNorm(epsilon=layer_norm_eps, in_channels=num_hiddens),
                     nn.Dense(vocab_size, flatten=False, in_units=num_hiddens))

    def forward(self, X: np.ndarray, pred_positions: np.ndarray) -> np.ndarray:
        B, T, _ = X.shape
        # Row b*T + t of X viewed as (B*T, H) is position t of example b; one `take` gathers them all.
        row_start = np.arange(0, B * T, T, dtype="int32", ctx=X.ctx).reshape(B, 1)  # (B, 1)
        # (B, P) row numbers; the book's positions are float, so cast them to an index type.
        rows = row_start + pred_positions.as_in_ctx(X.ctx).astype("int32")
        masked_X = np.take(X.reshape(B * T, -1), rows, axis=0)  # (B, P, H)
        return self.mlp(masked_X)  # (B, P, V)


class NextSentencePred(nn.Block):
    """Next-sentence head: a 2-way linear classifier on the pooled <cls> representation."""

    def __init__(self, num_hiddens: int) -> None:
        super().__init__()
        self.output = nn.Dense(2, in_units=num_hiddens)  # flatten=True is harmless on (B, H)

    def forward(self, X: np.ndarray) -> np.ndarray:
        return self.output(X)  # (B, 2)


class BERTModel(nn.Block):
    """BERT as pretrained in the book: encoder, pooler (`hidden`), masked-LM and NSP heads.

    `config` holds the sizes and options it was built with (a `BERTConfig`), which checkpoints
    record. The keyword-only architecture options are `BERTConfig`'s; their defaults are the book's.
    """

    def __init__(self, vocab_size: int, num_hiddens: int, ffn_num_hiddens: int, num_heads: int,
                 num_layers: int, dropout: float, max_len: int = 1000, *,
                 detach_pos_embedding: bool = False, fused_attention: bool = False, hidden_act: str = "relu",
                 layer_norm_eps: float = 1e-5, embedding_norm: bool = False,
                 attention_dropout: float | None = None) -> None:
        super().__init__()
        self.config = BERTConfig(vocab_size=vocab_size, num_hiddens=num_hiddens,
                                 ffn_num_hiddens=ffn_num_hiddens, num_heads=num_heads,
                                 num_layers=num_layers, dropout=dropout, max_len=max_len,
                                 hidden_act=hidden_act, layer_norm_eps=layer_norm_eps,
                                 embedding_norm=embedding_norm, attention_dropout=attention_dropout)
        self.encoder = BERTEncoder.from_config(self.config, detach_pos_embedding=detach_pos_embedding,
                                               fused_attention=fused_attention)
        # The pooler: one Dense with a fused tanh on <cls>, so its keys are hidden.* (torch: hidden.0.*).
        self.hidden = nn.Dense(num_hiddens, activation="tanh", in_units=num_hiddens)
        self.mlm = MaskLM(vocab_size, num_hiddens, hidden_act, layer_norm_eps)
        self.nsp = NextSentencePred(num_hiddens)

    @classmethod
    def from_config(cls, cfg: BERTConfig, *, detach_pos_embedding: bool = False,
                    fused_attention: bool = False) -> "BERTModel":
        return cls(cfg.vocab_size, cfg.num_hiddens, cfg.ffn_num_hiddens, cfg.num_heads,
                   cfg.num_layers, cfg.dropout, cfg.max_len, detach_pos_embedding=detach_pos_embedding,
                   fused_attention=fused_attention, **cfg.architecture())

    def forward(self, tokens: np.ndarray, segments: np.ndarray,
                valid_lens: np.ndarray | None = None, pred_positions: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        encoded_X = self.encoder(tokens, segments, valid_lens)  # (B, T, H)
        mlm_Y_hat = self.mlm(encoded_X, pred_positions) if pred_positions is not None else None
        nsp_Y_hat = self.nsp(self.hidden(encoded_X[:, 0, :]))  # (B, 2), from the <cls> position
        return encoded_X, mlm_Y_hat, nsp_Y_hat


class BERTClassifier(nn.Block):
    """The chapter's NLI model: pretrained encoder and pooler, plus a new `num_classes`-way output
    layer (3: SNLI's labels, as the chapter).

    The MLM and NSP heads are deliberately not kept, so they are neither in `collect_params()`
    (the trainer never sees them) nor in `save_parameters` (39 tensors for a 2-layer model).
    `output` is left uninitialised, as in the book: `net.output.initialize(ctx=devices)` gives it
    Gluon's default Uniform(0.07). `cls_only=True` (the fast path) computes the encoder's last block
    at <cls> only, the one position the classifier reads: the same logits and gradients for less work.
    """

    def __init__(self, bert: nn.Block, cls_only: bool = False, num_classes: int = 3) -> None:
        super().__init__()
        self.encoder = bert.encoder
        self.hidden = bert.hidden
        num_hiddens = self.encoder.token_embedding.weight.shape[1]
        self.output = nn.Dense(num_classes, in_units=num_hiddens)
        self.config: BERTConfig | None = getattr(bert, "config", None)
        self.cls_only = cls_only

    @property
    def num_classes(self) -> int:
        return self.output.weight.shape[0]

    def forward(self, inputs: np.ndarray | Sequence[np.ndarray], segments: np.ndarray | None = None,
                valid_lens: np.ndarray | None = None) -> np.ndarray:
        """Either `net((tokens, segments, valid_lens))` as the book, or `net(tokens, segments, valid_lens)`."""
        if segments is None:
            tokens, segments, valid_lens = inputs
        else:
            tokens = inputs
        if self.cls_only:
            encoded_X = self.encoder(tokens, segments, valid_lens, True)  # cls_only: (B, 1, H)
        else:
            encoded_X = self.encoder(tokens, segments, valid_lens)  # (B, T, H)
        return self.output(self.hidden(encoded_X[:, 0, :]))  # (B, num_classes) logits


def set_fused_attention(net: nn.Block, enabled: bool = True) -> nn.Block:
    """Switch every `MultiHeadAttention` in `net` (a BERTModel, BERTClassifier, encoder, ...) to the
    fused path or back to the book's, and with it the faster backward of the LayerNorms and of the
    position embedding's sum (`_kernels`); returns `net`. Cached graphs of hybridized blocks are
    dropped, so the next call rebuilds them with the new setting."""
    def visit(block: nn.Block) -> None:
        if isinstance(block, MultiHeadAttention):
            block.fused_attention = enabled
        if isinstance(block, (AddNorm, BERTEncoder)):
            block.fast_backward = enabled
        if isinstance(block, nn.HybridBlock):
            block._clear_cached_op()
        for child in block._children.values():
            visit(child)
    visit(net)
    return net
