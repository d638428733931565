"""Cross-framework parity for every pair of installed backends, through the contract's names only:
the same weights give the same numbers in each.

Every checkpoint here is built in one backend, written in its own format, converted with
`jobs.run_convert` (names only: core/names.py) and loaded into each other backend, so these tests
cover the models, the key map, the converter and the loaders together; `convert` there and back is
bit exact. Gradients, an optimizer step and a short fine-tune, compared through each framework's own
autograd and optimizer, are tests/test_torch_{mxnet,jax}_gradient_parity.py.

Float32 on the CPU never gives bit-equal results across two libraries (different GEMM kernels,
summation orders, softmax and LayerNorm implementations), so every comparison states its tolerance
and the figure measured here (mxnet 1.9.1, torch 2.13, jax 0.4.23, numpy 1.23.5, 2-core CPU).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from nlibert import jobs
from nlibert.backends import BACKENDS, installed_backends, load_backend
from nlibert.core.batching import BatchIterator
from nlibert.core.names import expected_shapes, to_canonical
from nlibert.core.packing import SNLIBERTDataset
from nlibert.core.sample import write_sample_snli
from nlibert.core.snli import read_snli_file
from nlibert.core.vocab import RESERVED_TOKENS, Vocab, tokenize

from needs import other_backends, require_backend

# Forward tolerance: max |a - b| <= 1e-5 on every output, every position (pads included). The
# outputs are O(1) (LayerNorm'd states, logits of N(0, 1)-scale inputs), so 1e-5 is ~80 float32 ulps
# of 1.0. Measured max |source - converted| (encoded_X, mlm_Y_hat, nsp_Y_hat) over both batches, the
# worst over the three shapes, always bert.small's but for the last figure: torch -> mxnet 1.9e-6,
# 2.1e-6, 1.2e-7; torch -> jax 1.4e-6, 1.5e-6, 3.6e-7; mxnet -> torch 2.9e-6, 3.6e-6, 1.5e-6;
# mxnet -> jax 2.6e-6, 4.2e-6, 9.5e-7; jax -> torch 1.5e-6, 1.4e-6, 1.6e-7; jax -> mxnet 1.8e-6,
# 2.4e-6, 2.2e-7 (tiny: <= 8.3e-7; odd: <= 1.6e-6). So >= 2.4x margin, mostly >= 4x.
# mlm_Y_hat's figure is a max over B * P * V logits, so it grows with V: `nlibert parity` on a
# bert.small-shaped checkpoint with the book's V = 20256 and SNLI dev inputs measured mlm_Y_hat
# 5.2e-6 torch vs mxnet (encoded_X 2.4e-6, nsp_Y_hat 5.1e-7), still 2x inside 1e-5.
FORWARD_ATOL = 1e-5

# name: (V, H, F, heads, layers, max_len)
SHAPES = {
    "bert.small": (500, 256, 512, 4, 2, 512),  # the chapter's sizes, with a small vocabulary for speed
    "tiny": (50, 16, 32, 2, 1, 32),
    "odd": (300, 48, 96, 3, 3, 100),  # 16-dim heads, an odd layer count
}
GRAD_BATCH_LENS = [64, 1, 40, 17, 3, 64, 50, 9]  # B = 8, T = 64: includes 1 and the full length
PAIRS = [(a, b) for a in BACKENDS for b in BACKENDS if a != b]  # ordered: source, then where it goes


def _vocab(size: int) -> Vocab:
    """`<unk>`, the chapter's reserved tokens, then dummy words: a vocabulary of exactly `size` tokens."""
    return Vocab.from_idx_to_token(["<unk>"] + RESERVED_TOKENS + [f"w{i}" for i in range(size - 5)])


