"""What a job needs from the framework besides the model: devices, seeds (and the backend's random
draws), the book's loss and optimizer, and joining a job of several processes (`jax.distributed`)."""
from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import os
import random
import signal
import socket
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from nlibert.core.distributed import JOIN_TIMEOUT_S, LaunchProcess, World, rank_processes
from nlibert.core.names import decays


# --- the backend's random draws: JAX has no global generator, so the backend keeps one key ---------

# `set_seed` resets it; new layers and step objects draw from it. Made at the first draw, not at
# import: a job of several processes must join `jax.distributed` before JAX starts its devices.
_KEY: list = [None]


def _next_key() -> jax.Array:
    _KEY[0], key = jax.random.split(jax.random.PRNGKey(0) if _KEY[0] is None else _KEY[0])
    return key


def parse_devices(spec: str | None) -> list[jax.Device]:
    """'cpu', 'cuda' (every GPU), or a comma list like 'cuda:0,cuda:1' ('gpu' as MXNet spells it;
    'cpu:1' where XLA was asked for several host devices); None means every GPU, else the CPU."""
    from .train import try_all_gpus
    if spec is None:
        return try_all_gpus()
    gpus = _platform_devices("gpu")
    if spec == "cuda":
        if not gpus:
            raise ValueError("--device cuda: no CUDA device is available")
        return gpus
    devices = []
    for part in (p.strip() for p in spec.split(",")):
        kind, _, index = part.partition(":")
        if not (index or "0").isdigit() or kind not in ("cpu", "cuda", "gpu"):
            raise ValueError(f"--device {spec}: {part} is not a device; use cpu, cuda or a list like cuda:0,cuda:1")
        available = _platform_devices("cpu") if kind == "cpu" else gpus
        if int(index or 0) >= len(available):
            raise ValueError(f"--device {spec}: {part} is not available")
        devices.append(available[int(index or 0)])
    return devices


def _platform_devices(platform: str) -> list[jax.Device]:
    """This process's devices of `platform` (in a job of several processes, `jax.devices` lists all)."""
    try:
        return jax.local_devices(backend=platform)
    except RuntimeError:  # no such backend in this jaxlib (a CPU-only install has no 'gpu')
        return []


def init_distributed(timeout: float = JOIN_TIMEOUT_S) -> World:
    """Join the job `launch_processes` (or any launcher setting torchrun's variables) described in
    the environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`/`MASTER_PORT`):
    `jax.distributed`, whose coordinator rank 0 serves at MASTER_ADDR:MASTER_PORT, and XLA's
    cross-process collectives (gloo over TCP on the CPU, NCCL between GPUs), so that one compiled
    step spans every process's devices (train.py). `all_sum` and `barrier` go through the
    coordinator's key-value store: exact float64 sums, no compilation, waits of `timeout` seconds at
    most. Must come before any JAX computation in the process. Without `WORLD_SIZE` > 1, a job of
    one process (nothing initialised), data-parallel over its own `--device` list if several."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    from jax._src import distributed, xla_bridge
    rank, address = int(os.environ["RANK"]), os.environ.get("MASTER_ADDR", "127.0.0.1")
    if distributed.global_state.client is None:
        if xla_bridge.backends_are_initialized():
            raise RuntimeError("init_distributed must come before any JAX computation in the process")
        jax.distributed.initialize(f"{address}:{os.environ['MASTER_PORT']}", size, rank,
                                   initialization_timeout=int(timeout))
        # The CPU client with gloo collectives, listening where the job meets when that is this machine's
        # loopback (jax's `jax_cpu_enable_gloo_collectives` would bind the host name's address).
        xla_bridge.register_backend_factory("cpu", functools.partial(_gloo_cpu_client, rank, size, address),
                                            priority=0, fail_quietly=False)
        # The coordination client catches SIGTERM (a preemption notice) and carries on; the launcher's
        # SIGTERM must end the process, as it ends the other backends' workers.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    client, wait_ms = distributed.global_state.client, int(timeout * 1000)
    sums, barriers = itertools.count(), itertools.count()  # every rank calls each in the same order

    def all_sum(values: np.ndarray) -> np.ndarray:
        values, call = np.asarray(values, dtype="<f8"), next(sums)
        client.key_value_set(f"nlibert/sum/{call}/{rank}", values.tobytes().hex())
        parts = [np.frombuffer(bytes.fromhex(client.blocking_key_value_get(f"nlibert/sum/{call}/{r}", wait_ms)),
                               "<f8").reshape(values.shape) for r in range(size)]
        if call:  # every rank has set this call's key, so has read the last call's: drop ours
            with contextlib.suppress(TypeError):  # jaxlib 0.4.23 deletes, then fails to convert its Status
                client.key_value_delete(f"nlibert/sum/{call - 1}/{rank}")
        return functools.reduce(np.add, parts).astype(np.float64)  # rank order: the same sum on every rank

    def barrier() -> None:
        client.wait_at_barrier(f"nlibert/barrier/{next(barriers)}", wait_ms)

    return World(rank=rank, size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 all_sum=all_sum, barrier=barrier)


def _gloo_cpu_client(rank: int, size: int, address: str):
    from jax._src import distributed
    from jax._src.lib import xla_client
    client = distributed.global_state.client
    hostname = address if ipaddress.ip_address(socket.gethostbyname(address)).is_loopback else None
    collectives = xla_client._xla.make_gloo_tcp_collectives(distributed_client=client, hostname=hostname)
    return xla_client.make_cpu_client(distributed_client=client, node_id=rank, num_nodes=size,
                                      collectives=collectives)


def launch_processes(nproc: int, port: int) -> list[LaunchProcess]:
    """The processes of an `nproc`-process job on this machine, as torchrun starts them: one worker
    per rank, with the environment `init_distributed` reads, meeting at 127.0.0.1:`port`."""
    return rank_processes(nproc, port)


def set_seed(seed: int) -> None:
    """Python's, numpy's and the backend's generator (new layers draw their parameters from it)."""
    random.seed(seed)
    np.random.seed(seed)
    _KEY[0] = jax.random.PRNGKey(seed)


