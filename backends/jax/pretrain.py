"""BERT pretraining in JAX: the step core/pretraining.py's loop drives, the book's `train_bert`
(bert-pretraining.md), and the resumable state.

Semantics kept from d2l: Adam with lr 0.01, the loss `mlm + nsp` per batch, data parallel across
devices, the timer covering forward, backward and update only, and the two lines printed at the
end (`MLM loss ..., NSP loss ...` and `... sentence pairs/sec on [...]`, means over the steps).
The MLM loss is by default the mean over real predictions only (`mlm_loss='masked'`, the book's
MXNet code); `mlm_loss='book'` is the book's PyTorch formula (the mean over every prediction slot,
padded ones included). Each step is one compiled program (`jax.jit`); rows are padded to a
multiple of the device count with weight-0 rows, which change no loss and no gradient.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from jax.sharding import NamedSharding, PartitionSpec

from nlibert.core import book
from nlibert.core.book import bind
from nlibert.core.distributed import World
from nlibert.core.io import atomic_write
from nlibert.core.pretraining import (check_init, check_mlm_loss)
from nlibert.core.resume import step_file
from nlibert.core.training import require_devices

from .checkpoint import _flatten, _nest, read_params, write_params
from ._programs import _steps_thread_on_the_host
from .model import _Bound
from .runtime import _next_key
from .runtime import make_trainer
from .train import _learning_rate, _mesh, _pad, _place, _replicate


def initialize_bert(net: _Bound, devices: Sequence[jax.Device], init: str = "book") -> None:
    """The model on devices[0], initialised as `init` says (`core.pretraining.INIT_SCHEMES`).

    'book': the distributions the model was built with (the torch backend's layer defaults).
    'xavier': as MXNet's `init.Xavier()`: every parameter of 2 or more dimensions Xavier-uniform with
    the fans torch and MXNet compute (fan_in = shape[1] * receptive field, fan_out = shape[0] *
    receptive field), every bias 0, LayerNorm scales left at 1."""
    check_init(init)
    if init == "xavier":
        flat, rng = _flatten(net.params), np.random.default_rng(np.asarray(_next_key()))  # drawn on the host
        for name, value in flat.items():
            shape = np.shape(value)
            if len(shape) >= 2:
                receptive = int(np.prod(shape[2:]))
                bound = float(np.sqrt(6.0 / (shape[1] * receptive + shape[0] * receptive)))
                flat[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
            elif name.endswith("bias"):
                flat[name] = np.zeros(shape, np.float32)
        net.params = _nest(flat)
    net.params = jax.device_put(net.params, require_devices(devices)[0])


def _batch_loss(module, params, loss: Callable, vocab_size: int, tokens_X, segments_X, valid_lens_x,
                pred_positions_X, mlm_weights_X, mlm_Y, nsp_y, row_weights, key, mlm_loss: str):
    """`(mlm_l + nsp_l, (mlm_l, nsp_l))` of one batch, padded rows (`row_weights` 0) left out."""
    check_mlm_loss(mlm_loss)
    _, mlm_Y_hat, nsp_Y_hat = module.apply({"params": params}, tokens_X, segments_X, valid_lens_x.reshape(-1),
                                           pred_positions_X, training=True, rngs={"dropout": key})
    mlm_l = loss(mlm_Y_hat.reshape(-1, vocab_size), mlm_Y.reshape(-1))  # (B*P,)
    weights = mlm_weights_X.reshape(-1)  # (B*P,): 1 for a real prediction, 0 for a padded slot
    if mlm_loss == "masked":
        mlm_l = (mlm_l * weights).sum() / (weights.sum() + 1e-8)
    else:
        # The book: mean(loss over all real rows' slots) * weights, summed, over sum(weights).
        slots = jnp.repeat(row_weights, mlm_Y.shape[1])
        mlm_l = (mlm_l * slots).sum() / slots.sum() * weights.sum() / (weights.sum() + 1e-8)
    nsp_l = (loss(nsp_Y_hat, nsp_y) * row_weights).sum() / row_weights.sum()
    return mlm_l + nsp_l, (mlm_l, nsp_l)


@functools.lru_cache(maxsize=None)
def _pretrain_function(module, loss: Callable, vocab_size: int, tx: optax.GradientTransformation, mlm_loss: str,
                       donate: bool) -> Callable:
    """Compiled: one optimizer step of `mlm + nsp` on a loaded batch; the new parameters and state
    and the two losses. Kept per model configuration, so later runs in the process reuse it."""
    def step(params, opt_state, key, *batch):
        grads, (mlm_l, nsp_l) = jax.grad(
            lambda p: _batch_loss(module, p, loss, vocab_size, *batch, key, mlm_loss), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.stack([mlm_l, nsp_l])

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


class PretrainStep:
    """core/pretraining.py's step: the net's parameters and the trainer's state replicated on
    `devices`, each batch sharded across them; each call is one compiled step of the book's
    `train_bert`: the batch's `mlm + nsp` loss, its gradient, Adam's update, both losses read back
    (one host sync, which waits for the step)."""

    def __init__(self, net: _Bound, loss: Callable, vocab_size: int, trainer,
                 devices: Sequence[jax.Device], mlm_loss: str = "masked", *, world: World | None = None) -> None:
        if world is not None and world.size > 1:
            raise ValueError("the JAX backend pretrains as one process, data-parallel over its devices")
        self.devices = require_devices(devices)
        self.net, self.trainer, self.mlm_loss = net, trainer, check_mlm_loss(mlm_loss)
        net.params, trainer.state = _replicate(net.params, self.devices), _replicate(trainer.state, self.devices)
        self.step = _pretrain_function(net.module, loss, vocab_size, trainer.tx, self.mlm_loss,
                                       self.devices[0].platform != "cpu")
        self.key = _next_key()  # dropout keys: from the backend's generator (`set_seed`)

    learning_rate = _learning_rate

    def load(self, batch: Sequence) -> list[jax.Array]:
        arrays = [np.asarray(x) for x in batch]
        n = len(arrays[0])
        rows = -(-n // len(self.devices)) * len(self.devices)
        arrays.append(np.ones(n, np.float32))  # the row weights
        sharding = NamedSharding(_mesh(tuple(self.devices)), PartitionSpec("data"))
        return [jax.device_put(_pad(a, rows), sharding) for a in arrays]

    def __call__(self, inputs: list[jax.Array]) -> tuple[float, float]:
        self.key, key = jax.random.split(self.key)
        self.net.params, self.trainer.state, losses = self.step(self.net.params, self.trainer.state, key, *inputs)
        mlm_value, nsp_value = np.asarray(losses).tolist()  # one host sync
        return mlm_value, nsp_value

    def reseed(self, seed: int) -> None:
        self.key = jax.random.PRNGKey(seed)


train_bert = bind(book.train_bert, PretrainStep, make_trainer)


def save_training_state(folder: str | os.PathLike, net: _Bound, trainer, step: int) -> dict[str, str]:
    """Write the model parameters and the optimizer state of step `step` into `folder`, each
    atomically; returns the file names for the resume `state.json`. (The dropout key needs no
    saving: a resumable run resets it from (seed, step) before every step.)"""
    os.makedirs(folder, exist_ok=True)
    files = {"params": step_file(step, "params"), "trainer": step_file(step, "trainer")}
    params, state = jax.device_get((net.params, trainer.state))  # waits for the steps under way
    with _steps_thread_on_the_host():
        write_params(_flatten(params), os.path.join(folder, files["params"]))
        with atomic_write(os.path.join(folder, files["trainer"]), "wb") as f:
            f.write(serialization.to_bytes(state))
    return files


def _placed_like(new, old):
    """`new`'s arrays placed as `old`'s are (one device, or replicated across several: a job's
    processes' too)."""
    return jax.tree_util.tree_map(lambda n, o: _place(n, o.sharding) if hasattr(o, "sharding") else n, new, old)


def load_training_state(folder: str | os.PathLike, files: dict[str, str], net: _Bound, trainer,
                        devices: Sequence[jax.Device]) -> None:
    """Put back what `save_training_state` wrote: parameters and optimizer state, placed as before."""
    params = _nest(read_params(os.path.join(folder, files["params"])))
    net.params = _placed_like(params, net.params)
    with open(os.path.join(folder, files["trainer"]), "rb") as f:
        state = serialization.from_bytes(jax.device_get(trainer.state), f.read())
    trainer.state = _placed_like(state, trainer.state)
