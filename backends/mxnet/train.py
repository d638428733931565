"""The book's multi-device fine-tuning loop (`train_ch13`) and its helpers, in MXNet Gluon.

Semantics kept from d2l: each batch is split across the devices (`split_batch_multi_inputs`),
one forward and one loss per shard inside `autograd.record()`, `backward()` on each, then
`trainer.step(batch_size, ignore_stale_grad=True)`, which sums the shards' gradients and divides
by the batch size (a mean gradient); `valid_lens` as float32; the timer covering training batches
only (and, here, waiting for each step's backward and update, which the book's timer misses);
and the two summary lines printed at the end. Changed: no Animator (figures are returned as
`EpochRecord`s instead), no `num_batches // 5` plotting step (which divided by zero with fewer than
5 batches), and batches may be plain numpy arrays (`nlibert.core.batching.BatchIterator`).
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import mxnet as mx
import numpy as onp
from mxnet import autograd, gluon, np, npx

from nlibert.core.training import Accumulator, EpochRecord, Timer, format_summary

npx.set_np()


def try_all_gpus() -> list[mx.Context]:
    """Every GPU, or `[cpu(0)]` when there is none (never `[]`, unlike d2l master)."""
    n = mx.context.num_gpus()
    return [mx.gpu(i) for i in range(n)] if n else [mx.cpu()]


def split_batch_multi_inputs(X: Sequence[np.ndarray], y: np.ndarray, devices: Sequence[mx.Context]
                             ) -> tuple[list[tuple[np.ndarray, ...]], list[np.ndarray]]:
    """Split every input of a batch, and its labels, along the batch axis across `devices`.

    Returns one `(tokens, segments, valid_lens)` tuple and one label array per device (slices may
    differ in size by one). A batch with fewer examples than devices uses only the first ones.
    """
    devices = list(devices)[:len(y)]
    X_shards = list(zip(*[gluon.utils.split_and_load(feature, devices, even_split=False) for feature in X]))
    return X_shards, gluon.utils.split_and_load(y, devices, even_split=False)


def _to_batch(features: Sequence, labels, ctx: mx.Context) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """numpy (or MXNet) `(tokens, segments, valid_lens)` and labels as MXNet arrays on `ctx`;
    `valid_lens` becomes float32 as in the book (`npx.sequence_mask` takes either)."""
    tokens, segments, valid_lens = (_as_mx(x, ctx) for x in features)
    return (tokens, segments, valid_lens.astype("float32", copy=False)), _as_mx(labels, ctx)


def _as_mx(x, ctx: mx.Context) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    x = onp.asarray(x)
    return np.array(x, dtype=x.dtype, ctx=ctx)


def _staging_context(devices: Sequence[mx.Context]) -> mx.Context:
    """Where a numpy batch is copied first: the device itself when there is one, else the CPU,
    from which `split_and_load` copies each slice to its device (as the book's DataLoader)."""
    return devices[0] if len(devices) == 1 else mx.cpu()


def _correct(y_hat: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Number of rows whose argmax equals the label, as a 0-d array on y_hat's device (no host sync)."""
    return (y_hat.argmax(axis=1) == y.astype("int64")).sum()


def evaluate_accuracy(net: gluon.Block, data_iter: Iterable, devices: Sequence[mx.Context],
                      split_f: Callable = split_batch_multi_inputs) -> float:
    """Accuracy over `data_iter`, each batch split across `devices` (outside `autograd.record`,
    so dropout is off and no graph is built)."""
    devices = list(devices)
    correct, total = [], 0  # per-shard counts stay on their devices until the end: one sync each
    for features, labels in data_iter:
        X, y = _to_batch(features, labels, _staging_context(devices))
        X_shards, y_shards = split_f(X, y, devices)
        correct += [_correct(net(X_shard), y_shard) for X_shard, y_shard in zip(X_shards, y_shards)]
        total += y.size
    return sum(float(c) for c in correct) / total if total else float("nan")


def train_batch_ch13(net: gluon.Block, features: Sequence, labels, loss: gluon.loss.Loss,
                     trainer: gluon.Trainer, devices: Sequence[mx.Context],
                     split_f: Callable = split_batch_multi_inputs) -> tuple[float, float]:
    """One optimizer step on one batch split across `devices`; returns (sum of per-example losses,
    number correct)."""
    devices = list(devices)
    X, y = _to_batch(features, labels, _staging_context(devices))
    if len(y) < len(devices):
        # A device without a shard would keep last step's gradient, which the trainer still sums.
        raise ValueError(f"a training batch of {len(y)} examples cannot be split across "
                         f"{len(devices)} devices; use a batch size that leaves no smaller last batch")
    X_shards, y_shards = split_f(X, y, devices)
    with autograd.record():
        pred_shards = [net(X_shard) for X_shard in X_shards]  # each (B/k, 3)
        ls = [loss(p, y_shard) for p, y_shard in zip(pred_shards, y_shards)]  # each (B/k,)
    for l in ls:
        l.backward()
    # Gradients are summed over the devices and divided by the batch size: a mean over the batch.
    # ignore_stale_grad: as the book (its reason, unused MLM/NSP heads, does not arise: facts §1.4).
    trainer.step(len(y), ignore_stale_grad=True)
    # One host read per shard for both numbers. It waits for the forward pass only: backward and the
    # update may still be running (train_ch13 waits for them before stopping its timer).
    sums = [np.stack([l.sum(), _correct(p, y_shard).astype(l.dtype)]).asnumpy()
            for l, p, y_shard in zip(ls, pred_shards, y_shards)]
    loss_sum, correct = (float(v) for v in onp.sum(sums, axis=0))
    return loss_sum, correct


def train_ch13(net: gluon.Block, train_iter: Iterable, test_iter: Iterable | None, loss: gluon.loss.Loss,
               trainer: gluon.Trainer, num_epochs: int, devices: Sequence[mx.Context],
               split_f: Callable = split_batch_multi_inputs, verbose: bool = True,
               on_epoch: Callable[[EpochRecord], None] | None = None) -> list[EpochRecord]:
    """Train for `num_epochs`, testing after each; print the book's two lines; return per-epoch records.

    The net's parameters must already live on every device in `devices` (the book initialises and
    loads them with `ctx=devices`); each batch is split across them by `split_f`.
    `on_epoch`, if given, is called with each epoch's record as soon as it is known.
    """
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty: pass at least one device (try_all_gpus() never returns [])")
    records: list[EpochRecord] = []
    for epoch in range(1, num_epochs + 1):
        # Sum of training loss, no. of correct predictions, no. of examples, no. of predictions
        metric, timer = Accumulator(4), Timer()
        for features, labels in train_iter:
            timer.start()
            l, acc = train_batch_ch13(net, features, labels, loss, trainer, devices, split_f)
            # Reading the loss waited for the forward pass only; backward and the update run on in
            # MXNet's engine and would be charged to the next batch's data copy, outside the timer
            # (the book's figure misses them): wait for the whole step, once per batch.
            npx.waitall()
            timer.stop()
            metric.add(l, acc, len(labels), int(onp.prod(onp.shape(labels))))
        if metric[2] == 0:
            raise ValueError("train_iter yielded no batches")
        test_acc = (evaluate_accuracy(net, test_iter, devices, split_f) if test_iter is not None
                    else float("nan"))
        record = EpochRecord.from_sums(epoch, metric[0], metric[1], int(metric[2]), test_acc, timer.sum())
        record.train_acc = metric[1] / metric[3]  # the book divides by predictions, not examples
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    if verbose and records:
        print(format_summary(records, str(devices)))
    return records


PRECISIONS = ("float32",)  # MXNet 1.9 has no bfloat16 training on these operators


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported by the MXNet backend: use one of {PRECISIONS}")


def _hybridize(net: gluon.Block) -> None:
    """`net.hybridize()`: each encoder block (and each embedding and dense layer outside them)
    becomes a cached graph. Gluon warns that the block list could be a HybridSequential; the
    blocks are hybridized one by one either way, so that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Consider using HybridSequential.*")
        net.hybridize()


def train_batch_fast(net: gluon.Block, features: Sequence, labels, loss: gluon.loss.Loss,
                     trainer: gluon.Trainer, devices: Sequence[mx.Context],
                     split_f: Callable = split_batch_multi_inputs, precision: str = "float32"
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`train_batch_ch13`'s step (split across devices, one loss per shard, `backward` on each,
    `trainer.step(batch_size)`), but the per-shard loss sums and correct counts come back as arrays
    on their devices: no host synchronisation."""
    _check_precision(precision)
    devices = list(devices)
    X, y = _to_batch(features, labels, _staging_context(devices))
    if len(y) < len(devices):
        raise ValueError(f"a training batch of {len(y)} examples cannot be split across "
                         f"{len(devices)} devices; use a batch size that leaves no smaller last batch")
    X_shards, y_shards = split_f(X, y, devices)
    with autograd.record():
        pred_shards = [net(X_shard) for X_shard in X_shards]  # each (B/k, 3)
        ls = [loss(p, y_shard) for p, y_shard in zip(pred_shards, y_shards)]  # each (B/k,)
    for l in ls:
        l.backward()
    trainer.step(len(y), ignore_stale_grad=True)
    return ([l.sum() for l in ls],
            [_correct(p, y_shard).astype("float32") for p, y_shard in zip(pred_shards, y_shards)])


def train_fast(net: gluon.Block, train_iter: Iterable, test_iter: Iterable | None, loss: gluon.loss.Loss,
               trainer: gluon.Trainer, num_epochs: int, devices: Sequence[mx.Context],
               split_f: Callable = split_batch_multi_inputs, *, precision: str = "float32",
               graph: bool = False, verbose: bool = True,
               on_epoch: Callable[[EpochRecord], None] | None = None) -> list[EpochRecord]:
    """`train_ch13` for the fast path: the same optimisation (same loss, mean gradient over the
    batch split across devices, trainer), the same records and printed lines, with fewer host round
    trips: the loss and accuracy sums stay on each device and are read once per epoch (MXNet's
    engine runs ahead meanwhile), and the epoch timer covers the whole pass (batching included).
    Feed it length-bucketed, trimmed batches (`core.batching.bucket_batch_indices`, `trim=True`) and
    a net with fused attention (`set_fused_attention`) for the speed.

    `graph=True` hybridizes the net (each encoder block one cached graph; see the README's
    Performance section for what it buys). `precision` must be 'float32' in this backend.
    """
    _check_precision(precision)
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty: pass at least one device (try_all_gpus() never returns [])")
    if graph:
        _hybridize(net)
    records: list[EpochRecord] = []
    for epoch in range(1, num_epochs + 1):
        loss_sums: list[np.ndarray] = []
        correct: list[np.ndarray] = []
        num_examples, timer = 0, Timer()
        for features, labels in train_iter:
            ls, cs = train_batch_fast(net, features, labels, loss, trainer, devices, split_f, precision)
            # Running sums per device slot: still no synchronisation.
            loss_sums = [a + b for a, b in zip(loss_sums, ls)] + ls[len(loss_sums):]
            correct = [a + b for a, b in zip(correct, cs)] + cs[len(correct):]
            num_examples += len(labels)
        if num_examples == 0:
            raise ValueError("train_iter yielded no batches")
        loss_sum = sum(float(a) for a in loss_sums)  # the epoch's host syncs, one per device
        num_correct = sum(float(a) for a in correct)
        npx.waitall()  # the sums waited for the last forward pass; the timer covers its backward and update too
        seconds = timer.stop()
        test_acc = (evaluate_accuracy(net, test_iter, devices, split_f) if test_iter is not None
                    else float("nan"))
        record = EpochRecord.from_sums(epoch, loss_sum, num_correct, num_examples, test_acc, seconds)
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    if verbose and records:
        print(format_summary(records, str(devices)))
    return records


def predict_proba(net: gluon.Block, token_ids, segments, valid_lens, devices: Sequence[mx.Context],
                  batch_size: int = 512) -> onp.ndarray:
    """Class probabilities (N, 3) for packed examples, on devices[0], `batch_size` rows at a time.

    Inputs are numpy or MXNet arrays shaped as `pack_pairs` returns them; one unbatched example
    (1-D ids and segments, a scalar length) is treated as a batch of one.
    """
    token_ids, segments = onp.atleast_2d(_as_numpy(token_ids)), onp.atleast_2d(_as_numpy(segments))
    valid_lens = onp.atleast_1d(_as_numpy(valid_lens))
    if not (len(token_ids) == len(segments) == len(valid_lens)):
        raise ValueError(f"row counts differ: token_ids {len(token_ids)}, segments {len(segments)}, "
                         f"valid_lens {len(valid_lens)}")
    ctx = list(devices)[0]
    out = []
    for i in range(0, len(token_ids), batch_size):  # outside autograd.record: dropout is off
        X, _ = _to_batch((token_ids[i:i + batch_size], segments[i:i + batch_size],
                          valid_lens[i:i + batch_size]), onp.zeros(0), ctx)
        out.append(npx.softmax(net(X).astype("float32"), axis=-1).asnumpy())
    return onp.concatenate(out) if out else onp.zeros((0, 3), dtype=onp.float32)


def _as_numpy(x) -> onp.ndarray:
    return x.asnumpy() if isinstance(x, np.ndarray) else onp.asarray(x)
