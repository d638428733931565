"""Cross-framework parity of training, PyTorch against JAX: gradients through each framework's own
autograd (jax.grad), one optimizer step (torch's summed gradient against the JAX book's mean, read
back from optax's first moment), a step on a batch the JAX step pads to a compiled shape. The forward
passes, classifier logits, convert round trips and a short fine-tune of every pair of backends are
tests/test_backend_parity.py's; the shapes and inputs are its own (imported, so the files cannot
drift), the gradient and step bounds tests/test_torch_mxnet_gradient_parity.py's.

Float32 on the CPU is never bit-equal across libraries (GEMM kernels, summation orders, softmax
and LayerNorm), so every comparison states its tolerance and the figure measured here (jax 0.4.23,
flax 0.8.4, optax 0.2.1, torch 2.13, numpy 1.23.5, 2-core CPU).
"""
from __future__ import annotations

import copy
import math

import numpy as onp
import pytest

from needs import require_backend

require_backend("torch")
require_backend("jax")
import torch  # noqa: E402
import jax  # noqa: E402
import optax  # noqa: E402

import nlibert.backends.jax as jb  # noqa: E402
from nlibert.backends.jax.checkpoint import _flatten as flatten_tree  # noqa: E402
import nlibert.backends.torch as tb  # noqa: E402
from nlibert import jobs  # noqa: E402
from nlibert.backends.torch.train import train_batch_ch13 as torch_train_batch  # noqa: E402
# tests/ is on sys.path (rootdir conftest, prepend import mode): the shapes, inputs and sample data
# are shared, not copied.
from test_backend_parity import (GRAD_BATCH_LENS, SHAPES, _inputs, _sample_classifier_data, _vocab,  # noqa: E402
                                 torch_pretraining_backward)

CPU_T, CPU_J = torch.device("cpu"), jb.parse_devices("cpu")[0]


def _flatten(tree):
    """A JAX parameter (or gradient) tree as {canonical name: float64 numpy array}."""
    return {k: onp.asarray(v, onp.float64) for k, v in flatten_tree(tree).items()}


def _load_jax(folder):
    return jb.load_pretrained_model(str(folder), devices=[CPU_J])[0]


# ----------------------------------------------------------------------------------------------
# Gradients and one optimizer step (dropout 0: every framework computes the same
# deterministic function in training mode)


def _classifier_pair(folder, shape, seed):
    """A torch BERTClassifier with dropout 0 and the same weights (output layer included) in JAX."""
    V, H, F, heads, layers, max_len = shape
    torch.manual_seed(seed)
    net_t = tb.BERTClassifier(tb.BERTModel(V, H, F, heads, layers, 0.0, max_len))
    tb.save_classifier(net_t, _vocab(V), None, folder / "torch")
    jobs.run_convert(str(folder / "torch"), str(folder / "jax"), to="jax")
    net_j, _, _ = jb.load_classifier(str(folder / "jax"), [CPU_J])
    return net_t, net_j


def _summed_loss_gradient(net_j, tokens, segments, valid_lens, labels):
    """JAX's gradient of the summed per-example loss (the torch book's l.sum()) over the parameters,
    in training mode (dropout is 0 here: the key only satisfies the signature), compiled."""
    def summed_loss(params):
        logits = net_j.apply(params, tokens, segments, valid_lens.astype(onp.float32), training=True,
                             rngs={"dropout": jax.random.PRNGKey(0)})
        return jb.make_loss()(logits, labels).sum()
    return _flatten(jax.jit(jax.grad(summed_loss))(net_j.params))


def _check_gradients(grads_t, grads_j):
    """test_gradient_parity_classifier's rule, per parameter: max |g_torch - g_jax| <= 1e-4 * max(max
    |g_torch|, 1e-3 * G), G the largest gradient entry of the whole net (returned)."""
    assert sorted(grads_j) == sorted(grads_t)
    G = max(onp.abs(g).max() for g in grads_t.values())
    for name, gt in grads_t.items():
        gj = grads_j[name]
        assert gt.shape == gj.shape, name
        scale = max(onp.abs(gt).max(), 1e-3 * G)
        diff = onp.abs(gt - gj).max()
        assert diff <= 1e-4 * scale, f"{name}: max |diff| {diff:.3e}, gradient scale {scale:.3e}"
    return G


