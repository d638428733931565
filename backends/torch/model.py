"""The book's BERT in PyTorch: encoder, pretraining heads, and the NLI classifier.

Read top to bottom it is the model: attention (masked softmax, dot product, multi-head), the two
sublayers of a post-LN Transformer block (position-wise FFN, add & norm), the block, the BERT
encoder (token + segment + learned position embeddings, then the blocks), the two pretraining
heads (masked LM, next-sentence prediction), BERT itself, and the fine-tuning classifier.

It computes what d2l's `BERTModel` computes (post-LN blocks, a learned positional embedding, no
embedding LayerNorm) and its `state_dict` keys are the book's, so the book's `bert.small.torch` /
`bert.base.torch` files load unchanged.
By default the differences from HF BERT are the book's, kept on purpose: ReLU not GELU, LayerNorm
eps 1e-5, no embedding LayerNorm or dropout. Hugging Face checkpoints switch on BERT's options
(`hidden_act='gelu'`, `layer_norm_eps`, `embedding_norm`, `attention_dropout`: see `BERTConfig`).
Either way valid-length masking *replaces* scores with -1e6, which gives the masked keys the same
zero weight as BERT's additive mask.

Shapes: B batch, T sequence length, H num_hiddens, h num_heads, F ffn_num_hiddens, V vocab size,
P number of masked positions to predict.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nlibert.core.config import BERTConfig


def masked_softmax(X: torch.Tensor, valid_lens: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis of X (B', T_q, T_k) that ignores keys at index >= valid_len.

    `valid_lens` is None (plain softmax), 1-D (B',): one length per batch row, shared by every
    query, or 2-D (B', T_q): one length per query. Masked scores are *set* to -1e6 (not -inf, not
    added), exactly as the book, so a row with valid_len 0 comes out uniform rather than NaN.
    """
    if valid_lens is None:
        return F.softmax(X, dim=-1)
    valid_lens = torch.as_tensor(valid_lens, device=X.device)
    if valid_lens.dim() == 1:
        lens = valid_lens[:, None, None]  # (B', 1, 1): same length for every query
    elif valid_lens.dim() == 2:
        lens = valid_lens[:, :, None]  # (B', T_q, 1)
    else:
        raise ValueError(f"valid_lens must be 1-D or 2-D, got shape {tuple(valid_lens.shape)}")
    key_index = torch.arange(X.shape[-1], device=X.device)  # (T_k,)
    keep = key_index < lens  # (B', T_q or 1, T_k); int or float lengths both compare fine
    # -1e6 overflows half precision to -inf; clamp to the dtype's range so fp16/bf16 stay finite.
    fill = max(-1e6, torch.finfo(X.dtype).min)
    return F.softmax(X.masked_fill(~keep, fill), dim=-1)


class DotProductAttention(nn.Module):
    """Scaled dot-product attention with dropout on the attention weights.

    The book always keeps the last weights in `attention_weights`; that pins a (B*h, T, T) tensor
    per layer between steps (about 130 MB per layer at batch 512, length 128, 4 heads), so here it
    is kept only when `keep_attention_weights` is set to True, for inspection.
    """

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.keep_attention_weights = False
        self.attention_weights: torch.Tensor | None = None

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                valid_lens: torch.Tensor | None = None) -> torch.Tensor:
        d = queries.shape[-1]
        scores = torch.bmm(queries, keys.transpose(1, 2)) / math.sqrt(d)  # (B', T_q, T_k)
        weights = masked_softmax(scores, valid_lens)  # (B', T_q, T_k)
        if self.keep_attention_weights:
            self.attention_weights = weights.detach()
        return torch.bmm(self.dropout(weights), values)  # (B', T_q, d_v)