def _inputs(vocab_size: int, seq_len: int, valid_lens, seed: int, num_preds: int = 4):
    """A packed batch as the chapter builds it: `<cls>` first, segment 0 then segment 1 inside the valid
    length, `<pad>` (1) and segment 0 beyond it; MLM positions drawn inside each valid length."""
    rng = np.random.default_rng(seed)
    valid_lens = np.asarray(valid_lens, dtype=np.int32)
    B = len(valid_lens)
    ids = rng.integers(5, vocab_size, size=(B, seq_len)).astype(np.int32)
    segments = np.zeros((B, seq_len), np.int32)
    ids[:, 0] = 3  # <cls>
    for b, n in enumerate(valid_lens):
        segments[b, max(1, (n + 1) // 2):n] = 1  # both segment ids once n >= 3
        ids[b, n:] = 1  # <pad>
    pred_positions = (rng.random((B, num_preds)) * valid_lens[:, None]).astype(np.int32)
    return ids, segments, valid_lens, pred_positions


def _batches(max_len: int):
    """Batch size 1 at the full length, and a batch of 5 whose valid lengths include 1 and max_len."""
    return {"batch1": [max_len], "batch5": [max_len, 1, 2, max_len // 2 + 1, max_len - 1]}


def torch_pretraining_backward(bert, ids, segments, valid_lens, positions, mlm_labels, nsp_labels) -> None:
    """The gradient-parity files' torch reference: the summed MLM and NSP cross-entropy of `bert` (a
    torch BERTModel, put in train mode) on numpy inputs, differentiated into its parameters' `.grad`."""
    import torch
    bert.train()
    _, mlm, nsp = bert(*(torch.as_tensor(a) for a in (ids, segments, valid_lens, positions)))
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    (ce(mlm.reshape(-1, mlm.shape[-1]), torch.as_tensor(mlm_labels).reshape(-1)).sum()
     + ce(nsp, torch.as_tensor(nsp_labels)).sum()).backward()


def _sample_classifier_data(folder, max_len):
    """The generated SNLI sample's training split as the chapter's dataset, and its vocabulary (the
    training parity files' fine-tunes)."""
    data_dir = write_sample_snli(folder, num_train=400, num_test=10, seed=0)
    train = read_snli_file(f"{data_dir}/snli_1.0_train.txt")
    vocab = Vocab(tokenize([s.lower() for s in train[0] + train[1]]), min_freq=1,
                  reserved_tokens=RESERVED_TOKENS)
    return SNLIBERTDataset(train, max_len, vocab), vocab


def _assert_outputs_close(out_a, out_b, atol=FORWARD_ATOL):
    for name, a, b in zip(("encoded_X", "mlm_Y_hat", "nsp_Y_hat"), out_a, out_b):
        assert a.shape == b.shape, name
        assert np.isfinite(a).all() and np.isfinite(b).all(), name
        np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=name)


def _cpu(name):
    return load_backend(name).parse_devices("cpu")[0]


def _build(name, shape, seed, kind="pretrained", dropout=0.1):
    """A model of `shape` built in backend `name` (its own init; dropout 0.1: every evaluation must
    switch it off), or its classifier."""
    backend = load_backend(name)
    V, H, F, heads, layers, max_len = shape
    backend.set_seed(seed)
    bert = backend.BERTModel(V, H, F, heads, layers, dropout, max_len)
    backend.initialize_bert(bert, [_cpu(name)])
    if kind == "pretrained":
        return bert
    net = backend.BERTClassifier(bert)
    backend.initialize_classifier_head(net, [_cpu(name)])
    return net


@pytest.fixture(scope="module", params=[(source, shape) for source in BACKENDS for shape in SHAPES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def converted(request, tmp_path_factory):
    """(source, shape name, {backend: BERTModel}): a model built in `source`, save_pretrained ->
    run_convert(to=each other installed backend) -> its load_pretrained_model, sizes read off."""
    source, shape = request.param
    require_backend(source)
    other_backends(source)
    folder = tmp_path_factory.mktemp(f"parity-{source}-{shape}")
    V = SHAPES[shape][0]
    models = {source: _build(source, SHAPES[shape], seed=sum(map(ord, shape)))}
    load_backend(source).save_pretrained(models[source], _vocab(V), folder / source)
    for name in installed_backends():
        if name != source:
            jobs.run_convert(str(folder / source), str(folder / name), to=name)
            models[name], vocab = load_backend(name).load_pretrained_model(
                str(folder / name), devices=[_cpu(name)])
            assert len(vocab) == V and models[name].config == models[source].config  # sizes and heads read back
    return source, shape, models


@pytest.mark.parametrize("batch", ["batch1", "batch5"])
def test_forward_parity_of_a_converted_checkpoint(converted, batch):
    """Every other backend's (encoded_X, mlm_Y_hat, nsp_Y_hat) on the converted checkpoint are the
    source backend's within FORWARD_ATOL at every position, pads included, with valid lengths 1 ..
    max_len."""
    source, shape, models = converted
    V, H, _, _, _, max_len = SHAPES[shape]
    x = _inputs(V, max_len, _batches(max_len)[batch], seed=len(batch))
    expected = load_backend(source).bert_outputs(models[source], *x, _cpu(source))
    assert expected[0].shape == (len(x[2]), max_len, H)
    assert expected[1].shape == (len(x[2]), 4, V) and expected[2].shape == (len(x[2]), 2)
    for name, bert in models.items():
        if name != source:
            _assert_outputs_close(load_backend(name).bert_outputs(bert, *x, _cpu(name)), expected)


@pytest.mark.parametrize("shape", ["tiny", "odd"])
@pytest.mark.parametrize("source", BACKENDS)
def test_classifier_logits_parity(tmp_path, source, shape):
    """save_classifier (source) -> run_convert -> load_classifier (each other backend): the same logits
    within FORWARD_ATOL. Measured <= 2e-7 torch vs mxnet, <= 1.3e-7 torch vs jax, 1.2e-7 mxnet vs jax
    (logits of a Linear on tanh outputs, |logit| < 1)."""
    require_backend(source)
    others = other_backends(source)
    V, _, _, _, _, max_len = SHAPES[shape]
    net = _build(source, SHAPES[shape], seed=11, kind="classifier")
    load_backend(source).save_classifier(net, _vocab(V), None, tmp_path / source)
    ids, segments, valid_lens, _ = _inputs(V, max_len, _batches(max_len)["batch5"], seed=5)
    expected = load_backend(source).classifier_logits(net, ids, segments, valid_lens, _cpu(source))
    assert expected.shape == (5, 3)
    for name in others:
        jobs.run_convert(str(tmp_path / source), str(tmp_path / name), to=name)
        loaded, _, config = load_backend(name).load_classifier(str(tmp_path / name), [_cpu(name)])
        assert config == net.config
        np.testing.assert_allclose(load_backend(name).classifier_logits(loaded, ids, segments, valid_lens, _cpu(name)),
                                   expected, rtol=0, atol=FORWARD_ATOL)


@pytest.mark.parametrize("kind", ["pretrained", "classifier"])
@pytest.mark.parametrize("source,to", PAIRS)
def test_convert_there_and_back_is_bit_exact(tmp_path, source, to, kind):
    """run_convert source -> to -> source gives back the same names, in the same (state_dict) order,
    and the same arrays bit for bit (same dtype); the file in between holds them too, and the
    vocabulary and config come back unchanged."""
    model = _build(source, SHAPES["tiny"], seed=4, kind=kind)
    backend, V = load_backend(source), SHAPES["tiny"][0]
    if kind == "pretrained":
        backend.save_pretrained(model, _vocab(V), tmp_path / "first")
    else:
        backend.save_classifier(model, _vocab(V), None, tmp_path / "first")
    jobs.run_convert(str(tmp_path / "first"), str(tmp_path / "middle"), to=to)
    jobs.run_convert(str(tmp_path / "middle"), str(tmp_path / "back"), to=source)
    file = f"{kind}.params"
    original, back = backend.read_params(tmp_path / "first" / file), backend.read_params(tmp_path / "back" / file)
    middle = load_backend(to).read_params(tmp_path / "middle" / file)
    assert list(to_canonical(original, source)) == list(expected_shapes(model.config, kind))
    assert list(back) == list(original) and list(to_canonical(middle, to)) == list(to_canonical(original, source))
    middle = to_canonical(middle, to)
    for name, a in to_canonical(original, source).items():
        b = to_canonical(back, source)[name]
        assert a.dtype == b.dtype == np.float32, name
        assert np.array_equal(a, b) and np.array_equal(a, np.asarray(middle[name])), name
    assert (tmp_path / "back" / "vocab.json").read_bytes() == (tmp_path / "first" / "vocab.json").read_bytes()
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("first", "middle", "back")]
    assert configs[0] == configs[2] and configs[1] == {**configs[0], "format": to}


# |mean loss_a - mean loss_b| at every step of the short fine-tune below, per pair: the optimizers
# differ in their Adam eps semantics on small-gradient entries (torch: eps 1e-8 on the summed
# gradient; JAX: on the mean; MXNet: added to the uncorrected sqrt(v), folded into lr), and the gap
# can grow with the steps. Measured (steps 0-7, H 64, 2 heads, 2 layers, batch 32, T 64): torch vs
# mxnet <= 3.2e-6 (the full bert.small sizes: 3.3e-5 by step 2), torch vs jax <= 2.8e-7, mxnet vs
# jax <= 1.9e-6: >= 15x margin.
FINETUNE_TOL = {frozenset({"torch", "mxnet"}): 5e-5, frozenset({"torch", "jax"}): 5e-6,
                frozenset({"mxnet", "jax"}): 5e-5}


def _mean_cross_entropy(logits, labels) -> float:
    logits = logits.astype(np.float64)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


@pytest.mark.parametrize("first,second", [(a, b) for i, a in enumerate(BACKENDS) for b in BACKENDS[i + 1:]])
def test_short_finetune_per_step_losses_agree(tmp_path, first, second):
    """8 steps of each backend's own train_batch_ch13 with the book's loss and optimizer (make_loss /
    make_trainer, lr 1e-4, the chapter's value), dropout 0, the same classifier weights (output
    layer included, built in `first` and converted) and the same batches (BatchIterator, same seed).
    Nothing is adjusted, so the runs differ by their Adam eps semantics plus float32 noise
    (FINETUNE_TOL). The test is sensitive: the untrained model's losses on the same batches differ
    from the trained ones by up to 2.3e-2 (checked below to exceed 10x the tolerance), so a step
    missing or going the wrong way in either backend fails it."""
    tol, steps, batch_size, lr = FINETUNE_TOL[frozenset({first, second})], 8, 32, 1e-4
    dataset, vocab = _sample_classifier_data(tmp_path / "data", max_len=64)
    net = _build(first, (len(vocab), 64, 128, 2, 2, 64), seed=2, kind="classifier", dropout=0.0)
    load_backend(first).save_classifier(net, vocab, None, tmp_path / first)
    jobs.run_convert(str(tmp_path / first), str(tmp_path / second), to=second)
    nets = {first: net, second: load_backend(second).load_classifier(str(tmp_path / second), [_cpu(second)])[0]}
    untrained = load_backend(first).load_classifier(str(tmp_path / first), [_cpu(first)])[0]
    runs = {name: (load_backend(name), BatchIterator.from_dataset(dataset, batch_size, shuffle=True, seed=0),
                   load_backend(name).make_loss(), load_backend(name).make_trainer(nets[name], lr))
            for name in (first, second)}
    diffs, moved = [], []
    for step, (a, b) in enumerate(zip(*(iter(run[1]) for run in runs.values()))):
        if step == steps:
            break
        assert all(np.array_equal(x, y) for x, y in zip(a[0] + (a[1],), b[0] + (b[1],)))
        (X, y), losses = a, []
        for name, (backend, _, loss, trainer) in runs.items():
            losses.append(backend.train_batch_ch13(nets[name], X, y, loss, trainer, [_cpu(name)])[0] / len(y))
        diffs.append(abs(losses[0] - losses[1]))
        untrained_logits = load_backend(first).classifier_logits(untrained, *X, _cpu(first))
        moved.append(abs(_mean_cross_entropy(untrained_logits, y) - losses[0]))
    assert len(diffs) == steps
    assert max(diffs) <= tol, f"per-step |loss_{first} - loss_{second}|: {['%.2e' % d for d in diffs]}"
    assert moved[0] < 1e-5  # step 0's loss is computed before any update
    assert max(moved) > 10 * tol, f"training moved the loss by only {max(moved):.2e}"
