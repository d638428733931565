"""The PyTorch fast path computes what the book path computes: fused attention, trimmed and bucketed
batches, the device-side training loop."""
import re

import numpy as np
import pytest
from needs import require_backend

require_backend("torch")
import torch  # noqa: E402
from torch import nn  # noqa: E402

from nlibert.backends.torch import (BERTClassifier, BERTModel, evaluate_accuracy, set_fused_attention, train_ch13,  # noqa: E402
                                    train_fast)
from nlibert.backends.torch.model import MultiHeadAttention  # noqa: E402
from nlibert.backends.torch.train import FinetuneStep, train_batch_ch13  # noqa: E402
from nlibert.core.batching import BatchIterator, bucket_batch_indices  # noqa: E402

torch.set_num_threads(1)  # tests run two workers on shared cores

V, H, FFN, HEADS, LAYERS, MAX_LEN = 60, 32, 64, 4, 2, 40
CPU = [torch.device("cpu")]


def tiny_classifier(dropout=0.0, fused=False, seed=0, cls_only=None):
    """`fused` alone means the whole fast model: fused attention and the last block at <cls> only."""
    torch.manual_seed(seed)
    bert = BERTModel(V, H, FFN, HEADS, LAYERS, dropout, MAX_LEN, fused_attention=fused)
    return BERTClassifier(bert, cls_only=fused if cls_only is None else cls_only)


