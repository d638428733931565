"""The PyTorch BERT: masking, parameter names and counts (the book's state_dict keys), shapes, invariances, gradients."""
import math

import numpy as np
import pytest
from needs import require_backend

require_backend("torch")
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from nlibert.backends.torch import BERTClassifier, BERTModel  # noqa: E402
from nlibert.backends.torch.model import AddNorm, MultiHeadAttention, masked_softmax  # noqa: E402
from nlibert.core.config import BERTConfig  # noqa: E402

torch.set_num_threads(1)  # tests run two workers on shared cores

V, H, FFN, HEADS, LAYERS, MAX_LEN = 50, 16, 32, 2, 2, 24


def tiny_bert(dropout: float = 0.0, **kwargs) -> BERTModel:
    torch.manual_seed(0)
    return BERTModel(V, H, FFN, HEADS, LAYERS, dropout, MAX_LEN, **kwargs)


def batch(B=3, T=10, valid_lens=(10, 6, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    segments = torch.zeros(B, T, dtype=torch.long)
    segments[:, T // 2:] = 1
    return tokens, segments, torch.tensor(valid_lens)


# --- masked_softmax ---------------------------------------------------------------------------

def test_masked_softmax_1d_lens_zero_exactly_the_keys_past_each_length():
    X = torch.randn(2, 3, 5)
    out = masked_softmax(X, torch.tensor([2, 4]))
    for b, n in enumerate([2, 4]):
        assert torch.all(out[b, :, n:] == 0)
        assert torch.all(out[b, :, :n] > 0)
        torch.testing.assert_close(out[b, :, :n], F.softmax(X[b, :, :n], dim=-1))


def test_masked_softmax_2d_lens_are_per_query():
    X = torch.randn(2, 3, 5)
    lens = torch.tensor([[1, 3, 5], [2, 2, 4]])
    out = masked_softmax(X, lens)
    for b in range(2):
        for q in range(3):
            n = int(lens[b, q])
            assert torch.all(out[b, q, n:] == 0)
            torch.testing.assert_close(out[b, q, :n], F.softmax(X[b, q, :n], dim=-1))


def test_masked_softmax_none_is_plain_softmax_and_float_lens_equal_int_lens():
    X = torch.randn(2, 3, 5)
    torch.testing.assert_close(masked_softmax(X, None), F.softmax(X, dim=-1))
    torch.testing.assert_close(masked_softmax(X, torch.tensor([2.0, 4.0])),
                               masked_softmax(X, torch.tensor([2, 4], dtype=torch.int32)))


def test_masked_softmax_sets_rather_than_adds_so_length_zero_is_uniform():
    # The book replaces masked scores with -1e6: a fully masked row is uniform, never NaN.
    out = masked_softmax(torch.randn(1, 2, 4) * 100, torch.tensor([0]))
    torch.testing.assert_close(out, torch.full((1, 2, 4), 0.25))


# --- attention ---------------------------------------------------------------------------------

def test_multihead_attention_matches_an_independent_reference():
    torch.manual_seed(0)
    mha = MultiHeadAttention(H, HEADS, dropout=0.0).eval()
    X = torch.randn(3, 7, H)
    lens = torch.tensor([7, 4, 1])
    got = mha(X, X, X, lens)
    # Reference: torch's fused attention with a boolean key mask, heads as their own axis.
    def heads(t):
        return t.reshape(3, 7, HEADS, H // HEADS).transpose(1, 2)  # (B, h, T, d)
    q, k, v = heads(mha.W_q(X)), heads(mha.W_k(X)), heads(mha.W_v(X))
    keep = (torch.arange(7)[None, :] < lens[:, None])[:, None, None, :]  # (B, 1, 1, T)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    ref = mha.W_o(ref.transpose(1, 2).reshape(3, 7, H))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_attention_weights_are_kept_only_on_request():
    mha = MultiHeadAttention(H, HEADS, dropout=0.0).eval()
    X = torch.randn(3, 7, H)
    mha(X, X, X, torch.tensor([7, 4, 1]))
    assert mha.attention.attention_weights is None
    mha.attention.keep_attention_weights = True
    mha(X, X, X, torch.tensor([7, 4, 1]))
    weights = mha.attention.attention_weights
    assert weights.shape == (3 * HEADS, 7, 7)
    # Rows are batch-major: example b's heads are rows b*h .. b*h+h-1.
    assert torch.all(weights[HEADS:2 * HEADS, :, 4:] == 0) and torch.all(weights[HEADS:2 * HEADS, :, :4] > 0)
    assert torch.all(weights[2 * HEADS:, :, 1:] == 0) and torch.all(weights[2 * HEADS:, :, 0] == 1)


def test_addnorm_is_post_ln_with_the_book_names():
    an = AddNorm(H, 0.5).eval()
    assert isinstance(an.dropout, torch.nn.Dropout) and an.ln.eps == 1e-5
    X, Y = torch.randn(2, 3, H), torch.randn(2, 3, H)
    torch.testing.assert_close(an(X, Y), F.layer_norm(X + Y, (H,), eps=1e-5))


# --- names, shapes and counts (the book's state_dict) ----------------------------------------------------

def bert_small_table(V: int) -> list[tuple[str, tuple]]:
    """The book's state_dict of bert.small (H 256, F 512, h 4, L 2, max_len 512), written out."""
    rows = [("encoder.pos_embedding", (1, 512, 256)),
            ("encoder.token_embedding.weight", (V, 256)),
            ("encoder.segment_embedding.weight", (2, 256))]
    for i in (0, 1):
        p = f"encoder.blks.{i}."
        rows += [(p + "attention.W_q.weight", (256, 256)), (p + "attention.W_q.bias", (256,)),
                 (p + "attention.W_k.weight", (256, 256)), (p + "attention.W_k.bias", (256,)),
                 (p + "attention.W_v.weight", (256, 256)), (p + "attention.W_v.bias", (256,)),
                 (p + "attention.W_o.weight", (256, 256)), (p + "attention.W_o.bias", (256,)),
                 (p + "addnorm1.ln.weight", (256,)), (p + "addnorm1.ln.bias", (256,)),
                 (p + "ffn.dense1.weight", (512, 256)), (p + "ffn.dense1.bias", (512,)),
                 (p + "ffn.dense2.weight", (256, 512)), (p + "ffn.dense2.bias", (256,)),
                 (p + "addnorm2.ln.weight", (256,)), (p + "addnorm2.ln.bias", (256,))]
    rows += [("hidden.0.weight", (256, 256)), ("hidden.0.bias", (256,)),
             ("mlm.mlp.0.weight", (256, 256)), ("mlm.mlp.0.bias", (256,)),
             ("mlm.mlp.2.weight", (256,)), ("mlm.mlp.2.bias", (256,)),
             ("mlm.mlp.3.weight", (V, 256)), ("mlm.mlp.3.bias", (V,)),
             ("nsp.output.weight", (2, 256)), ("nsp.output.bias", (2,))]
    return rows


def test_bert_small_state_dict_keys_and_shapes_equal_the_book_table():
    bert = BERTModel(1000, 256, 512, 4, 2, 0.1, max_len=512)
    got = [(k, tuple(v.shape)) for k, v in bert.state_dict().items()]
    assert len(got) == 45
    assert got == bert_small_table(1000)


@pytest.mark.parametrize("vocab_size", [1000, 1234])
def test_parameter_counts_follow_the_book_formulas(vocab_size):
    bert = BERTModel(vocab_size, 256, 512, 4, 2, 0.1, max_len=512)
    assert sum(p.numel() for p in bert.parameters()) == 1_318_402 + 513 * vocab_size
    net = BERTClassifier(bert)
    assert sum(p.numel() for p in net.parameters()) == 1_252_355 + 256 * vocab_size


def test_classifier_keeps_encoder_and_pooler_and_drops_pretraining_heads():
    bert = BERTModel(1000, 256, 512, 4, 2, 0.1, max_len=512)
    net = BERTClassifier(bert)
    keys = list(net.state_dict())
    table = [k for k, _ in bert_small_table(1000)]
    expected = [k for k in table if k.startswith(("encoder.", "hidden."))] + ["output.weight", "output.bias"]
    assert keys == expected and len(keys) == 39
    assert tuple(net.state_dict()["output.weight"].shape) == (3, 256)
    assert net.encoder is bert.encoder and net.hidden is bert.hidden  # shared, not copied


def test_from_config_builds_the_same_architecture_and_records_config():
    cfg = BERTConfig(vocab_size=V, num_hiddens=H, ffn_num_hiddens=FFN, num_heads=HEADS,
                     num_layers=3, dropout=0.2, max_len=MAX_LEN)
    bert = BERTModel.from_config(cfg)
    assert bert.config == cfg
    assert sum(k.endswith("attention.W_q.weight") for k in bert.state_dict()) == 3
    assert bert.encoder.blks[0].addnorm1.dropout.p == 0.2
    assert BERTClassifier(bert).config == cfg


# --- forward -----------------------------------------------------------------------------------

def test_forward_shapes_as_the_book_prints_them():
    bert = tiny_bert()
    tokens, segments, lens = batch(B=2, T=8, valid_lens=(8, 5))
    pred_positions = torch.tensor([[1, 5, 2], [6, 1, 5]])
    encoded_X, mlm_Y_hat, nsp_Y_hat = bert(tokens, segments, lens, pred_positions)
    assert encoded_X.shape == (2, 8, H)
    assert mlm_Y_hat.shape == (2, 3, V)
    assert nsp_Y_hat.shape == (2, 2)
    assert bert(tokens, segments, lens)[1] is None


def test_mlm_gathers_the_hidden_state_at_each_predicted_position():
    bert = tiny_bert().eval()
    tokens, segments, lens = batch(B=2, T=8, valid_lens=(8, 5))
    pred_positions = torch.tensor([[1, 5, 2], [6, 1, 5]])
    encoded_X, mlm_Y_hat, _ = bert(tokens, segments, lens, pred_positions)
    torch.testing.assert_close(mlm_Y_hat[1, 0], bert.mlm.mlp(encoded_X[1, 6]))
    torch.testing.assert_close(mlm_Y_hat[0, 1], bert.mlm.mlp(encoded_X[0, 5]))


def test_int32_and_int64_indices_and_int_or_float_lengths_agree():
    bert = tiny_bert().eval()
    tokens, segments, lens = batch()
    ref = bert(tokens, segments, lens)[0]
    got = bert(tokens.int(), segments.int(), lens.float())[0]
    torch.testing.assert_close(got, ref)


def test_padding_does_not_change_valid_positions_or_classifier_logits():
    bert = tiny_bert(dropout=0.1)
    net = BERTClassifier(bert).eval()
    tokens, segments, lens = batch(B=3, T=10, valid_lens=(10, 6, 3))
    other = tokens.clone()
    for b, n in enumerate(lens.tolist()):
        other[b, n:] = (tokens[b, n:] + 7) % V  # change every padded token
    assert not torch.equal(other, tokens)
    X1, X2 = bert(tokens, segments, lens)[0], bert(other, segments, lens)[0]
    for b, n in enumerate(lens.tolist()):
        torch.testing.assert_close(X1[b, :n], X2[b, :n])
    torch.testing.assert_close(net((tokens, segments, lens)), net((other, segments, lens)))


def test_classifier_accepts_a_tuple_or_three_arguments():
    net = BERTClassifier(tiny_bert()).eval()
    tokens, segments, lens = batch()
    out = net((tokens, segments, lens))
    assert out.shape == (3, 3)
    torch.testing.assert_close(net(tokens, segments, lens), out)


def test_dropout_is_active_in_train_mode_only():
    net = BERTClassifier(tiny_bert(dropout=0.5))
    X = batch()
    net.train()
    assert not torch.equal(net(X), net(X))
    net.eval()
    assert torch.equal(net(X), net(X))


def test_longer_than_max_len_is_a_clear_error():
    bert = tiny_bert()
    tokens = torch.zeros(1, MAX_LEN + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_len"):
        bert(tokens, tokens, torch.tensor([3]))


# --- gradients ---------------------------------------------------------------------------------

def _pos_grad(**kwargs):
    bert = tiny_bert(**kwargs)
    tokens, segments, lens = batch()
    encoded_X, _, nsp = bert(tokens, segments, lens)
    (encoded_X.sum() + nsp.sum()).backward()
    return bert.encoder.pos_embedding.grad


def test_pos_embedding_is_trained():
    grad = _pos_grad()
    assert grad is not None and grad[:, :10].abs().sum() > 0
    assert torch.all(grad[:, 10:] == 0)  # positions past the sequence length are unused


def test_detach_flag_reproduces_the_r017_bug():
    assert _pos_grad(detach_pos_embedding=True) is None
    # The parameter stays in the state_dict either way, so r0.17 files load into both.
    assert "encoder.pos_embedding" in tiny_bert(detach_pos_embedding=True).state_dict()


def test_pos_embedding_is_standard_normal_at_init():
    pos = BERTModel(V, 64, 64, 2, 1, 0.0, max_len=512).encoder.pos_embedding.detach().numpy()
    assert abs(pos.mean()) < 0.02 and abs(pos.std() - 1) < 0.02
    assert not math.isclose(float(np.abs(pos).sum()), 0.0)
