"""The BERT model of every installed backend, through the contract's names only: the book's
masked softmax, the forward pass against a numpy reference of the book's formulas, the canonical
parameter names, shapes and counts, config records, forward shapes, the max_len error, index and
length dtypes, padding invariance, the positional embedding's init and its training (and r0.17's
detached one), seeded parameters.

One tiny-config tester (`BackendTester`) builds, runs and reads any backend's model; what one framework
alone has (its head layout, how it keeps attention weights, its train/eval switch, MXNet's parameter
collection) stays in that framework's own file (tests/test_{torch,mxnet,jax}_only.py).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from nlibert.backends import installed_backends, load_backend, read_params_in
from nlibert.core.config import BERTConfig
from nlibert.core.folders import CLASSIFIER_FILE, PRETRAINED_FILE
from nlibert.core.names import expected_shapes, to_canonical
from nlibert.core.vocab import RESERVED_TOKENS, Vocab

TINY = BERTConfig(vocab_size=50, num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=2, dropout=0.0,
                  max_len=24)


class BackendTester:
    """A backend's model built, run and read through the contract: numpy in, numpy out."""

    def __init__(self, name: str) -> None:
        self.name, self.backend = name, load_backend(name)
        self.device = self.backend.parse_devices("cpu")[0]

    def bert(self, cfg: BERTConfig = TINY, seed: int = 0, devices: list | None = None, **options):
        """A `BERTModel.from_config(cfg, **options)` initialised on `devices` (None: the CPU)."""
        self.backend.set_seed(seed)
        bert = self.backend.BERTModel.from_config(cfg, **options)
        self.backend.initialize_bert(bert, devices or [self.device])
        return bert

    def classifier(self, bert, num_classes: int = 3, devices: list | None = None, cls_only: bool = False):
        net = self.backend.BERTClassifier(bert, cls_only=cls_only, num_classes=num_classes)
        self.backend.initialize_classifier_head(net, devices or [self.device])
        return net

    def outputs(self, bert, tokens, segments, valid_lens, positions=None) -> tuple:
        if positions is None:
            positions = np.zeros((len(tokens), 1), np.int32)
        return self.backend.bert_outputs(bert, tokens, segments, valid_lens, positions, self.device)

    def logits(self, net, tokens, segments, valid_lens) -> np.ndarray:
        return self.backend.classifier_logits(net, tokens, segments, valid_lens, self.device)

    def arrays(self, *arrays: np.ndarray) -> tuple:
        """numpy arrays (of one batch size) as the framework's arrays on the device: the contract's
        `split_batch_multi_inputs` over one device."""
        shards, _ = self.backend.split_batch_multi_inputs(arrays, np.zeros(len(arrays[0])), [self.device])
        return shards[0]

    @staticmethod
    def numpy(x) -> np.ndarray:
        """A framework's array as numpy, whatever it is (`tolist` is every framework's; exact for float32)."""
        return np.array(x.tolist(), dtype=np.float32)

    def params(self, model, folder) -> dict[str, np.ndarray]:
        """A model's or classifier's parameters under canonical names (its saver's file, read back)."""
        kind = "classifier" if isinstance(model, self.backend.BERTClassifier) else "pretrained"
        return self.saved_params(model, folder, kind)

    def save(self, model, folder, kind: str = "pretrained") -> Vocab:
        """The backend's saver of `kind`, with a vocabulary of the model's size; returns the vocabulary."""
        vocab = Vocab.from_idx_to_token(["<unk>"] + RESERVED_TOKENS +
                                        [f"w{i}" for i in range(model.config.vocab_size - 5)])
        if kind == "pretrained":
            self.backend.save_pretrained(model, vocab, folder)
        else:
            self.backend.save_classifier(model, vocab, None, folder)
        return vocab

    def read(self, path) -> dict[str, np.ndarray]:
        """A params file of this backend's format under canonical names, in file order."""
        return to_canonical(read_params_in(str(path), self.name), self.name)

    def saved_params(self, model, folder, kind: str = "pretrained") -> dict[str, np.ndarray]:
        """What the backend's saver writes, read back under canonical names, in file order."""
        self.save(model, folder, kind)
        return self.read(os.path.join(folder, PRETRAINED_FILE if kind == "pretrained" else CLASSIFIER_FILE))


