"""The PyTorch BERT: masking, parameter names and counts (the book's state_dict keys), shapes, invariances, gradients."""
from needs import require_backend

require_backend("torch")
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from nlibert.backends.torch import BERTClassifier, BERTModel  # noqa: E402
from nlibert.backends.torch.model import AddNorm, MultiHeadAttention, masked_softmax  # noqa: E402

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


# --- forward -----------------------------------------------------------------------------------

def test_mlm_gathers_the_hidden_state_at_each_predicted_position():
    bert = tiny_bert().eval()
    tokens, segments, lens = batch(B=2, T=8, valid_lens=(8, 5))
    pred_positions = torch.tensor([[1, 5, 2], [6, 1, 5]])
    encoded_X, mlm_Y_hat, _ = bert(tokens, segments, lens, pred_positions)
    torch.testing.assert_close(mlm_Y_hat[1, 0], bert.mlm.mlp(encoded_X[1, 6]))
    torch.testing.assert_close(mlm_Y_hat[0, 1], bert.mlm.mlp(encoded_X[0, 5]))


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
