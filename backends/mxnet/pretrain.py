"""BERT pretraining in MXNet Gluon: the step core/pretraining.py's loop drives, the book's `train_bert`
(bert-pretraining.md), and the resumable state.

Semantics kept from d2l: Adam with lr 0.01, every batch split across the devices
(`split_and_load`), one `mlm + nsp` loss per shard inside `autograd.record()`, `backward()` on
each, `trainer.step(1)` (the per-shard losses are already means), the timer covering forward,
backward and update only, and the two lines printed at the end (`MLM loss ..., NSP loss ...` and
`... sentence pairs/sec on [...]`, means over the steps). The MLM loss is the book's MXNet one by
default, `SoftmaxCELoss` with the prediction weights as sample weights: a mean over real
predictions only (`mlm_loss='masked'`); `mlm_loss='book'` computes the book's PyTorch formula,
whose mean also runs over padded prediction slots, for comparing with torch runs.
Changed: no Animator (per-step figures are returned as `StepRecord`s); `start_step`, `seed` and
`on_step` let a job checkpoint and resume.
"""
from __future__ import annotations

import os
import zipfile
from typing import Sequence

import mxnet as mx
import numpy as onp
from mxnet import autograd, gluon, np, npx

from nlibert.core import book
from nlibert.core.book import bind
from nlibert.core.distributed import World
from nlibert.core.io import atomic_path, atomic_write
from nlibert.core.pretraining import (BatchTotals, check_init, check_mlm_loss, share_of)
from nlibert.core.resume import step_file
from nlibert.core.training import require_devices

from .runtime import make_trainer
from .train import _as_mx, _join_kvstore, _learning_rate

npx.set_np()


def initialize_bert(net: gluon.Block, devices: Sequence[mx.Context], init: str = "book") -> None:
    """The model on every device, initialised as `init` says (`core.pretraining.INIT_SCHEMES`).

    'book' and 'xavier' are the same here: the book's `net.initialize(init.Xavier(), ctx=devices)`
    (Dense biases stay zeros, LayerNorm ones/zeros: they name their own initializers)."""
    check_init(init)
    net.initialize(mx.init.Xavier(), ctx=list(devices))