@pytest.fixture(scope="module", params=installed_backends())
def tester(request) -> BackendTester:
    return BackendTester(request.param)


def batch(B=3, T=10, valid_lens=(10, 6, 3), seed=0, vocab_size=TINY.vocab_size):
    """(tokens, segments, valid_lens): int32 ids, segment 1 in the second half, int32 lengths."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (B, T)).astype(np.int32)
    segments = np.zeros((B, T), np.int32)
    segments[:, T // 2:] = 1
    return tokens, segments, np.array(valid_lens, np.int32)


# --- masked_softmax ---------------------------------------------------------------------------

def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _masked_softmax(tester, X, valid_lens):
    """The backend's `masked_softmax` of numpy scores and lengths (None: none), back as numpy."""
    if valid_lens is None:
        return tester.numpy(tester.backend.masked_softmax(tester.arrays(X)[0], None))
    return tester.numpy(tester.backend.masked_softmax(*tester.arrays(X, valid_lens)))


# Softmax values are <= 1: rtol 1e-5 / atol 1e-6 against numpy's softmax of the kept keys;
# measured 3e-8 (1-D and 2-D lengths) and 6e-8 (no lengths) in JAX.
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32])
def test_masked_softmax_1d_lens_zero_exactly_the_keys_past_each_length(tester, rng, dtype):
    X = rng.normal(size=(2, 3, 5)).astype(np.float32)
    out = _masked_softmax(tester, X, np.array([2, 4], dtype))
    for b, n in enumerate([2, 4]):
        assert np.all(out[b, :, n:] == 0) and np.all(out[b, :, :n] > 0)
        np.testing.assert_allclose(out[b, :, :n], _softmax(X[b, :, :n]), rtol=1e-5, atol=1e-6)


def test_masked_softmax_2d_lens_are_per_query(tester, rng):
    X = rng.normal(size=(2, 3, 5)).astype(np.float32)
    lens = np.array([[1, 3, 5], [2, 2, 4]], np.int32)
    out = _masked_softmax(tester, X, lens)
    for b in range(2):
        for q in range(3):
            n = lens[b, q]
            assert np.all(out[b, q, n:] == 0)
            np.testing.assert_allclose(out[b, q, :n], _softmax(X[b, q, :n]), rtol=1e-5, atol=1e-6)


def test_masked_softmax_none_is_plain_softmax_and_float_lens_equal_int_lens(tester, rng):
    X = rng.normal(size=(2, 3, 5)).astype(np.float32)
    np.testing.assert_allclose(_masked_softmax(tester, X, None), _softmax(X), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_masked_softmax(tester, X, np.array([2.0, 4.0], np.float32)),
                                  _masked_softmax(tester, X, np.array([2, 4], np.int32)))


def test_masked_softmax_sets_rather_than_adds_so_length_zero_is_uniform(tester, rng):
    # The book replaces masked scores with -1e6: a fully masked row is uniform, never NaN, even for
    # scores far from 0 (an additive mask would keep their differences).
    X = rng.normal(size=(2, 2, 4)).astype(np.float32) * 100
    out = _masked_softmax(tester, X, np.array([0, 4], np.int32))
    np.testing.assert_array_equal(out[0], np.full((2, 4), 0.25, np.float32))
    out2 = _masked_softmax(tester, X, np.array([[0, 2], [4, 0]], np.int32))
    np.testing.assert_array_equal(out2[0, 0], np.full(4, 0.25, np.float32))
    np.testing.assert_array_equal(out2[1, 1], np.full(4, 0.25, np.float32))
    assert np.all(out2[0, 1, 2:] == 0)


# --- the forward pass, in numpy ------------------------------------------------------------------

