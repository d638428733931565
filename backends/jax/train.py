"""Fine-tuning in JAX: the step core/training.py's epoch loop drives, and the book's `train_ch13`.

Semantics kept from d2l's JAX chapter: per-example softmax cross-entropy, its *mean* over the
batch differentiated (`optax.softmax_cross_entropy_with_integer_labels(...).mean()`), `optax.adam`,
a `jax.jit`-compiled train step and evaluation step, dropout drawn from a key split per step.
As the other backends: the sums of per-example losses and of correct predictions are what the
loop reads, in `train_ch13` after every batch (timer over training batches only), on the fast
path once per epoch; the book's two printed lines; figures returned as `EpochRecord`s.

`jit` compiles once per input shape, so batches are padded to a small set of shapes
(`_padded_size`: two sizes per doubling; rows at least `_MIN_ROWS`) with weight-0 rows and
masked columns: the trimmed, length-bucketed batches of the fast path compile a handful of
programs, not one per batch (fewer still where the run planned its widths by cost,
`core.batching.plan_widths`), and a padded row changes neither a loss, a gradient nor a count.
On one CPU device the step runs as staged programs that compile a new shape several times faster
(`_programs._staged_train_function`: one encoder block's programs serve every block alike in shape).
Several devices are data parallel: parameters and optimizer state replicated, every batch
sharded along its rows (`jax.sharding`), the gradient's mean reduced across devices by XLA.
A job of several processes (`runtime.init_distributed`, core/distributed.py) is the same program
over a mesh of every process's device: each process places its rank's shard of every global batch
(`World.training_shard`, padded to one shape on every rank), XLA's cross-process all-reduce makes the
gradient the whole batch's, and the step's sums come out already summed over the job.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nlibert.backends import backend_info
from nlibert.core import book
from nlibert.core.book import bind
from nlibert.core.batching import padded_size, rows
from nlibert.core.distributed import World
from nlibert.core.training import require_devices

from ._programs import _PerShape, _compile_ahead, _compiled, _counted, _staged_train_function
from .model import _Bound, _Classifier
from .runtime import _next_key

PRECISIONS = backend_info("jax").precisions  # the registry lists each backend's


def try_all_gpus() -> list[jax.Device]:
    """Every GPU, or `[cpu]` when there is none (never `[]`, unlike d2l master)."""
    from .runtime import _platform_devices
    return _platform_devices("gpu") or [jax.devices("cpu")[0]]


_padded_size = padded_size  # the ladder of compiled widths and rows (core's: the fast path plans on it)
# Rows of a training or evaluation batch are padded to at least this many: a run's last, short
# batch then shares the full batches' program (at 32 rows, the default) instead of adding one.
_MIN_ROWS = 32
def _pad(a: np.ndarray, rows: int, width: int | None = None) -> np.ndarray:
    """`a` with zero rows (and columns) appended up to `rows` (and `width`)."""
    pad = [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
    if width is not None:
        pad[1] = (0, width - a.shape[1])
    return np.pad(a, pad)


def _prepare(features: Sequence, labels, devices: list[jax.Device], max_len: int,
             micro_batch: int | None = None, world: World = World(), min_rows: int = 1) -> tuple[jax.Array, ...]:
    """A batch as (chunks, rows, ...) arrays on the devices, sharded along the rows: tokens,
    segments, valid lengths (float32, as the book), labels, and weights (1 real, 0 padding).
    Rows are padded to a size from `_padded_size` (at least `min_rows`), a multiple of the device
    count (of `micro_batch` rows per device, with it); columns up to `_padded_size` (at most
    `max_len`), which leaves a width the fast path planned (`core.batching.plan_widths`) as it is.
    In a `world` of several processes, `devices` are the job's, one per rank, and this process
    places its rank's rows alone (`World.training_shard`), padded to the per-device rows every
    rank computes alike from the global batch: the same shapes, and programs, on every rank."""
    tokens, segments, valid_lens = (np.asarray(x) for x in features)
    labels = np.asarray(labels).astype(np.int32)
    n, width = len(labels), tokens.shape[1]
    width = min(_padded_size(width), max_len) if width <= max_len else width  # too wide: the model says so
    ndev = len(devices)
    per_device = micro_batch if micro_batch is not None else -(-_padded_size(max(n, min_rows)) // ndev)
    chunks = -(-n // (ndev * per_device))
    start, stop = world.training_shard(n) if world.size > 1 else (0, n)
    placed = chunks * per_device * (ndev if world.size == 1 else 1)  # the rows this process places
    arrays = [_pad(tokens[start:stop], placed, width), _pad(segments[start:stop], placed, width),
              _pad(valid_lens[start:stop].astype(np.float32), placed), _pad(labels[start:stop], placed),
              _pad(np.ones(stop - start, np.float32), placed)]
    sharding = NamedSharding(_mesh(tuple(devices)), PartitionSpec(None, "data"))
    if world.size == 1:
        return tuple(jax.device_put(a.reshape(chunks, -1, *a.shape[1:]), sharding) for a in arrays)
    return tuple(jax.make_array_from_single_device_arrays(
        (chunks, ndev * per_device, *a.shape[1:]), sharding,
        [jax.device_put(a.reshape(chunks, per_device, *a.shape[1:]), devices[world.rank])]) for a in arrays)


@functools.lru_cache(maxsize=None)
def _mesh(devices: tuple[jax.Device, ...]) -> Mesh:
    return Mesh(np.array(devices), ("data",))


def _replicate(tree, devices: list[jax.Device]):
    """Parameters (or optimizer state) copied to every device (in a job of several processes, to
    every rank's: arrays there already are left as they are)."""
    sharding = NamedSharding(_mesh(tuple(devices)), PartitionSpec())
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(lambda a: a if getattr(a, "sharding", None) == sharding else _place(a, sharding),
                                  tree)


def _place(value, sharding: jax.sharding.Sharding) -> jax.Array:
    """`value` (an array, or a replicated array of another placement) placed as `sharding` says,
    also where that spans other processes' devices (which `jax.device_put` refuses): this process
    places its devices' parts, and every process must hold the same `value`."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _local(tree):
    """This process's copy of replicated arrays (what it can compute with alone)."""
    return jax.tree_util.tree_map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


def _job_devices(device: jax.Device, world: World) -> list[jax.Device]:
    """The device of every rank of `world`, in rank order (`device` is this rank's): the job's mesh.
    Its `all_sum` also brings the ranks together before their first collective over it, which XLA's
    CPU runtime gives 30 s to meet."""
    ids = np.zeros(world.size)
    ids[world.rank] = device.id
    by_id = {d.id: d for d in jax.devices()}
    return [by_id[int(i)] for i in world.all_sum(ids)]


def _from_rank_0(tree, devices: list[jax.Device], world: World):
    """Rank 0's arrays of `tree` (every rank has one of the same shapes), replicated on the job's
    `devices`. One collective over one device per process: a collective over several devices of
    each process (`multihost_utils.broadcast_one_to_all`'s) can deadlock XLA's CPU runtime."""
    rows = NamedSharding(_mesh(tuple(devices)), PartitionSpec("data"))
    stacked = jax.tree_util.tree_map(lambda a: jax.make_array_from_single_device_arrays(
        (world.size, *np.shape(a)), rows, [jax.device_put(np.asarray(a)[None], devices[world.rank])]), tree)
    return _first_rows(tuple(devices))(stacked)


@functools.lru_cache(maxsize=None)
def _first_rows(devices: tuple[jax.Device, ...]) -> Callable:
    return jax.jit(lambda tree: jax.tree_util.tree_map(lambda a: a[0], tree),
                   out_shardings=NamedSharding(_mesh(devices), PartitionSpec()))


def split_batch_multi_inputs(X: Sequence, y, devices: Sequence[jax.Device]
                             ) -> tuple[list[tuple[jax.Array, ...]], list[jax.Array]]:
    """Split every input of a batch, and its labels, along the batch axis across `devices`: one
    `(tokens, segments, valid_lens)` tuple and one label array per device (slices may differ in
    size by one; a batch with fewer examples than devices uses only the first ones). The MXNet
    book's helper; this backend shards whole batches with `jax.sharding` instead."""
    devices = list(devices)[:len(y)]
    chunks = [np.array_split(np.asarray(a), len(devices)) for a in (*X, y)]
    X_shards = [tuple(jax.device_put(chunk[i], d) for chunk in chunks[:-1]) for i, d in enumerate(devices)]
    return X_shards, [jax.device_put(chunks[-1][i], d) for i, d in enumerate(devices)]


@functools.lru_cache(maxsize=None)
def _eval_function(module) -> Callable:
    """Compiled: the number of correct predictions of a prepared batch, dropout off."""
    def count(params, tokens, segments, valid_lens, labels, weights):
        logits = module.apply({"params": params}, tokens[0], segments[0], valid_lens[0], training=False)
        return ((logits.argmax(axis=-1) == labels[0]) * weights[0]).sum()
    return _PerShape(jax.jit(count))


def evaluate_accuracy(net: _Bound, data_iter: Iterable, devices: Sequence[jax.Device],
                      split_f: Callable | None = None) -> float:
    """Accuracy over `data_iter` with dropout off; each batch sharded across `devices` (`split_f`
    is accepted as the MXNet book's and not called). Counts stay on the device until the end."""
    devices = require_devices(devices)
    correct, total = _count_correct(net, _replicate(net.params, devices), data_iter, devices, World())
    return correct / total if total else float("nan")


def _count_correct(net: _Bound, params, data_iter: Iterable, devices: list[jax.Device],
                   world: World) -> tuple[float, float]:
    """(number correct, number of examples) over `data_iter`, summed over the ranks of `world`, each
    of which computes its shard of every batch on its own `devices` (no collective per batch)."""
    count, correct, total = _eval_function(net.module), [], 0
    for features, labels in data_iter:
        start, stop = world.shard(len(labels))
        if stop > start:
            batch = _prepare(rows(features, start, stop), np.asarray(labels)[start:stop], devices,
                             net.config.max_len, min_rows=_MIN_ROWS)
            with _counted():
                correct.append(count(params, *batch))
            total += stop - start
    correct = float(np.sum(np.asarray(jnp.stack(correct), np.float64))) if correct else 0.0
    correct, total = world.all_sum(np.array([correct, total], dtype=np.float64))
    return float(correct), float(total)


@functools.lru_cache(maxsize=None)
def _train_function(module, loss: Callable, tx: optax.GradientTransformation, donate: bool,
                    max_grad_norm: float | None = None, job: tuple[jax.Device, ...] | None = None) -> Callable:
    """Compiled: one optimizer step on a prepared batch. Each chunk's gradient of its summed loss is
    added up (`lax.scan`: one chunk's activations alive at a time), divided by the number of real
    rows (the JAX book's mean loss), clipped to a global norm of `max_grad_norm` if given
    (`optax.clip_by_global_norm`), and applied by `tx`; returns the new parameters and state and
    the loss sum and number correct, as device scalars. For the devices of a `job` of several
    processes, the key is one per rank (rows of a (ranks, 2) array; the step draws from rank 0's,
    a one-process run's) and every output is replicated on every rank's device."""
    # Clipping keeps no state: applied to the gradient here, the trainer's state stays `tx`'s alone.
    clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm is not None else None
    def chunk_gradient(params, key, tokens, segments, valid_lens, labels, weights):
        def summed_loss(p):
            logits = module.apply({"params": p}, tokens, segments, valid_lens, training=True, rngs={"dropout": key})
            losses = loss(logits, labels) * weights
            return losses.sum(), (losses.sum(), ((logits.argmax(axis=-1) == labels) * weights).sum())
        grads, sums = jax.grad(summed_loss, has_aux=True)(params)
        return grads, sums

    def step(params, opt_state, key, tokens, segments, valid_lens, labels, weights):
        keys = jax.random.split(key if key.ndim == 1 else key[0], tokens.shape[0])
        if tokens.shape[0] == 1:
            grads, (loss_sum, correct) = chunk_gradient(params, keys[0], tokens[0], segments[0], valid_lens[0],
                                                        labels[0], weights[0])
        else:
            def add_chunk(carry, chunk):
                grads, sums = chunk_gradient(params, *chunk)
                return jax.tree_util.tree_map(jnp.add, carry, (grads, sums)), None
            zero = (jax.tree_util.tree_map(jnp.zeros_like, params), (jnp.zeros(()), jnp.zeros(())))
            (grads, (loss_sum, correct)), _ = jax.lax.scan(
                add_chunk, zero, (keys, tokens, segments, valid_lens, labels, weights))
        grads = jax.tree_util.tree_map(lambda g: g / weights.sum(), grads)
        if clip is not None:
            grads, _ = clip.update(grads, clip.init(params))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss_sum, correct

    # Donated buffers are reused for the new parameters (no second copy in device memory); the CPU
    # runtime cannot donate and would warn on every step.
    if job is None:
        return _PerShape(jax.jit(step, donate_argnums=(0, 1) if donate else ()))
    replicated = NamedSharding(_mesh(job), PartitionSpec())
    return _PerShape(jax.jit(step, donate_argnums=(0, 1) if donate else (), out_shardings=replicated))


def _staged_pays(module) -> bool:
    """Whether a classifier's step compiles faster staged (`_staged_train_function`): where at least
    two blocks share one block's programs. With two blocks nothing is shared, and one program ran the
    book path's large batches (bert.small, 512 x 128) a fifth faster than the staged ones."""
    return isinstance(module, _Classifier) and dict(module.config)["num_layers"] >= 3


class _Sums:
    """Device scalars, one per step, added up lazily: `a + b` queues nothing and syncs nothing,
    and `read` adds them in float64 on the host, so an epoch's sums do not depend on where a
    checkpoint split it (JAX computes in float32 unless x64 is switched on process-wide)."""

    def __init__(self, parts: list[jax.Array]) -> None:
        self.parts = parts

    def __add__(self, other: "_Sums") -> "_Sums":
        return _Sums(self.parts + other.parts)

    def __radd__(self, other: "_Sums | int") -> "_Sums":
        return self if isinstance(other, int) and other == 0 else _Sums(other.parts + self.parts)  # sum()'s 0

    def total(self) -> float:  # this process's copy: a job's step sums are replicated on every rank's device
        return float(np.sum(np.asarray(jnp.stack([p.addressable_data(0) for p in self.parts]), np.float64)))


def _read(sums: tuple[_Sums, _Sums]) -> tuple[float, float]:
    """Both numbers in one host read, which waits for every step they came from."""
    return sums[0].total(), sums[1].total()


def train_batch_ch13(net: _Bound, X, y, loss: Callable, trainer, devices: Sequence[jax.Device],
                     split_f: Callable | None = None) -> tuple[float, float]:
    """One optimizer step on one batch; returns (sum of per-example losses, number correct)."""
    step = FinetuneStep(net, loss, trainer, devices, split_f)
    return _read(step(X, y))


# A step object's `learning_rate` (FinetuneStep here, PretrainStep in pretrain.py): its trainer's rate.
_learning_rate = property(lambda step: step.trainer.learning_rate,
                          lambda step, lr: setattr(step.trainer, "learning_rate", lr))


class FinetuneStep:
    """core/training.py's step: the net's parameters and the trainer's state replicated on `devices`,
    each call one compiled step of `train_batch_ch13`'s with the sums left on the device. `split_f`
    is accepted as the MXNet book's argument and not called (batches are sharded); `graph` is
    accepted for symmetry (every step is a compiled XLA program already). In a `world` of several
    processes (`init_distributed`), this process drives its one device of a mesh of every rank's:
    rank 0's parameters and optimizer state replicated on all of them, each call places this rank's
    shard of the global batch, and the step's sums (`read`) and `evaluate` are the whole job's."""

    def __init__(self, net: _Bound, loss: Callable, trainer, devices: Sequence[jax.Device],
                 split_f: Callable | None = None, *, precision: str = "float32", graph: bool = False,
                 micro_batch: int | None = None, max_grad_norm: float | None = None,
                 world: World | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not supported by the JAX backend: use one of {PRECISIONS}")
        self.devices = require_devices(devices)
        self.net, self.trainer, self.micro_batch, self.world = net, trainer, micro_batch, world or World()
        self.mesh_devices = self.devices  # those the step's program spans: the job's, one per rank
        if self.world.size > 1:
            if len(self.devices) > 1:
                raise ValueError(f"a process of a distributed job drives one device, got {len(self.devices)}")
            self.mesh_devices = _job_devices(self.devices[0], self.world)
            # Every rank starts from rank 0's parameters and state (as DDP broadcasts them).
            net.params, trainer.state = _from_rank_0((net.params, trainer.state), self.mesh_devices, self.world)
        net.params = _replicate(net.params, self.mesh_devices)
        trainer.state = _replicate(trainer.state, self.mesh_devices)
        donate = self.devices[0].platform != "cpu"
        if len(self.mesh_devices) == 1 and not donate and _staged_pays(net.module):
            self.train = _staged_train_function(net.module, loss, trainer.tx, max_grad_norm)  # one CPU device
        else:
            self.train = _train_function(net.module, loss, trainer.tx, donate, max_grad_norm,
                                         tuple(self.mesh_devices) if self.world.size > 1 else None)
        self.key = _next_key()  # dropout keys: from the backend's generator (`set_seed`), new for every step object
        self._compiled_before = dict(_compiled)

    @property
    def compiles(self) -> dict:
        """The training and evaluation programs this process compiled since the step was made, the
        seconds spent tracing, lowering and compiling them, and how many of them a persistent
        compilation cache gave (`from_cache`; metrics.json's fast_path records them)."""
        return {key: round(_compiled[key] - self._compiled_before[key], 2) for key in _compiled}

    def _prepared(self, features, labels) -> tuple[jax.Array, ...]:
        return _prepare(features, labels, self.mesh_devices, self.net.config.max_len, self.micro_batch, self.world,
                        _MIN_ROWS)

    def __call__(self, features, labels) -> tuple[_Sums, _Sums]:
        batch = self._prepared(features, labels)
        self.key, key = jax.random.split(self.key)
        if self.world.size > 1:  # each rank's key, one row each; what a restore or a new rate left on this device
            key = jax.make_array_from_single_device_arrays(
                (self.world.size, *key.shape), NamedSharding(_mesh(tuple(self.mesh_devices)), PartitionSpec("data")),
                [jax.device_put(key[None], self.devices[0])])
            self.net.params = _replicate(self.net.params, self.mesh_devices)
            self.trainer.state = _replicate(self.trainer.state, self.mesh_devices)
        with _counted():
            self.net.params, self.trainer.state, loss_sum, correct = self.train(
                self.net.params, self.trainer.state, key, *batch)
        return _Sums([loss_sum]), _Sums([correct])

    learning_rate = _learning_rate

    def read(self, sums: tuple[_Sums, _Sums]) -> tuple[float, float]:
        return _read(sums)  # a job's: the step's program summed them over every rank's rows

    def evaluate(self, data_iter: Iterable) -> float:
        if self.world.size == 1:
            return evaluate_accuracy(self.net, data_iter, self.devices)
        correct, total = _count_correct(self.net, _local(self.net.params), data_iter, self.devices, self.world)
        return correct / total if total else float("nan")

    def reseed(self, seed: int) -> None:
        self.key = jax.random.PRNGKey(seed)

    def compile_ahead(self, train_batches: Sequence, eval_batches: Sequence = ()) -> None:
        """Compile the step's and evaluation's programs for batches like these, on a thread of its
        own, while the first steps run (a short run spent most of its time waiting for compiles:
        issue 28). One process only: a job's ranks compile as they reach a shape."""
        if self.world.size > 1:
            return
        def abstract(tree):  # shapes and placements: what compiling needs, holding no buffer a step may donate
            return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
        params, state = abstract((self.net.params, self.trainer.state))
        key = self.key  # as the steps' keys are: on the first device, not committed to it
        eval_params = abstract(_replicate(self.net.params, self.devices))
        count = _eval_function(self.net.module)
        train = [(self.train.ahead, (params, state, key, *self._prepared(features, labels)))
                 for features, labels in train_batches]
        evaluation = [(count.ahead, (eval_params, *_prepare(features, labels, self.devices, self.net.config.max_len,
                                                            min_rows=_MIN_ROWS))) for features, labels in eval_batches]
        # The first step compiles the first batch's programs itself; meanwhile this thread compiles
        # the update (staged: one program of its own), then the next shapes': two compiles at once.
        update = [(self.train.ahead_update, (params, state))] if hasattr(self.train, "ahead_update") else []
        _compile_ahead(update + train[1:] + evaluation + train[:1], gated=self.devices[0].platform == "cpu")


train_ch13 = bind(book.train_ch13, FinetuneStep)
train_fast = bind(book.train_fast, FinetuneStep)

@functools.lru_cache(maxsize=None)
def _proba_function(module) -> Callable:
    return jax.jit(lambda params, tokens, segments, valid_lens: jax.nn.softmax(
        module.apply({"params": params}, tokens, segments, valid_lens, training=False), axis=-1))


def _probabilities(net: _Bound, token_ids: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray,
                   device: jax.Device) -> np.ndarray:
    """One batch's class probabilities (dropout off), padded to a compiled shape and cut back."""
    tokens, segs, lens, _, _ = (a[0] for a in _prepare((token_ids, segments, valid_lens), np.zeros(len(valid_lens)),
                                                       [device], net.config.max_len))
    params = jax.device_put(net.params, device)  # no copy once they live there
    return np.asarray(_proba_function(net.module)(params, tokens, segs, lens))[:len(valid_lens)]


predict_proba = bind(book.predict_proba, _probabilities, np.asarray)
