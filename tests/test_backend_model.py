"""The BERT model of every installed backend, through the contract's names only: the canonical
parameter names, shapes and counts (the book's formulas), config records, forward shapes, the
max_len error, index and length dtypes, padding invariance, the positional embedding's init.

One tiny-config tester (`BackendTester`) builds, runs and reads any backend's model; what one framework
alone has (its masked softmax, head layout, autograd, DataParallel, hybridize, the jit padding
ladder) stays in that framework's own file (tests/test_{torch,mxnet,jax}_model.py).
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

    def bert(self, cfg: BERTConfig = TINY, seed: int = 0):
        self.backend.set_seed(seed)
        bert = self.backend.BERTModel.from_config(cfg)
        self.backend.initialize_bert(bert, [self.device])
        return bert

    def classifier(self, bert, num_classes: int = 3):
        net = self.backend.BERTClassifier(bert, num_classes=num_classes)
        self.backend.initialize_classifier_head(net, [self.device])
        return net

    def outputs(self, bert, tokens, segments, valid_lens, positions=None) -> tuple:
        if positions is None:
            positions = np.zeros((len(tokens), 1), np.int32)
        return self.backend.bert_outputs(bert, tokens, segments, valid_lens, positions, self.device)

    def logits(self, net, tokens, segments, valid_lens) -> np.ndarray:
        return self.backend.classifier_logits(net, tokens, segments, valid_lens, self.device)

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
