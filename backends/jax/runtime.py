"""What a job needs from the framework besides the model: devices, seeds (and the backend's random
draws), the book's loss and optimizer."""
from __future__ import annotations

import os
import random
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from nlibert.core.distributed import JOIN_TIMEOUT_S, LaunchProcess, World
from nlibert.core.names import decays


# --- the backend's random draws: JAX has no global generator, so the backend keeps one key ---------

_KEY = [jax.random.PRNGKey(0)]  # `set_seed` resets it; new layers and step objects draw from it


def _next_key() -> jax.Array:
    _KEY[0], key = jax.random.split(_KEY[0])
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
    try:
        return jax.devices(platform)
    except RuntimeError:  # no such backend in this jaxlib (a CPU-only install has no 'gpu')
        return []


def init_distributed(timeout: float = JOIN_TIMEOUT_S) -> World:
    """One process, always: this backend trains data-parallel over the local devices of one process
    (`--device cuda:0,cuda:1`, or `cpu:0,cpu:1` under XLA's host device count), with XLA's own
    all-reduce. A job of several processes (`jax.distributed`) is not built yet: refused by name."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(_ONE_PROCESS)
    return World()


def launch_processes(nproc: int, port: int) -> list[LaunchProcess]:
    """Refused: see `init_distributed`."""
    raise ValueError(_ONE_PROCESS)


_ONE_PROCESS = ("--nproc: the jax backend runs as one process, data-parallel over that process's devices "
                "(--device cuda:0,cuda:1); use --backend torch or mxnet for a job of several processes")


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