def packed_batch(n=24, T=20, seed=0):
    """Packed rows: <cls> tokens <sep> tokens <sep>, then <pad> (1) up to T; lengths 3..T."""
    rng = np.random.default_rng(seed)
    valid_lens = rng.integers(3, T + 1, n).astype(np.int32)
    valid_lens[0] = T  # one row uses the full width
    columns = np.arange(T)
    ids = np.where(columns < valid_lens[:, None], rng.integers(5, V, (n, T)), 1).astype(np.int32)
    ids[:, 0] = 2
    split = np.maximum(valid_lens // 2, 2)
    segments = ((columns >= split[:, None]) & (columns < valid_lens[:, None])).astype(np.int32)
    labels = rng.integers(0, 3, n).astype(np.int64)
    return (ids, segments, valid_lens), labels


def as_tensors(X):
    return tuple(torch.as_tensor(a) for a in X)


@pytest.mark.parametrize("lens", [torch.tensor([7, 4, 1]), torch.tensor([[1, 3, 7, 7, 2, 5, 6]] * 3), None])
def test_fused_attention_equals_the_book_attention(lens):
    torch.manual_seed(0)
    book = MultiHeadAttention(H, HEADS, dropout=0.0).eval()
    fused = MultiHeadAttention(H, HEADS, dropout=0.0, fused_attention=True).eval()
    fused.load_state_dict(book.state_dict())
    X = torch.randn(3, 7, H, requires_grad=True)
    expected = book(X, X, X, lens)
    got = fused(X, X, X, lens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and the gradients
    g_book = torch.autograd.grad(expected.square().sum(), [X, *book.parameters()])
    g_fused = torch.autograd.grad(got.square().sum(), [X, *fused.parameters()])
    for a, b in zip(g_fused, g_book):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_classifier_logits_equal_the_book_logits_and_the_switch_goes_both_ways():
    net = tiny_classifier().eval()
    X = as_tensors(packed_batch()[0])
    book = net(X)
    set_fused_attention(net, True)
    assert all(m.fused_attention for m in net.modules() if isinstance(m, MultiHeadAttention))
    fused = net(X)
    assert (fused - book).abs().max().item() <= 1e-5
    set_fused_attention(net, False)
    torch.testing.assert_close(net(X), book, rtol=0, atol=0)
    built_fused = tiny_classifier(fused=True).eval()
    torch.testing.assert_close(built_fused(X), fused, rtol=1e-6, atol=1e-6)


def test_fused_attention_drops_out_in_training_only():
    net = tiny_classifier(dropout=0.5, fused=True)
    X = as_tensors(packed_batch()[0])
    net.train()
    assert not torch.equal(net(X), net(X))
    net.eval()
    assert torch.equal(net(X), net(X))


@pytest.mark.parametrize("fused", [False, True])
def test_trimmed_and_bucketed_batches_give_the_padded_logits(fused):
    net = tiny_classifier(fused=fused).eval()
    (ids, segments, lens), labels = packed_batch(n=40, T=20)
    with torch.no_grad():
        padded = net(as_tensors((ids, segments, lens))).numpy()
    it = BatchIterator((ids, segments, lens), np.arange(40), 8, shuffle=True, seed=0,
                       sampler=bucket_batch_indices(lens, multiple=4), trim=True, pad_multiple=4)
    seen = []
    with torch.no_grad():
        for X, idx in it:
            assert X[0].shape[1] < 20 or lens[idx].max() > 16
            np.testing.assert_allclose(net(as_tensors(X)).numpy(), padded[idx], rtol=1e-5, atol=1e-5)
            seen += idx.tolist()
    assert sorted(seen) == list(range(40))


def test_a_fast_step_is_the_book_step():
    """Same loss sum, count and parameters after one step; FinetuneStep leaves its sums on the device."""
    (X, y) = packed_batch(n=16)
    results = []
    for fast in (False, True):
        net = tiny_classifier(fused=fast)
        trainer = torch.optim.SGD(net.parameters(), lr=0.1)
        loss = nn.CrossEntropyLoss(reduction="none")
        out = FinetuneStep(net, loss, trainer, CPU)(X, y) if fast else train_batch_ch13(net, X, y, loss, trainer, CPU)
        results.append((out, {k: v.detach().clone() for k, v in net.state_dict().items()}))
    (book_loss, book_correct), book_params = results[0]
    (fast_loss, fast_correct), fast_params = results[1]
    assert isinstance(fast_loss, torch.Tensor) and fast_loss.dim() == 0 and fast_correct.dim() == 0
    assert fast_loss.item() == pytest.approx(book_loss, rel=1e-5)
    assert fast_correct.item() == book_correct
    for k in book_params:
        torch.testing.assert_close(fast_params[k], book_params[k], rtol=1e-4, atol=1e-5)


def test_micro_batches_make_the_whole_batch_step():
    """--micro-batch: 16 rows as chunks of 5, 5, 5, 1, their gradients summed, give the loss, count
    and parameters of the whole batch at once (SGD, so a parameter moves by lr * gradient)."""
    (X, y) = packed_batch(n=16)
    results = []
    for micro_batch in (None, 5):
        net = tiny_classifier(fused=True)
        calls = []
        net.register_forward_hook(lambda module, inputs, output: calls.append(len(output)))
        trainer = torch.optim.SGD(net.parameters(), lr=0.1)
        step = FinetuneStep(net, nn.CrossEntropyLoss(reduction="none"), trainer, CPU, micro_batch=micro_batch)
        sums = [step.read(step(X, y)) for _ in range(3)]
        results.append((sums, calls, {k: v.detach().clone() for k, v in net.state_dict().items()}))
    (whole_sums, whole_calls, whole_params), (chunk_sums, chunk_calls, chunk_params) = results
    assert whole_calls == [16] * 3 and chunk_calls == [5, 5, 5, 1] * 3
    for (a_loss, a_correct), (b_loss, b_correct) in zip(whole_sums, chunk_sums):
        assert b_loss == pytest.approx(a_loss, rel=1e-5) and b_correct == a_correct
    for k in whole_params:
        torch.testing.assert_close(chunk_params[k], whole_params[k], rtol=1e-4, atol=1e-6)


def separable(num_batches, batch_size=16, seed=0):
    """The label is which of 3 marker tokens follows <cls>."""
    rng = np.random.default_rng(seed)
    n = num_batches * batch_size
    (ids, segments, lens), _ = packed_batch(n=n, T=12, seed=seed)
    labels = rng.integers(0, 3, n).astype(np.int64)
    ids[:, 1] = 3 + labels
    lens = np.maximum(lens, 4).astype(np.int32)
    columns = np.arange(12)
    ids = np.where(columns < lens[:, None], ids, 1).astype(np.int32)
    segments = np.where(columns < lens[:, None], segments, 0).astype(np.int32)
    return (ids, segments, lens), labels


def test_train_fast_learns_records_like_train_ch13_and_prints_the_book_lines(capsys):
    (ids, segments, lens), labels = separable(4)
    test_X, test_y = separable(2, seed=1)
    train_iter = BatchIterator((ids, segments, lens), labels, 16, shuffle=True, seed=0,
                               sampler=bucket_batch_indices(lens), trim=True)
    test_iter = BatchIterator(test_X, test_y, 16, sampler=bucket_batch_indices(test_X[2]), trim=True)
    net = tiny_classifier(dropout=0.1, fused=True)
    seen = []
    records = train_fast(net, train_iter, test_iter, nn.CrossEntropyLoss(reduction="none"),
                         torch.optim.Adam(net.parameters(), lr=5e-3), 10, CPU, on_epoch=seen.append)
    assert [r.epoch for r in records] == list(range(1, 11)) and seen == records
    assert all(r.num_examples == 64 and r.examples_per_sec > 0 and r.seconds > 0 for r in records)
    assert records[-1].loss < 0.5 * records[0].loss
    assert records[-1].test_acc >= 0.8
    assert records[-1].test_acc == pytest.approx(evaluate_accuracy(net, test_iter, CPU))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0] == (f"loss {records[-1].loss:.3f}, train acc {records[-1].train_acc:.3f}, "
                        f"test acc {records[-1].test_acc:.3f}")
    assert re.fullmatch(r"\d+\.\d examples/sec on \[device\(type='cpu'\)\]", lines[1])


def test_train_fast_and_train_ch13_reach_the_same_weights_on_the_same_batches():
    """Dropout 0, plain SGD, the same batches: the two loops are the same optimisation."""
    batches = [((X[0], X[1], X[2]), y) for X, y in [separable(1, seed=s) for s in range(3)]]
    nets = []
    for loop, fused in ((train_ch13, False), (train_fast, True)):
        net = tiny_classifier(fused=fused)
        loop(net, batches, None, nn.CrossEntropyLoss(reduction="none"), torch.optim.SGD(net.parameters(), lr=0.05),
             2, CPU, verbose=False)
        nets.append(net.state_dict())
    for k in nets[0]:
        torch.testing.assert_close(nets[1][k], nets[0][k], rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_trains_and_bad_options_are_refused():
    (ids, segments, lens), labels = separable(2)
    batches = [((ids, segments, lens), labels)]
    net = tiny_classifier(fused=True)
    records = train_fast(net, batches, batches, nn.CrossEntropyLoss(reduction="none"),
                         torch.optim.Adam(net.parameters(), lr=1e-3), 1, CPU, precision="bfloat16", verbose=False)
    assert np.isfinite(records[0].loss) and 0 <= records[0].test_acc <= 1
    assert all(p.dtype == torch.float32 for p in net.parameters())
    with pytest.raises(ValueError, match="precision"):
        train_fast(net, batches, None, nn.CrossEntropyLoss(reduction="none"),
                   torch.optim.Adam(net.parameters()), 1, CPU, precision="float16")
    with pytest.raises(ValueError, match="no batches"):
        train_fast(net, [], None, nn.CrossEntropyLoss(reduction="none"), torch.optim.Adam(net.parameters()), 1, CPU)
    with pytest.raises(ValueError, match="devices"):
        train_fast(net, batches, None, nn.CrossEntropyLoss(reduction="none"), torch.optim.Adam(net.parameters()), 1, [])


@pytest.mark.parametrize("fused", [False, True])
def test_the_last_block_at_cls_only_gives_the_same_logits_and_gradients(fused):
    full = tiny_classifier(fused=fused, cls_only=False)
    cls = tiny_classifier(fused=fused, cls_only=True)
    cls.load_state_dict(full.state_dict())
    X, y = packed_batch()
    X, y = as_tensors(X), torch.as_tensor(y)
    outs = []
    for net in (full, cls):
        logits = net(X)
        loss = nn.functional.cross_entropy(logits, y, reduction="sum")
        outs.append((logits, torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for name, a, b in zip([n for n, _ in full.named_parameters()], outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    encoded = cls.encoder(*X, cls_only=True)
    assert encoded.shape == (len(y), 1, H)
    torch.testing.assert_close(encoded[:, 0], full.encoder(*X)[:, 0], rtol=1e-5, atol=1e-5)