class MultiHeadAttention(nn.Module):
    """h parallel heads of size H/h; the heads are folded into the batch axis for one bmm.

    `fused_attention=True` (the fast path; the same switch as the MXNet backend's) computes the
    heads with `F.scaled_dot_product_attention` and a boolean key mask instead: the same softmax of
    Q K^T / sqrt(d) over the valid keys, dropout on the weights, times V, in one fused call and
    without the head transposes' copies. Same result for every valid_len >= 1 (BERT inputs have at
    least 3): masked keys get weight exactly 0 either way, but a row with valid_len 0 would come out
    NaN rather than the book's uniform weights. Attention weights are not kept.
    """

    def __init__(self, num_hiddens: int, num_heads: int, dropout: float, bias: bool = True, *,
                 fused_attention: bool = False) -> None:
        super().__init__()
        if num_hiddens % num_heads:
            raise ValueError(f"num_hiddens={num_hiddens} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.fused_attention = fused_attention
        self.attention = DotProductAttention(dropout)
        self.W_q = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_k = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_v = nn.Linear(num_hiddens, num_hiddens, bias=bias)
        self.W_o = nn.Linear(num_hiddens, num_hiddens, bias=bias)

    def split_heads(self, X: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B*h, T, H/h), batch-major: rows b*h .. b*h+h-1 are example b's heads."""
        B, T, _ = X.shape
        X = X.reshape(B, T, self.num_heads, -1).permute(0, 2, 1, 3)  # (B, h, T, H/h)
        return X.reshape(B * self.num_heads, T, -1)

    def merge_heads(self, X: torch.Tensor) -> torch.Tensor:
        """(B*h, T, H/h) -> (B, T, H), the inverse of split_heads."""
        _, T, d = X.shape
        X = X.reshape(-1, self.num_heads, T, d).permute(0, 2, 1, 3)  # (B, T, h, H/h)
        return X.reshape(X.shape[0], T, -1)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                valid_lens: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused_attention:
            return self._fused_forward(queries, keys, values, valid_lens)
        q = self.split_heads(self.W_q(queries))  # (B*h, T_q, H/h)
        k = self.split_heads(self.W_k(keys))  # (B*h, T_k, H/h)
        v = self.split_heads(self.W_v(values))  # (B*h, T_k, H/h)
        if valid_lens is not None:
            # Each example's lengths repeated once per head, matching split_heads' batch-major order.
            valid_lens = torch.repeat_interleave(torch.as_tensor(valid_lens, device=q.device),
                                                 self.num_heads, dim=0)
        out = self.attention(q, k, v, valid_lens)  # (B*h, T_q, H/h)
        return self.W_o(self.merge_heads(out))  # (B, T_q, H)

    def _fused_forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       valid_lens: torch.Tensor | None) -> torch.Tensor:
        B, T_q, H = queries.shape
        T_k = keys.shape[1]

        def heads(X: torch.Tensor, T: int) -> torch.Tensor:  # (B, T, H) -> (B, h, T, H/h), a view
            return X.view(B, T, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.W_q(queries), T_q), heads(self.W_k(keys), T_k), heads(self.W_v(values), T_k)
        mask = None
        if valid_lens is not None:
            lens = torch.as_tensor(valid_lens, device=q.device)
            key_index = torch.arange(T_k, device=q.device)
            if lens.dim() == 1:
                mask = (key_index < lens[:, None])[:, None, None, :]  # (B, 1, 1, T_k): keep these keys
            elif lens.dim() == 2:
                mask = (key_index < lens[:, :, None])[:, None, :, :]  # (B, 1, T_q, T_k)
            else:
                raise ValueError(f"valid_lens must be 1-D or 2-D, got shape {tuple(lens.shape)}")
        dropout = self.attention.dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, h, T_q, H/h)
        return self.W_o(out.transpose(1, 2).reshape(B, T_q, H))  # (B, T_q, H)


def _activation(name: str) -> nn.Module:
    """'relu' (the book's) or 'gelu' (BERT's exact erf form, not the tanh approximation)."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU(approximate="none")
    raise ValueError(f"unknown activation {name!r}: use 'relu' or 'gelu'")


class PositionWiseFFN(nn.Module):
    """The same two-layer MLP at every position: H -> F -> H, ReLU (the book's) or GELU (BERT's)."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, hidden_act: str = "relu") -> None:
        super().__init__()
        self.dense1 = nn.Linear(num_hiddens, ffn_num_hiddens)
        self.activation = _activation(hidden_act)
        self.dense2 = nn.Linear(ffn_num_hiddens, num_hiddens)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.dense2(self.activation(self.dense1(X)))  # (B, T, H)