def _get_batch_loss_bert(net: gluon.Block, loss: gluon.loss.Loss, vocab_size: int, tokens_X_shards,
                         segments_X_shards, valid_lens_x_shards, pred_positions_X_shards, mlm_weights_X_shards,
                         mlm_Y_shards, nsp_y_shards, mlm_loss: str = "masked", totals: BatchTotals | None = None
                         ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per device shard: `(mlm_ls, nsp_ls, ls)`, lists of 0-d arrays (`ls[i] = mlm_ls[i] + nsp_ls[i]`).
    `totals`: the shards are a rank's share of a batch whose means divide by these totals."""
    check_mlm_loss(mlm_loss)
    mlm_ls, nsp_ls, ls = [], [], []
    for (tokens_X_shard, segments_X_shard, valid_lens_x_shard, pred_positions_X_shard, mlm_weights_X_shard,
         mlm_Y_shard, nsp_y_shard) in zip(tokens_X_shards, segments_X_shards, valid_lens_x_shards,
                                          pred_positions_X_shards, mlm_weights_X_shards, mlm_Y_shards,
                                          nsp_y_shards):
        _, mlm_Y_hat, nsp_Y_hat = net(tokens_X_shard, segments_X_shard, valid_lens_x_shard.reshape(-1),
                                      pred_positions_X_shard)
        weights = mlm_weights_X_shard.reshape(-1, 1)  # (B*P, 1): 1 for a real prediction, 0 for a pad
        if totals is not None:
            mlm_sum = loss(mlm_Y_hat.reshape(-1, vocab_size), mlm_Y_shard.reshape(-1),
                           weights if mlm_loss == "masked" else None).sum()
            mlm_l, nsp_l, l = totals.losses(mlm_sum, loss(nsp_Y_hat, nsp_y_shard).sum(), mlm_loss)
            mlm_ls.append(mlm_l)
            nsp_ls.append(nsp_l)
            ls.append(l)
            continue
        if mlm_loss == "masked":
            # The book: padded slots get sample weight 0, then sum / number of real predictions.
            mlm_l = loss(mlm_Y_hat.reshape(-1, vocab_size), mlm_Y_shard.reshape(-1), weights)
            mlm_l = mlm_l.sum() / (weights.sum() + 1e-8)
        else:
            # The book's torch formula: mean over all slots, times sum(weights) / sum(weights).
            mlm_l = loss(mlm_Y_hat.reshape(-1, vocab_size), mlm_Y_shard.reshape(-1)).mean()
            mlm_l = mlm_l * weights.sum() / (weights.sum() + 1e-8)
        nsp_l = loss(nsp_Y_hat, nsp_y_shard).mean()
        mlm_ls.append(mlm_l)
        nsp_ls.append(nsp_l)
        ls.append(mlm_l + nsp_l)
    return mlm_ls, nsp_ls, ls


class PretrainStep:
    """core/pretraining.py's step: each call is one step of the book's `train_bert`: the batch split
    across the devices (`split_and_load`; the net's parameters live on all of them), one `mlm + nsp`
    loss per shard inside `autograd.record()`, `backward()` on each, `trainer.step(1)` (the
    per-shard losses are already means), then the losses read back and every queued operation
    waited for, so that the step's timer covers its backward and update too."""

    def __init__(self, net: gluon.Block, loss: gluon.loss.Loss, vocab_size: int, trainer: gluon.Trainer,
                 devices: Sequence[mx.Context], mlm_loss: str = "masked", *, world: World | None = None) -> None:
        self.devices = require_devices(devices)
        self.net, self.loss, self.vocab_size, self.trainer = net, loss, vocab_size, trainer
        self.mlm_loss = check_mlm_loss(mlm_loss)
        self.world = world or World()
        if self.world.size > 1 and len(self.devices) > 1:
            raise ValueError(f"a process of a distributed job drives one device, got {len(self.devices)}")
        # A batch goes to the one device directly, else to the CPU and from there in slices.
        self.staging = self.devices[0] if len(self.devices) == 1 else mx.cpu()
        self._totals: BatchTotals | None = None

    learning_rate = _learning_rate

    def load(self, batch: Sequence) -> list[list[np.ndarray]]:
        batch, self._totals = share_of(batch, self.world)  # in a job: this rank's rows, the batch's totals
        if len(batch[0]) < len(self.devices):
            # A device without a shard would keep last step's gradient, which the trainer still sums.
            raise ValueError(f"a batch of {len(batch[0])} sentence pairs cannot be split across "
                             f"{len(self.devices)} devices")
        return [gluon.utils.split_and_load(_as_mx(elem, self.staging), self.devices, even_split=False)
                for elem in batch]

    def __call__(self, inputs: list[list[np.ndarray]]) -> tuple[float, float]:
        tokens, segments, valid_lens, pred_positions = (elem[0] for elem in inputs[:4])
        _join_kvstore(self.trainer, self.world, lambda: self.net(tokens, segments, valid_lens.reshape(-1),
                                                                 pred_positions))
        with autograd.record():
            mlm_ls, nsp_ls, ls = _get_batch_loss_bert(self.net, self.loss, self.vocab_size, *inputs,
                                                      mlm_loss=self.mlm_loss, totals=self._totals)
        for l in ls:
            l.backward()
        self.trainer.step(1)
        if self.world.size > 1:  # each rank's share of the batch's means: their sum is the mean
            mlm_value, nsp_value = (float(v) for v in self.world.all_sum(
                onp.array([float(mlm_ls[0]), float(nsp_ls[0])])))
        else:
            mlm_value = sum(float(l) for l in mlm_ls) / len(mlm_ls)
            nsp_value = sum(float(l) for l in nsp_ls) / len(nsp_ls)
        # float() waits for the forward pass only; backward and the update run asynchronously and
        # would be charged to the next step's data copy, outside the timer (the book's figure misses
        # them): wait for them so that sentence pairs/sec counts the whole step.
        npx.waitall()
        return mlm_value, nsp_value

    def reseed(self, seed: int) -> None:
        mx.random.seed(seed)


train_bert = bind(book.train_bert, PretrainStep, make_trainer)


def _trainer_updaters(trainer: gluon.Trainer) -> list:
    """The `Updater`s holding the trainer's optimizer states, keyed by the trainer's parameter index:
    the kvstore's one when it updates (several devices), else one per device."""
    # The same set-up `Trainer.save_states` / `load_states` do first (the kvstore is created lazily).
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    return [trainer._kvstore._updater] if trainer._update_on_kvstore else list(trainer._updaters)


def _trainer_index_by_name(net: gluon.Block, trainer: gluon.Trainer) -> dict[str, int]:
    """Structured parameter name (`encoder.blks.0.attention.W_q.weight`, as `save_parameters`) ->
    the trainer's index of that parameter. The trainer orders parameters by their global names
    (`dense12_weight`), which depend on how many blocks the process made before: two models of
    the same shape can order them differently, so states are never matched by index across runs."""
    return {name: trainer._param2idx[param.name] for name, param in net._collect_params_with_prefix().items()}


def save_training_state(folder: str | os.PathLike, net: gluon.Block, trainer: gluon.Trainer,
                        step: int) -> dict[str, str]:
    """Write the model parameters (`save_parameters`) and the trainer state of step `step` into
    `folder`, each atomically; returns the file names for the resume `state.json`.

    The trainer file is a numpy `.npz` keyed by structured parameter name: `mean:NAME`, `var:NAME`
    (Adam's moments) and `count:NAME` (its update count, Adam's bias correction), plus `num_update`.
    (`Trainer.save_states` keys them by the trainer's index instead, which another model of the same
    shape may assign to another parameter.) MXNet's RNG state cannot be read; `train_bert(seed=...)`
    re-seeds it per step instead."""
    os.makedirs(folder, exist_ok=True)
    files = {"params": step_file(step, "params"), "trainer": step_file(step, "trainer")}
    with atomic_path(os.path.join(folder, files["params"])) as tmp:
        net.save_parameters(tmp)
    states = _trainer_updaters(trainer)[0].states
    optimizer = trainer._optimizer
    counts = optimizer._all_index_update_counts.values()  # one dict per device, all alike
    arrays = {"num_update": onp.asarray(optimizer.num_update, dtype=onp.int64)}
    for name, index in _trainer_index_by_name(net, trainer).items():
        if index not in states:
            continue  # never updated: Adam creates zero moments at its first update
        mean, var = states[index]
        arrays[f"mean:{name}"], arrays[f"var:{name}"] = mean.asnumpy(), var.asnumpy()
        arrays[f"count:{name}"] = onp.asarray(max(c.get(index, 0) for c in counts), dtype=onp.int64)
    with atomic_write(os.path.join(folder, files["trainer"]), "wb") as f:
        onp.savez(f, **arrays)
    return files


def load_training_state(folder: str | os.PathLike, files: dict[str, str], net: gluon.Block,
                        trainer: gluon.Trainer, devices: Sequence[mx.Context]) -> None:
    """Put back what `save_training_state` wrote: parameters (on every device) and the trainer's
    Adam states, matched by structured parameter name; every name and shape is checked."""
    net.load_parameters(os.path.join(folder, files["params"]), ctx=list(devices))
    path = os.path.join(folder, files["trainer"])
    try:
        with onp.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a trainer state of this version (an .npz keyed by parameter name): {e}; "
                         "pass --no-resume to start over") from e
    params = net._collect_params_with_prefix()
    index_by_name = _trainer_index_by_name(net, trainer)
    expected = {"num_update"} | {f"{kind}:{name}" for name in params for kind in ("mean", "var", "count")}
    missing, unknown = sorted(expected - arrays.keys()), sorted(arrays.keys() - expected)
    if missing:
        raise ValueError(f"{path}: has no key {missing[0]} (not this model's trainer state)")
    if unknown:
        raise ValueError(f"{path}: key {unknown[0]} names no parameter of this model")
    updaters = _trainer_updaters(trainer)
    optimizer = trainer._optimizer
    device_ids = {0} | {ctx.device_id for ctx in trainer._contexts}
    for name, param in params.items():
        mean, var = arrays[f"mean:{name}"], arrays[f"var:{name}"]
        for key, value in ((f"mean:{name}", mean), (f"var:{name}", var)):
            if value.shape != param.shape:
                raise ValueError(f"{path}: key {key} has shape {value.shape}, the parameter {param.shape}")
        index = index_by_name[name]
        for updater in updaters:
            updater.states[index] = (mx.nd.array(mean, dtype=mean.dtype), mx.nd.array(var, dtype=var.dtype))
            updater.states_synced[index] = False  # moved to the weight's device at its next update
        for device_id in device_ids:  # Adam's bias correction reads the count of the update's device
            optimizer._all_index_update_counts.setdefault(device_id, {})[index] = int(arrays[f"count:{name}"])
    optimizer.num_update = int(arrays["num_update"])