def test_gradient_parity_classifier(tmp_path):
    """Gradients of every classifier parameter after one backward pass of the summed loss (bert.small
    sizes, B 8, T 64, lengths 1 .. 64): JAX's jax.grad vs torch's backward.

    Tolerance, per parameter, test_torch_mxnet_gradient_parity's: max |g_torch - g_jax| <= 1e-4 * max(max |g_torch|, 1e-3 * G),
    G the largest gradient entry of the net (1.9 here). Measured: <= 1.1e-6 of each parameter's own
    scale (torch vs JAX agree ~10x closer than torch vs MXNet's 1.1e-5), 1.8e-6 of the floor on
    W_k.bias; so >= 50x margin. The floor 1e-3 * G is for the attention `W_k.bias`, whose true
    gradient is exactly 0 (q . b_k is the same for every key, and the softmax ignores a constant
    shift): both give float noise (measured <= 1.9e-9 * G), checked to be ~0 instead.
    `pos_embedding` rows beyond the batch width (64 of max_len 512) get exactly 0 in both.
    """
    net_t, net_j = _classifier_pair(tmp_path, SHAPES["bert.small"], seed=0)
    ids, segments, valid_lens, _ = _inputs(SHAPES["bert.small"][0], 64, GRAD_BATCH_LENS, seed=0)
    labels = onp.random.default_rng(0).integers(0, 3, size=len(valid_lens))
    net_t.train()
    tb.make_loss()(net_t(tuple(torch.as_tensor(a) for a in (ids, segments, valid_lens))),
                   torch.as_tensor(labels)).sum().backward()
    grads_t = {k: p.grad.numpy().astype(onp.float64) for k, p in net_t.named_parameters()}
    grads_j = _summed_loss_gradient(net_j, ids, segments, valid_lens, labels)
    assert len(grads_j) == len(grads_t) == 39  # 7 + 16 per layer tensors for 2 layers
    G = _check_gradients(grads_t, grads_j)
    assert G > 0.1
    for name, gt in grads_t.items():
        if name.endswith("W_k.bias"):
            assert onp.abs(gt).max() <= 1e-6 * G and onp.abs(grads_j[name]).max() <= 1e-6 * G, name
        elif name != "encoder.pos_embedding":
            assert onp.abs(grads_j[name]).max() >= 1e-4 * G, f"{name}: no gradient reached it"
    gt, gj = grads_t["encoder.pos_embedding"], grads_j["encoder.pos_embedding"]
    assert not gt[:, 64:].any() and not gj[:, 64:].any() and gj[:, :64].any()