class AddNorm(nn.Module):
    """Residual connection then LayerNorm (post-LN): ln(dropout(Y) + X)."""

    def __init__(self, num_hiddens: int, dropout: float, layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(num_hiddens, eps=layer_norm_eps)

    def forward(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return self.ln(self.dropout(Y) + X)


class EncoderBlock(nn.Module):
    """One Transformer encoder block: self-attention, add & norm, FFN, add & norm."""

    def __init__(self, num_hiddens: int, ffn_num_hiddens: int, num_heads: int, dropout: float, *,
                 fused_attention: bool = False, hidden_act: str = "relu", layer_norm_eps: float = 1e-5,
                 attention_dropout: float | None = None) -> None:
        super().__init__()
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.attention = MultiHeadAttention(num_hiddens, num_heads, attention_dropout, bias=True,
                                            fused_attention=fused_attention)
        self.addnorm1 = AddNorm(num_hiddens, dropout, layer_norm_eps)
        self.ffn = PositionWiseFFN(num_hiddens, ffn_num_hiddens, hidden_act)
        self.addnorm2 = AddNorm(num_hiddens, dropout, layer_norm_eps)

    def forward(self, X: torch.Tensor, valid_lens: torch.Tensor | None,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """`queries` (B, T_q, H), when given, are the only positions computed (attending over all of
        X): the fast path passes X[:, :1] to the last block, whose <cls> output is all a classifier
        reads. The result is then (B, T_q, H), those positions' outputs exactly."""
        Q = X if queries is None else queries
        Y = self.addnorm1(Q, self.attention(Q, X, X, valid_lens))  # (B, T, H)
        return self.addnorm2(Y, self.ffn(Y))  # (B, T, H)


class BERTEncoder(nn.Module):
    """Token + segment + learned position embeddings, summed, then `num_layers` encoder blocks.

    `pos_embedding` is an `nn.Parameter` of shape (1, max_len, H) and is added *as the parameter*,
    so it is trained. d2l r0.17 added `self.pos_embedding.data[...]`, which is detached: its
    positional embedding never got a gradient and stayed at its random init (fixed in d2l master,
    d2l-en PR #2121). `detach_pos_embedding=True` reproduces that r0.17 behaviour for readers who
    want to compare; the parameter is still in the `state_dict` either way.

    `embedding_norm=True` (BERT's, off in the book) adds `embedding_ln` and dropout after the sum.
    """

    def __init__(self, vocab_size: int, num_hiddens: int, ffn_num_hiddens: int, num_heads: int,
                 num_layers: int, dropout: float, max_len: int = 1000, *,
                 detach_pos_embedding: bool = False, fused_attention: bool = False, hidden_act: str = "relu",
                 layer_norm_eps: float = 1e-5, embedding_norm: bool = False,
                 attention_dropout: float | None = None) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, num_hiddens)
        self.segment_embedding = nn.Embedding(2, num_hiddens)
        if embedding_norm:
            self.embedding_ln = nn.LayerNorm(num_hiddens, eps=layer_norm_eps)
            self.embedding_dropout = nn.Dropout(dropout)
        self.embedding_norm = embedding_norm
        self.blks = nn.Sequential(*[EncoderBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout,
                                                 fused_attention=fused_attention, hidden_act=hidden_act,
                                                 layer_norm_eps=layer_norm_eps,
                                                 attention_dropout=attention_dropout)
                                    for _ in range(num_layers)])
        self.pos_embedding = nn.Parameter(torch.randn(1, max_len, num_hiddens))  # N(0, 1), as the book
        self.detach_pos_embedding = detach_pos_embedding

    @classmethod
    def from_config(cls, cfg: BERTConfig, *, detach_pos_embedding: bool = False,
                    fused_attention: bool = False) -> "BERTEncoder":
        return cls(cfg.vocab_size, cfg.num_hiddens, cfg.ffn_num_hiddens, cfg.num_heads, cfg.num_layers,
                   cfg.dropout, cfg.max_len, detach_pos_embedding=detach_pos_embedding,
                   fused_attention=fused_attention, **cfg.architecture())

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor,
                valid_lens: torch.Tensor | None, cls_only: bool = False) -> torch.Tensor:
        """(B, T, H) hidden states; with `cls_only` the last block computes position 0 (<cls>) only
        and the result is (B, 1, H): exactly the <cls> row of the full result, for a fraction of the
        last block's work (its keys and values still cover every position)."""
        T = tokens.shape[1]
        if T > self.pos_embedding.shape[1]:
            raise ValueError(f"sequence length {T} exceeds max_len {self.pos_embedding.shape[1]}")
        pos = self.pos_embedding.detach() if self.detach_pos_embedding else self.pos_embedding
        X = self.token_embedding(tokens) + self.segment_embedding(segments)  # (B, T, H)
        X = X + pos[:, :T, :]  # no sqrt(H) scaling, in the book as in BERT
        if self.embedding_norm:
            X = self.embedding_dropout(self.embedding_ln(X))
        last = len(self.blks) - 1
        for i, blk in enumerate(self.blks):
            X = blk(X, valid_lens, X[:, :1, :]) if cls_only and i == last else blk(X, valid_lens)
        return X  # (B, T, H), or (B, 1, H) with cls_only