def numpy_bert(p: dict, cfg: BERTConfig, tokens, segments, valid_lens, positions) -> tuple:
    """The book's BERT written out in float64 numpy from canonical parameters: embeddings summed,
    post-LN blocks (multi-head attention with the keys past each length set to -1e6, the ReLU
    FFN), the tanh pooler of <cls>, the NSP layer, and the MLM MLP (Linear, ReLU, LayerNorm,
    Linear) of the rows at `positions`. Returns (encoded_X, mlm_Y_hat, nsp_Y_hat)."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    B, T = tokens.shape
    h, d = cfg.num_heads, cfg.num_hiddens // cfg.num_heads

    def linear(x, name):  # torch's layout: x @ weight.T + bias
        return x @ p[name + ".weight"].T + p[name + ".bias"]

    def layer_norm(x, name):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * p[name + ".weight"] \
            + p[name + ".bias"]

    def heads(x):  # (B, T, H) -> (B, h, T, d)
        return x.reshape(B, T, h, d).transpose(0, 2, 1, 3)

    X = (p["encoder.token_embedding.weight"][tokens] + p["encoder.segment_embedding.weight"][segments]
         + p["encoder.pos_embedding"][:, :T])
    keep = np.arange(T)[None, None, None, :] < np.asarray(valid_lens)[:, None, None, None]
    for i in range(cfg.num_layers):
        blk = f"encoder.blks.{i}."
        q, k, v = (heads(linear(X, blk + f"attention.W_{n}")) for n in "qkv")
        scores = np.where(keep, q @ k.transpose(0, 1, 3, 2) / np.sqrt(d), -1e6)
        attended = (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(B, T, h * d)
        Y = layer_norm(X + linear(attended, blk + "attention.W_o"), blk + "addnorm1.ln")
        ffn = linear(np.maximum(linear(Y, blk + "ffn.dense1"), 0), blk + "ffn.dense2")
        X = layer_norm(Y + ffn, blk + "addnorm2.ln")
    nsp = linear(np.tanh(linear(X[:, 0], "hidden.0")), "nsp.output")
    gathered = np.stack([X[b, positions[b]] for b in range(B)])  # (B, P, H)
    mlm = linear(layer_norm(np.maximum(linear(gathered, "mlm.mlp.0"), 0), "mlm.mlp.2"), "mlm.mlp.3")
    return X, mlm, nsp


def test_the_forward_pass_is_the_books_formulas(tester, tmp_path):
    """encoded_X, the MLM logits at the requested positions and the NSP logits of `bert_outputs`
    equal numpy_bert's on the saved parameters, every position (pads included), with lengths from
    the full width down to 1 and 0 (a row of length 0 attends uniformly: the -1e6 is set, not
    added). float32 against float64: atol 1e-5 on O(1) outputs; measured (encoded_X, mlm_Y_hat,
    nsp_Y_hat) torch 4.8e-7, 3.8e-7, 3.3e-8; mxnet 6.6e-7, 8.6e-7, 3.7e-7; jax 4.2e-7, 4.1e-7, 6.2e-8."""
    bert = tester.bert()
    tokens, segments, lens = batch(B=4, T=10, valid_lens=(10, 6, 1, 0))
    positions = np.array([[1, 5, 2], [6, 1, 5], [0, 0, 9], [3, 4, 3]], np.int32)
    got = tester.outputs(bert, tokens, segments, lens, positions)
    expected = numpy_bert(tester.params(bert, tmp_path / "bert"), TINY, tokens, segments, lens, positions)
    for name, a, b in zip(("encoded_X", "mlm_Y_hat", "nsp_Y_hat"), got, expected):
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(got[1][2, 0], got[1][2, 1])  # the same position read twice


def test_classifier_accepts_a_tuple_or_three_arguments(tester):
    net = tester.classifier(tester.bert())
    tokens, segments, lens = batch()
    X = tester.arrays(tokens, segments, lens)
    out = tester.numpy(net(X))
    assert out.shape == (3, 3)
    np.testing.assert_array_equal(tester.numpy(net(*X)), out)
    np.testing.assert_allclose(tester.logits(net, tokens, segments, lens), out, rtol=0, atol=1e-6)


# --- names, shapes and counts ------------------------------------------------------------------

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


@pytest.mark.parametrize("vocab_size", [1000, 1234])
def test_bert_small_names_shapes_and_counts_follow_the_book(tester, tmp_path, vocab_size):
    """bert.small's shape: 45 tensors (13 + 16 per layer) under the canonical names, in state_dict
    order (the book's table, written out), the book's counts (BERTModel 1,318,402 + 513 V; classifier 1,252,355 + 256 V, 39 tensors,
    no pretraining heads), float32 (d2l-bert-facts.md 1.4)."""
    cfg = BERTConfig(vocab_size=vocab_size)  # bert.small's sizes are the defaults
    bert = tester.bert(cfg)
    params = tester.saved_params(bert, tmp_path / "bert")
    assert [(k, v.shape) for k, v in params.items()] == bert_small_table(vocab_size)
    assert {k: v.shape for k, v in params.items()} == expected_shapes(cfg)
    assert all(v.dtype == np.float32 for v in params.values())
    assert sum(v.size for v in params.values()) == 1_318_402 + 513 * vocab_size
    classifier = tester.saved_params(tester.classifier(bert), tmp_path / "classifier", kind="classifier")
    assert list(classifier) == list(expected_shapes(cfg, "classifier")) and len(classifier) == 39
    assert not any(k.startswith(("mlm.", "nsp.")) for k in classifier)
    assert classifier["output.weight"].shape == (3, 256)
    assert sum(v.size for v in classifier.values()) == 1_252_355 + 256 * vocab_size
    for key in ("encoder.token_embedding.weight", "hidden.0.weight"):  # the classifier keeps the model's
        np.testing.assert_array_equal(classifier[key], params[key])


def test_from_config_builds_that_architecture_and_records_it(tester, tmp_path):
    cfg = BERTConfig(vocab_size=TINY.vocab_size, num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=3,
                     dropout=0.2, max_len=24)
    bert = tester.bert(cfg)
    assert bert.config == cfg
    assert tester.backend.BERTClassifier(bert).config == cfg
    params = tester.saved_params(bert, tmp_path / "bert")
    assert sum(k.endswith("attention.W_q.weight") for k in params) == 3


def test_the_positional_embedding_has_the_books_init(tester, tmp_path):
    """The torch book: `nn.Parameter(torch.randn(1, max_len, H))` (JAX follows it); 8192 draws: mean
    and std within ~5 standard errors of N(0, 1)'s. The MXNet book initialises with `init.Xavier()`:
    uniform within sqrt(3 / ((fan_in + fan_out) / 2)), fans 512 x 16 and 1 x 16 for (1, 512, 16)."""
    cfg = BERTConfig(vocab_size=TINY.vocab_size, num_hiddens=16, ffn_num_hiddens=32, num_heads=2, num_layers=1,
                     dropout=0.0, max_len=512)
    pos = tester.saved_params(tester.bert(cfg), tmp_path / "bert")["encoder.pos_embedding"]
    assert pos.shape == (1, 512, 16)
    if tester.name == "mxnet":
        bound = np.sqrt(3 / ((512 * 16 + 16) / 2))
        assert np.abs(pos).max() <= bound and np.abs(pos).max() > 0.9 * bound
    else:
        assert abs(pos.mean()) < 0.05 and abs(pos.std() - 1) < 0.04


def test_parameters_are_seeded(tester, tmp_path):
    # set_seed resets the generator parameters are drawn from: the same seed, the same arrays.
    a, b, c = (tester.params(tester.bert(seed=seed), tmp_path / f"{i}") for i, seed in enumerate((4, 4, 5)))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["nsp.output.weight"], c["nsp.output.weight"])


# --- the positional embedding's gradient ----------------------------------------------------------

def _pos_embedding_step(tester, tmp_path, detach: bool) -> np.ndarray:
    """How one Adam step (lr 1e-3) of a classifier on 3 rows of width 10 moves `pos_embedding`.
    A first Adam step moves an entry by lr * g / (|g| + eps): by about lr where the gradient is not
    0, not at all where it is."""
    net = tester.classifier(tester.bert(TINY, detach_pos_embedding=detach))
    before = tester.params(net, tmp_path / "before")["encoder.pos_embedding"]
    tokens, segments, lens = batch()
    tester.backend.train_batch_ch13(net, (tokens, segments, lens), np.array([0, 1, 2]), tester.backend.make_loss(),
                                    tester.backend.make_trainer(net, 1e-3), [tester.device])
    return tester.params(net, tmp_path / "after")["encoder.pos_embedding"] - before


def test_pos_embedding_is_trained(tester, tmp_path):
    moved = _pos_embedding_step(tester, tmp_path, detach=False)
    assert moved.shape == (1, TINY.max_len, TINY.num_hiddens)
    assert np.all(np.abs(moved[:, :10]).sum(-1) > 0)  # every used position (r0.17 torch's did not)
    assert np.all(moved[:, 10:] == 0)  # positions past the sequence length are unused


def test_detach_flag_reproduces_the_r017_bug(tester, tmp_path):
    # The parameter stays in the files either way (it is read above), so r0.17 files load into both.
    assert not _pos_embedding_step(tester, tmp_path, detach=True).any()


# --- forward -----------------------------------------------------------------------------------

def test_forward_shapes_as_the_book_prints_them(tester):
    bert = tester.bert()
    tokens, segments, lens = batch(B=2, T=8, valid_lens=(8, 5))
    encoded, mlm, nsp = tester.outputs(bert, tokens, segments, lens, np.array([[1, 5, 2], [6, 1, 5]], np.int32))
    assert encoded.shape == (2, 8, TINY.num_hiddens)
    assert mlm.shape == (2, 3, TINY.vocab_size)
    assert nsp.shape == (2, 2)
    logits = tester.logits(tester.classifier(bert, num_classes=4), tokens, segments, lens)
    assert logits.shape == (2, 4)


def test_longer_than_max_len_is_a_clear_error(tester):
    bert = tester.bert()
    tokens = np.zeros((1, TINY.max_len + 1), np.int32)
    with pytest.raises(ValueError, match=f"exceeds max_len {TINY.max_len}"):
        tester.outputs(bert, tokens, tokens, np.array([3], np.int32))


def test_int32_and_int64_indices_and_int_or_float_lengths_agree(tester):
    bert = tester.bert()
    tokens, segments, lens = batch()
    reference = tester.outputs(bert, tokens, segments, lens)[0]
    for converted in ((tokens.astype(np.int64), segments.astype(np.int64), lens.astype(np.float32)),
                      (tokens, segments, lens.astype(np.int64))):
        np.testing.assert_allclose(tester.outputs(bert, *converted)[0], reference, rtol=0, atol=1e-6)


def test_padding_does_not_change_valid_positions_or_classifier_logits(tester):
    """Every padded token and segment replaced: the valid positions and the logits are unchanged
    (masked keys get a score whose exp is 0). Dropout 0.1 in the model: the contract's evaluation
    calls must switch it off."""
    bert = tester.bert(BERTConfig(**{**TINY.to_dict(), "dropout": 0.1}))
    net = tester.classifier(bert)
    tokens, segments, lens = batch(B=3, T=10, valid_lens=(10, 6, 3))
    other, other_segments = tokens.copy(), segments.copy()
    for b, n in enumerate(lens):
        other[b, n:] = (tokens[b, n:] + 7) % TINY.vocab_size
        other_segments[b, n:] = 1 - segments[b, n:]
    assert not np.array_equal(other, tokens)
    first, second = tester.outputs(bert, tokens, segments, lens)[0], tester.outputs(bert, other, other_segments, lens)[0]
    for b, n in enumerate(lens):
        np.testing.assert_allclose(second[b, :n], first[b, :n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tester.logits(net, other, other_segments, lens), tester.logits(net, tokens, segments, lens),
                               rtol=1e-5, atol=1e-6)
