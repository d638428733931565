"""Fine-tuning in MXNet Gluon: the step core/training.py's epoch loop drives, and the book's `train_ch13`.

Semantics kept from d2l: each batch is split across the devices (`split_batch_multi_inputs`),
one forward and one loss per shard inside `autograd.record()`, `backward()` on each, then
`trainer.step(batch_size, ignore_stale_grad=True)`, which sums the shards' gradients and divides
by the batch size (a mean gradient); `valid_lens` as float32; and, in `train_ch13`, the sums read
after every batch, the timer over training batches only (here waiting for each step's backward
and update, which the book's timer misses) and the two summary lines at the end. Changed: no
Animator (figures are returned as `EpochRecord`s instead), no `num_batches // 5` plotting step
(which divided by zero with fewer than 5 batches), and batches may be plain numpy arrays
(`nlibert.core.batching.BatchIterator`).
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import mxnet as mx
import numpy as onp
from mxnet import autograd, gluon, np, npx

from nlibert.backends import backend_info
from nlibert.core import book
from nlibert.core.book import bind
from nlibert.core.batching import chunk_bounds, rows
from nlibert.core.distributed import World
from nlibert.core.training import require_devices

npx.set_np()

PRECISIONS = backend_info("mxnet").precisions  # the registry lists each backend's


def try_all_gpus() -> list[mx.Context]:
    """Every GPU, or `[cpu(0)]` when there is none (never `[]`, unlike d2l master)."""
    n = mx.context.num_gpus()
    return [mx.gpu(i) for i in range(n)] if n else [mx.cpu()]


def _as_mx(x, ctx: mx.Context) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    x = onp.asarray(x)
    return np.array(x, dtype=x.dtype, ctx=ctx)


def split_batch_multi_inputs(X: Sequence, y, devices: Sequence[mx.Context]
                             ) -> tuple[list[tuple[np.ndarray, ...]], list[np.ndarray]]:
    """Split every input of a batch, and its labels, along the batch axis across `devices`: one
    `(tokens, segments, valid_lens)` tuple and one label array per device (slices may differ in
    size by one; a batch with fewer examples than devices uses only the first ones). The book's."""
    devices = list(devices)[:len(y)]
    X_shards = list(zip(*[gluon.utils.split_and_load(_as_mx(feature, mx.cpu()), devices, even_split=False)
                          for feature in X]))
    return X_shards, gluon.utils.split_and_load(_as_mx(y, mx.cpu()), devices, even_split=False)


def _to_batch(features: Sequence, labels, ctx: mx.Context) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """numpy (or MXNet) `(tokens, segments, valid_lens)` and labels as MXNet arrays on `ctx`;
    `valid_lens` becomes float32 as in the book (`npx.sequence_mask` takes either)."""
    tokens, segments, valid_lens = (_as_mx(x, ctx) for x in features)
    return (tokens, segments, valid_lens.astype("float32", copy=False)), _as_mx(labels, ctx)


def _staging_context(devices: Sequence[mx.Context]) -> mx.Context:
    """Where a numpy batch is copied first: the device itself when there is one, else the CPU,
    from which `split_and_load` copies each slice to its device (as the book's DataLoader)."""
    return devices[0] if len(devices) == 1 else mx.cpu()