class MaskLM(nn.Module):
    """Masked-LM head: gather the hidden states at `pred_positions`, then an MLP to vocab logits."""

    def __init__(self, vocab_size: int, num_hiddens: int, hidden_act: str = "relu",
                 layer_norm_eps: float = 1e-5) -> None:
        super().__init__()
        # Indices 0..3 matter: they are the state_dict keys mlm.mlp.{0,2,3}.* of the book's files.
        self.mlp = nn.Sequential(nn.Linear(num_hiddens, num_hiddens), _activation(hidden_act),
                                 nn.LayerNorm(num_hiddens, eps=layer_norm_eps),
                                 nn.Linear(num_hiddens, vocab_size))

    def forward(self, X: torch.Tensor, pred_positions: torch.Tensor) -> torch.Tensor:
        B, P = pred_positions.shape
        batch_idx = torch.arange(B, device=X.device).repeat_interleave(P)  # (B*P,): 0,0,..,1,1,..
        positions = pred_positions.reshape(-1).to(device=X.device, dtype=torch.long)  # (B*P,)
        masked_X = X[batch_idx, positions].reshape(B, P, -1)  # (B, P, H)
        return self.mlp(masked_X)  # (B, P, V)


class NextSentencePred(nn.Module):
    """Next-sentence head: a 2-way linear classifier on the pooled <cls> representation."""

    def __init__(self, num_hiddens: int) -> None:
        super().__init__()
        self.output = nn.Linear(num_hiddens, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.output(X)  # (B, 2)


class BERTModel(nn.Module):
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
        # The pooler: a Linear + Tanh on <cls>. A Sequential so the keys are hidden.0.*, as the book.
        self.hidden = nn.Sequential(nn.Linear(num_hiddens, num_hiddens), nn.Tanh())
        self.mlm = MaskLM(vocab_size, num_hiddens, hidden_act, layer_norm_eps)
        self.nsp = NextSentencePred(num_hiddens)

    @classmethod
    def from_config(cls, cfg: BERTConfig, *, detach_pos_embedding: bool = False,
                    fused_attention: bool = False) -> "BERTModel":
        return cls(cfg.vocab_size, cfg.num_hiddens, cfg.ffn_num_hiddens, cfg.num_heads,
                   cfg.num_layers, cfg.dropout, cfg.max_len, detach_pos_embedding=detach_pos_embedding,
                   fused_attention=fused_attention, **cfg.architecture())

    def forward(self, tokens: torch.Tensor, segments: torch.Tensor,
                valid_lens: torch.Tensor | None = None, pred_positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        encoded_X = self.encoder(tokens, segments, valid_lens)  # (B, T, H)
        mlm_Y_hat = self.mlm(encoded_X, pred_positions) if pred_positions is not None else None
        nsp_Y_hat = self.nsp(self.hidden(encoded_X[:, 0, :]))  # (B, 2), from the <cls> position
        return encoded_X, mlm_Y_hat, nsp_Y_hat


class BERTClassifier(nn.Module):
    """The chapter's NLI model: pretrained encoder and pooler, plus a new `num_classes`-way output
    layer (3: SNLI's labels, as the chapter).

    The MLM and NSP heads are deliberately not kept, so they are neither in `parameters()` (the
    optimizer never sees them) nor in the `state_dict` (39 tensors for a 2-layer model).
    `cls_only=True` (the fast path) computes the encoder's last block at <cls> only, the one
    position the classifier reads: the same logits and gradients for less work.
    """

    def __init__(self, bert: nn.Module, cls_only: bool = False, num_classes: int = 3) -> None:
        super().__init__()
        self.encoder = bert.encoder
        self.hidden = bert.hidden
        num_hiddens = self.encoder.token_embedding.embedding_dim
        self.output = nn.Linear(num_hiddens, num_classes)  # torch's default init, as the book
        self.config: BERTConfig | None = getattr(bert, "config", None)
        self.cls_only = cls_only

    @property
    def num_classes(self) -> int:
        return self.output.out_features

    def forward(self, inputs: torch.Tensor | Sequence[torch.Tensor], segments: torch.Tensor | None = None,
                valid_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Either `net((tokens, segments, valid_lens))` as the book, or `net(tokens, segments, valid_lens)`."""
        if segments is None:
            tokens, segments, valid_lens = inputs
        else:
            tokens = inputs
        if self.cls_only:
            encoded_X = self.encoder(tokens, segments, valid_lens, cls_only=True)  # (B, 1, H)
        else:
            encoded_X = self.encoder(tokens, segments, valid_lens)  # (B, T, H)
        return self.output(self.hidden(encoded_X[:, 0, :]))  # (B, num_classes) logits


def set_fused_attention(net: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every `MultiHeadAttention` in `net` (a BERTModel, BERTClassifier, encoder, ...) to the
    fused path or back to the book's; returns `net`. (The MXNet backend's function of the same name
    also drops hybridized graphs; a `torch.compile`d module must be compiled again.)"""
    for module in net.modules():
        if isinstance(module, MultiHeadAttention):
            module.fused_attention = enabled
    return net