def test_gradient_parity_pretraining_heads(tmp_path):
    """All 13 + 16 L tensors of a BERTModel under the MLM + NSP losses (summed), which covers the
    MaskLM gather and both heads, on the tiny shape (compiling the odd one's 3 layers takes ~7 s,
    tiny's ~2.5 s). Same tolerance rule as above; measured <= 3.9e-7 of each parameter's scale, 6.2e-6
    of the floor on W_k.bias (its gradient <= 4.5e-9 G, G 6.7 here): >= 16x margin."""
    V, H, F, heads, layers, max_len = SHAPES["tiny"]
    torch.manual_seed(5)
    bert_t = tb.BERTModel(V, H, F, heads, layers, 0.0, max_len)
    tb.save_pretrained(bert_t, _vocab(V), tmp_path / "torch")
    jobs.run_convert(str(tmp_path / "torch"), str(tmp_path / "jax"), to="jax")
    bert_j = _load_jax(tmp_path / "jax")
    ids, segments, valid_lens, positions = _inputs(V, max_len, [max_len, 1, 20, 7, max_len, 2], seed=2)
    rng = onp.random.default_rng(2)
    mlm_labels, nsp_labels = rng.integers(0, V, size=positions.shape), rng.integers(0, 2, size=len(ids))

    torch_pretraining_backward(bert_t, ids, segments, valid_lens, positions, mlm_labels, nsp_labels)
    grads_t = {k: p.grad.numpy().astype(onp.float64) for k, p in bert_t.named_parameters()}

    def total(params):
        _, mlm, nsp = bert_j.apply(params, ids, segments, valid_lens.astype(onp.float32), positions,
                                   training=True, rngs={"dropout": jax.random.PRNGKey(0)})
        return (optax.softmax_cross_entropy_with_integer_labels(mlm.reshape(-1, V), mlm_labels.reshape(-1)).sum()
                + optax.softmax_cross_entropy_with_integer_labels(nsp, nsp_labels).sum())
    grads_j = _flatten(jax.jit(jax.grad(total))(bert_j.params))
    assert len(grads_j) == len(grads_t) == 13 + 16 * layers
    G = _check_gradients(grads_t, grads_j)
    for name, gt in grads_t.items():
        if name.endswith("W_k.bias"):
            assert onp.abs(gt).max() <= 1e-6 * G and onp.abs(grads_j[name]).max() <= 1e-6 * G, name
        else:
            assert onp.abs(grads_j[name]).max() >= 1e-4 * G, f"{name}: no gradient reached it"


# The classifier sizes (after V) of the one-step test: test_backend_parity's short fine-tune's, H 64,
# F 128, 2 heads, 2 layers, max_len 64, batch 32, T 64.
STEP_SIZES, STEP_BATCH = (64, 128, 2, 2, 64), 32


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    """(SNLIBERTDataset at max_len 64, its vocabulary) of the generated SNLI sample (test_backend_parity's)."""
    return _sample_classifier_data(tmp_path_factory.mktemp("jax-parity-data"), max_len=64)


def _first_step_bound(p, g_t, g_j, lr, eps):
    """(bound on |dp_torch - dp_jax| per element, ulp(p)) for a first Adam step from `p` with mean
    gradients g_t, g_j and eps on the mean scale: test_one_adam_step_parity derives it."""
    ulp = onp.spacing(onp.abs(p).astype(onp.float32) + onp.float32(2 * lr)).astype(onp.float64)
    return (lr * onp.minimum(2, 2 * onp.abs(g_t - g_j) / (onp.maximum(onp.abs(g_t), onp.abs(g_j)) + eps))
            + 2 * ulp + 1e-6 * lr), ulp


def _adam_gradients(trainer_j):
    """The mean gradient the JAX trainer's first step used, from optax's first moment (mu = 0.1f * g)."""
    adam_state = trainer_j.state.inner_state[0]
    assert int(adam_state.count) == 1
    return {k: v / onp.float64(onp.float32(0.1)) for k, v in _flatten(adam_state.mu).items()}