def _correct(y_hat: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Number of rows whose argmax equals the label, as a 0-d array on y_hat's device (no host sync)."""
    return (y_hat.argmax(axis=1) == y.astype("int64")).sum()


def evaluate_accuracy(net: gluon.Block, data_iter: Iterable, devices: Sequence[mx.Context],
                      split_f: Callable | None = None) -> float:
    """Accuracy over `data_iter`, each batch split across `devices` by `split_f` (default
    `split_batch_multi_inputs`), outside `autograd.record`: dropout is off and no graph is built."""
    correct, total = _count_correct(net, data_iter, require_devices(devices), split_f or split_batch_multi_inputs,
                                    World())
    return correct / total if total else float("nan")


def _count_correct(net: gluon.Block, data_iter: Iterable, devices: list[mx.Context], split_f: Callable,
                   world: World) -> tuple[float, float]:
    """(number correct, number of examples) over `data_iter`, summed over the ranks of `world`,
    each of which computes its shard of every batch."""
    correct, total = [], 0  # per-shard counts stay on their devices until the end: one sync each
    for features, labels in data_iter:
        start, stop = world.shard(len(labels))
        if stop == start:
            continue
        X, y = _to_batch(rows(features, start, stop), labels[start:stop], _staging_context(devices))
        X_shards, y_shards = split_f(X, y, devices)
        correct += [_correct(net(X_shard), y_shard) for X_shard, y_shard in zip(X_shards, y_shards)]
        total += y.size
    correct, total = world.all_sum(onp.array([sum(float(c) for c in correct), total], dtype=onp.float64))
    return float(correct), float(total)


def _step(net: gluon.Block, features: Sequence, labels, loss: gluon.loss.Loss, trainer: gluon.Trainer,
          devices: list[mx.Context], split_f: Callable, micro_batch: int | None = None,
          max_grad_norm: float | None = None, world: World = World()) -> tuple[np.ndarray, np.ndarray]:
    """One optimizer step on a batch split across `devices`; the loss sum and the number correct as
    0-d arrays on devices[0] (no host synchronisation). With `micro_batch`, each device's shard is
    computed chunk by chunk; the net's gradients must then add up (`_accumulate_gradients`). With
    `max_grad_norm`, the gradient is clipped before the update (`_clip_gradients`). In a job of
    several processes, this rank computes its shard of the batch (core/distributed.py), the kvstore
    sums the ranks' gradients and the trainer divides by the whole batch's size."""
    batch_rows = len(labels)
    start, stop = world.training_shard(batch_rows)
    X, y = _to_batch(rows(features, start, stop), labels[start:stop], _staging_context(devices))
    if len(y) < len(devices):
        # A device without a shard would keep last step's gradient, which the trainer still sums.
        raise ValueError(f"a training batch of {len(y)} examples cannot be split across "
                         f"{len(devices)} devices; use a batch size that leaves no smaller last batch")
    X_shards, y_shards = split_f(X, y, devices)
    _join_kvstore(trainer, world, lambda: net(X_shards[0]))
    # The work in rounds: one round of every device's whole shard (their forwards all queued before
    # any backward, so devices run side by side), or, with `micro_batch`, one round per chunk of a
    # shard, so that only one chunk's graph is alive; its gradients then add up (grad_req 'add').
    if micro_batch is None:
        rounds = [list(zip(X_shards, y_shards))]
    else:
        net.collect_params().zero_grad()
        rounds = [[(rows(X_shard, start, stop), y_shard[start:stop])]
                  for X_shard, y_shard in zip(X_shards, y_shards)
                  for start, stop in chunk_bounds(len(y_shard), micro_batch)]
    done = []  # (predictions (rows, 3), labels, per-example losses (rows,)) of every piece
    for pieces in rounds:
        with autograd.record():
            preds = [net(X_piece) for X_piece, _ in pieces]
            outs = [(p, y_piece, loss(p, y_piece)) for p, (_, y_piece) in zip(preds, pieces)]
        for _, _, l in outs:
            l.backward()
        done += outs
    # Gradients are summed over the devices and divided by the batch size: a mean over the batch.
    # ignore_stale_grad: as the book, whose reason (unused MLM/NSP heads) does not arise here, since
    # `BERTClassifier` does not register those heads; harmless either way.
    if max_grad_norm is None:
        trainer.step(batch_rows, ignore_stale_grad=True)
    else:
        trainer.allreduce_grads()  # every device's copy now holds the batch's summed gradient
        _clip_gradients(net, max_grad_norm * batch_rows, devices)
        trainer.update(batch_rows, ignore_stale_grad=True)
    home = devices[0]
    # The loss sum in float64: steps' sums then add up to the same total however a run is split
    # into segments by checkpoints (float32 addition would depend on where the host read it).
    loss_sum = sum(l.astype("float64").sum().as_in_ctx(home) for _, _, l in done)
    correct = sum(_correct(p, y_piece).astype("float32").as_in_ctx(home) for p, y_piece, _ in done)
    return loss_sum, correct


def _join_kvstore(trainer: gluon.Trainer, world: World, forward: Callable[[], object]) -> None:
    """In a job, before the first step computes anything: the trainer joins the job's kvstore,
    which gives every worker rank 0's parameters (a head initialised after other random draws
    differs otherwise), and every worker waits for every other. Gluon would do this inside the
    first `step`, after the first gradients were computed from the unsynchronised parameters, and
    push the gradients right after it on the same keys; on the CPU nothing orders the two, and a
    worker's pull could return the gradient sum as its weights (about 1 run in 3 of a toy job).
    `forward()` (no gradient recorded, so no dropout drawn) first gives deferred parameters their
    shapes and values, as the first step's forward pass would."""
    if world.size > 1 and not trainer._kv_initialized:
        if any(param._deferred_init for param in trainer._params):
            forward()
        trainer._init_kvstore()
        trainer._init_params()
        npx.waitall()
        world.barrier()


def _clip_gradients(net: gluon.Block, max_norm: float, devices: list[mx.Context]) -> None:
    """Scale each device's copy of the summed gradient to a global norm of at most `max_norm`
    (the caller's G * batch size: G bounds the mean gradient, as in the other backends). Gluon's
    `clip_global_norm` takes legacy NDArrays; this is its rule on numpy-mode arrays, without its
    host sync."""
    params = [p for p in net.collect_params().values() if p.grad_req != "null"]
    for i in range(len(devices)):
        grads = [p.list_grad()[i] for p in params]
        total = np.sqrt(sum((g.astype("float32") ** 2).sum() for g in grads))
        scale = np.minimum(1.0, max_norm / (total + 1e-6))
        for g in grads:
            g *= scale


def _accumulate_gradients(net: gluon.Block) -> None:
    """Gluon overwrites a gradient on every backward (grad_req 'write'); chunks of one batch must add."""
    for param in net.collect_params().values():
        if param.grad_req != "null":
            param.grad_req = "add"


def _read(sums: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Both numbers in one host read; then wait for every queued operation (the read waited for the
    forward passes only: backward and the updates would run on, outside a caller's timer)."""
    loss_sum, correct = (float(v) for v in np.stack([sums[0], sums[1].astype("float64")]).asnumpy())
    npx.waitall()
    return loss_sum, correct


def train_batch_ch13(net: gluon.Block, X, y, loss: gluon.loss.Loss, trainer: gluon.Trainer,
                     devices: Sequence[mx.Context], split_f: Callable | None = None) -> tuple[float, float]:
    """One optimizer step on one batch split across `devices`; returns (sum of per-example losses,
    number correct)."""
    return _read(_step(net, X, y, loss, trainer, require_devices(devices), split_f or split_batch_multi_inputs))


def _hybridize(net: gluon.Block) -> None:
    """`net.hybridize()`: each encoder block (and each embedding and dense layer outside them)
    becomes a cached graph. Gluon warns that the block list could be a HybridSequential; the
    blocks are hybridized one by one either way, so that warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Consider using HybridSequential.*")
        net.hybridize()


# A step object's `learning_rate` (FinetuneStep here, PretrainStep in pretrain.py): its trainer's rate.
_learning_rate = property(lambda step: step.trainer.learning_rate,
                          lambda step, lr: step.trainer.set_learning_rate(lr))


class FinetuneStep:
    """core/training.py's step: each call is `train_batch_ch13`'s step with the sums left on the device
    (MXNet's engine runs ahead meanwhile). The net's parameters must already live on every device
    (the book initialises and loads them with `ctx=devices`); `graph` hybridizes it. In a `world`
    of several processes (`init_distributed`: the trainer then sums gradients through the job's
    dist_sync kvstore), each rank computes its shard of every batch on its one device, and `read`
    and `evaluate` give the whole job's figures."""

    def __init__(self, net: gluon.Block, loss: gluon.loss.Loss, trainer: gluon.Trainer,
                 devices: Sequence[mx.Context], split_f: Callable | None = None, *, precision: str = "float32",
                 graph: bool = False, micro_batch: int | None = None, max_grad_norm: float | None = None,
                 world: World | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not supported by the MXNet backend: use one of {PRECISIONS}")
        self.devices = require_devices(devices)
        self.world = world or World()
        if self.world.size > 1 and len(self.devices) > 1:
            raise ValueError(f"a process of a distributed job drives one device, got {len(self.devices)}")
        self.net, self.loss, self.trainer = net, loss, trainer
        self.split_f = split_f or split_batch_multi_inputs
        self.micro_batch, self.max_grad_norm = micro_batch, max_grad_norm
        if micro_batch is not None:
            _accumulate_gradients(net)
        if graph:
            _hybridize(net)

    def __call__(self, features, labels) -> tuple[np.ndarray, np.ndarray]:
        return _step(self.net, features, labels, self.loss, self.trainer, self.devices, self.split_f,
                     self.micro_batch, self.max_grad_norm, self.world)

    learning_rate = _learning_rate

    def read(self, sums: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
        loss_sum, correct = self.world.all_sum(onp.array(_read(sums)))
        return float(loss_sum), float(correct)

    def evaluate(self, data_iter: Iterable) -> float:
        correct, total = _count_correct(self.net, data_iter, self.devices, self.split_f, self.world)
        return correct / total if total else float("nan")

    def reseed(self, seed: int) -> None:
        mx.random.seed(seed)

    def compile_ahead(self, train_batches: Sequence, eval_batches: Sequence = ()) -> None:
        """Nothing to do: this backend compiles no program per batch shape ahead (JAX's does)."""


train_ch13 = bind(book.train_ch13, FinetuneStep)
train_fast = bind(book.train_fast, FinetuneStep)


def _as_numpy(x) -> onp.ndarray:
    return x.asnumpy() if isinstance(x, np.ndarray) else onp.asarray(x)


def _probabilities(net: gluon.Block, token_ids: onp.ndarray, segments: onp.ndarray, valid_lens: onp.ndarray,
                   device: mx.Context) -> onp.ndarray:
    """One batch's class probabilities, outside autograd.record (dropout off)."""
    X, _ = _to_batch((token_ids, segments, valid_lens), onp.zeros(0), device)
    return npx.softmax(net(X).astype("float32"), axis=-1).asnumpy()


predict_proba = bind(book.predict_proba, _probabilities, _as_numpy)