def _cross_entropy(y_hat: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(y_hat, y)  # (B,)


def make_loss() -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The book's loss: per-example softmax cross-entropy (`optax.softmax_cross_entropy_with_integer_labels`)."""
    return _cross_entropy


def _decay_mask(params: Any) -> Any:
    """True at the leaves weight decay applies to: `core.names.decays` of their canonical names
    (the JAX backend's tree paths joined by dots)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(".".join(k.key for k in path)), params)


# One Adam (and one AdamW) for every trainer: the rate and the decay are injected hyperparameters,
# set in each trainer's state, so the transform itself does not depend on them, and a compiled step
# (cached per transform) serves every trainer and every run in the process.
_ADAM = optax.inject_hyperparams(optax.adam)(learning_rate=0.0)
_ADAMW = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
    learning_rate=0.0, weight_decay=0.0, mask=_decay_mask)


class _Trainer:
    """The book's `optax.adam(lr)` (or `optax.adamw`: decoupled `weight_decay`, masked by
    `_decay_mask`) and its state. The rate lives in the state (`inject_hyperparams`), so a schedule
    can set it between compiled steps without a recompile."""

    def __init__(self, net: Any, lr: float, optimizer: str = "adam", weight_decay: float = 0.0) -> None:
        if optimizer not in ("adam", "adamw"):
            raise ValueError(f"unknown optimizer {optimizer!r}: use adam or adamw")
        self.tx = _ADAM if optimizer == "adam" else _ADAMW
        self.state = self.tx.init(net.params)
        self.learning_rate = lr
        if optimizer == "adamw":
            self.state.hyperparams["weight_decay"] = jnp.asarray(weight_decay, jnp.float32)

    @property
    def learning_rate(self) -> float:
        return float(self.state.hyperparams["learning_rate"])

    @learning_rate.setter
    def learning_rate(self, lr: float) -> None:
        hyperparams = self.state.hyperparams
        self.state.hyperparams["learning_rate"] = jnp.asarray(lr, hyperparams["learning_rate"].dtype)


def make_trainer(net: Any, lr: float, fused: bool = False, optimizer: str = "adam",
                 weight_decay: float = 0.0) -> _Trainer:
    """The book's Adam (`optax.adam`, torch's defaults: betas 0.9, 0.999, eps 1e-8), or with
    `optimizer='adamw'` `optax.adamw`'s decoupled `weight_decay` on the parameters `core.names.decays`
    names (not biases, not LayerNorm weights). `fused` is accepted for symmetry with the torch
    backend: XLA compiles the whole update into the step."""
    return _Trainer(net, lr, optimizer, weight_decay)


def framework_versions() -> dict[str, str]:
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "platform": jax.default_backend(), "cpu_count": str(os.cpu_count())}


def initialize_classifier_head(net: Any, devices: list[jax.Device]) -> None:
    """The new `output` layer was drawn when the classifier was built (torch's default init, as the
    torch book); put the whole net on devices[0]."""
    net.params = jax.device_put(net.params, devices[0])


def bert_outputs(bert: Any, token_ids: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray,
                 pred_positions: np.ndarray, device: jax.Device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(encoded_X, mlm_Y_hat, nsp_Y_hat)` of a `BERTModel`, dropout off, as numpy arrays."""
    inputs = [jax.device_put(np.asarray(a), device) for a in (token_ids, segments, pred_positions)]
    valid = jax.device_put(np.asarray(valid_lens, np.float32), device)  # the book's valid_lens are float32
    outputs = bert(inputs[0], inputs[1], valid, inputs[2])
    return tuple(np.asarray(o, dtype=np.float32) for o in outputs)


def classifier_logits(net: Any, token_ids: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray,
                      device: jax.Device) -> np.ndarray:
    """A `BERTClassifier`'s logits, dropout off, as a numpy array."""
    inputs = tuple(jax.device_put(np.asarray(a), device) for a in (token_ids, segments))
    return np.asarray(net(inputs + (jax.device_put(np.asarray(valid_lens, np.float32), device),)), np.float32)