def test_one_adam_step_parity(tmp_path, sample_data):
    """Parameters after one training step: jb.train_batch_ch13 with the book's make_trainer (optax.adam)
    vs torch Adam through torch's own train_batch_ch13, at the shared fine-tune test's sizes (STEP_SIZES,
    V 169, B 32, T 64, lengths 1 .. 64).

    How the two differ:
    1. Gradient scale. torch sums the per-example losses (`l.sum().backward()`): its gradient is a sum
       over the batch. The JAX step differentiates the mean (the JAX book's `.mean()`), as MXNet's
       `Trainer.step(batch_size)` does.
    2. eps. optax.adam is torch's formula, p -= lr * m_hat / (sqrt(v_hat) + eps), eps 1e-8 added to
       the bias-corrected sqrt (not to the raw sqrt(v) as MXNet's kernel does), but on the *mean*
       gradient. On the first step m_hat = g and v_hat = g^2, so both reduce to p -= lr * g / (|g| + eps)
       with their own g. torch with eps = B * 1e-8 on its summed gradient is then exactly the JAX step:
       g_sum / (|g_sum| + B eps) = g / (|g| + eps), and multiplying by B = 8 is exact in float.
    3. No residue beyond rounding (unlike MXNet's float32 (1 - beta2)): with g = 1 optax steps by
       lr (1 - 2.5e-8) (1e-4 as a float32) and torch by lr (1 - 9.8e-8) (measured); a 1e-6 * lr term
       allows for it.

    Tolerance per element, test_torch_mxnet_gradient_parity's bound with eps' = 1e-8 (JAX's, on the mean scale):
    |dp_torch - dp_jax| <= lr * min(2, 2 |g_t - g_j| / (max(|g_t|, |g_j|) + eps')) + 2 ulp(p) + 1e-6 lr.
    The first term is the exact bound on |f(g_t) - f(g_j)| for f(g) = g / (|g| + eps'): it carries the
    gradient disagreement (~1e-6 relative, see the gradient test) through the step and matters only
    where |g| is near eps' or the two gradients differ in sign; 2 ulp(p) is the float32 rounding of
    the two updated parameters. g_j must be the gradient the JAX step used, so it is read back from
    optax's first moment (mu = 0.1f * g, one rounding): on bert.small a separately compiled jax.grad
    differed from it by up to 2.2e-7 G, far more than W_k.bias's whole gradient. Measured (G 0.086):
    gradients within 1.0e-6 of each parameter's scale (2.4e-6 of the floor on W_k.bias); the largest
    |dp_torch - dp_jax| / bound is 0.50 (on W_k.bias; without the 1e-6 lr term every entry is still
    inside), the largest |dp_torch - dp_jax| 2.0e-6 (0.02 lr), on W_k.bias. (bert.small, B 8: 0.50 and
    0.12 lr on small-gradient W_o.weight entries, the same conclusions.)

    Near-zero gradients: W_k.bias's true gradient is 0 and each framework's is float noise (<= 3.4e-9 G
    on the mean scale), so Adam moves it by lr * noise / eps' (measured 0.028 lr in JAX, 0.015 lr in
    torch; bert.small 0.036 and 0.032; asserted <= 0.1 lr). The book's torch setting (eps 1e-8 on the
    summed gradient, eps' = 3.1e-10 on the mean scale at B 32) moves W_k.bias by up to 0.33 lr and
    breaks the bound on 2.3e4 entries with small gradients: checked, so the eps scaling is needed.
    Every other dense weight moves by about lr (median >= 0.9998 lr measured, > 0.9 lr asserted).
    """
    lr, eps = 1e-4, 1e-8
    dataset, vocab = sample_data
    net_t, net_j = _classifier_pair(tmp_path, (len(vocab), *STEP_SIZES), seed=1)
    lens = (GRAD_BATCH_LENS * STEP_BATCH)[:STEP_BATCH]  # 1 .. 64, as the gradient test
    ids, segments, valid_lens, _ = _inputs(len(vocab), 64, lens, seed=1)
    X, y = (ids, segments, valid_lens), onp.random.default_rng(1).integers(0, 3, size=len(valid_lens))
    B = len(y)
    before = {k: p.detach().numpy().astype(onp.float64) for k, p in net_t.named_parameters()}
    flat_j = _flatten(net_j.params)
    assert sorted(flat_j) == sorted(before)
    for k in before:
        assert onp.array_equal(before[k], flat_j[k]), k
    naive = copy.deepcopy(net_t)

    trainer_j = jb.make_trainer(net_j, lr)
    assert math.isclose(trainer_j.learning_rate, lr, rel_tol=1e-7)
    jb.train_batch_ch13(net_j, X, y, jb.make_loss(), trainer_j, [CPU_J])
    torch_train_batch(net_t, X, y, tb.make_loss(), torch.optim.Adam(net_t.parameters(), lr=lr, eps=B * eps),
                      [CPU_T])
    book_trainer = tb.make_trainer(naive, lr)
    assert book_trainer.defaults["eps"] == 1e-8
    torch_train_batch(naive, X, y, tb.make_loss(), book_trainer, [CPU_T])  # the book's eps
    after_j = _flatten(net_j.params)
    grads_j = _adam_gradients(trainer_j)
    grads_t = {k: p.grad.numpy().astype(onp.float64) / B for k, p in net_t.named_parameters()}
    _check_gradients(grads_t, grads_j)  # the premise of the bound: the gradient test's agreement

    naive_breaks = 0
    for (k, p), p_naive in zip(net_t.named_parameters(), naive.parameters()):
        d_t = p.detach().numpy().astype(onp.float64) - before[k]
        d_j = after_j[k] - before[k]
        d_naive = p_naive.detach().numpy().astype(onp.float64) - before[k]
        g_t, g_j = grads_t[k], grads_j[k]
        tol, ulp = _first_step_bound(before[k], g_t, g_j, lr, eps)
        excess = onp.abs(d_t - d_j) - tol
        assert excess.max() <= 0, (f"{k}: |dp_torch - dp_jax| exceeds its bound by {excess.max():.3e} "
                                   f"at {onp.unravel_index(excess.argmax(), excess.shape)}")
        # A first Adam step moves no entry by more than lr, and entries without gradient not at all.
        assert onp.abs(d_j).max() <= lr * (1 + 1e-6) + 2 * ulp.max(), k
        assert not d_t[g_t == 0].any() and not d_j[g_j == 0].any(), k
        naive_breaks += int((onp.abs(d_naive - d_j) > tol).sum())
        if k.endswith("W_k.bias"):
            assert onp.abs(d_t).max() <= 0.1 * lr and onp.abs(d_j).max() <= 0.1 * lr, k
        elif k != "encoder.pos_embedding" and k != "encoder.token_embedding.weight":
            # Every entry of a dense weight has a gradient >> eps': it moves by about lr.
            assert onp.median(onp.abs(d_j)) > 0.9 * lr, k
    assert naive_breaks > 0, "torch's default eps on the summed gradient should not match the JAX step"


def test_one_step_on_a_padded_batch_parity(tmp_path):
    """The JAX step pads a batch to a compiled shape (here 5 rows of width 20 to 32 x 24: `_MIN_ROWS`, `_padded_size`)
    with weight-0 rows and masked columns: the loss sum, the gradient (divided by the 5 real rows) and
    the updated parameters are torch's on the unpadded batch (tiny shape, torch eps = B * 1e-8 as in
    the one-step test). Measured: loss sums 6e-8 apart (atol 1e-5); gradients <= 6.5e-6 of each
    parameter's scale (the gradient tests' rule); every step inside test_one_adam_step_parity's bound."""
    lr, eps = 1e-4, 1e-8
    net_t, net_j = _classifier_pair(tmp_path, SHAPES["tiny"], seed=3)
    ids, segments, valid_lens, _ = _inputs(SHAPES["tiny"][0], 20, [20, 1, 7, 13, 19], seed=3)
    X, y = (ids, segments, valid_lens), onp.array([0, 1, 2, 1, 0])
    B = len(y)
    before = _flatten(net_j.params)
    trainer_j = jb.make_trainer(net_j, lr)
    loss_j, correct_j = jb.train_batch_ch13(net_j, X, y, jb.make_loss(), trainer_j, [CPU_J])
    loss_t, correct_t = torch_train_batch(net_t, X, y, tb.make_loss(),
                                          torch.optim.Adam(net_t.parameters(), lr=lr, eps=B * eps), [CPU_T])
    assert correct_j == correct_t and abs(loss_j - loss_t) <= 1e-5
    grads_j = _adam_gradients(trainer_j)
    grads_t = {k: p.grad.numpy().astype(onp.float64) / B for k, p in net_t.named_parameters()}
    _check_gradients(grads_t, grads_j)
    after_j = _flatten(net_j.params)
    for k, p in net_t.named_parameters():
        tol, _ = _first_step_bound(before[k], grads_t[k], grads_j[k], lr, eps)
        excess = onp.abs((p.detach().numpy().astype(onp.float64) - before[k]) - (after_j[k] - before[k])) - tol
        assert excess.max() <= 0, f"{k}: |dp_torch - dp_jax| exceeds its bound by {excess.max():.3e}"
