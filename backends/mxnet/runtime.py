"""What a job needs from the framework besides the model: devices, seeds, the book's loss and optimizer."""
from __future__ import annotations

import os
import random
import sys

import mxnet as mx
import numpy as np
from mxnet import gluon

from nlibert.core.distributed import JOIN_TIMEOUT_S, LaunchProcess, World
from nlibert.core.names import canonical_key, decays


def parse_devices(spec: str | None) -> list[mx.Context]:
    """'cpu', 'cuda' (every GPU), or a comma list like 'cuda:0,cuda:1'; None means every GPU, else the CPU.
    The same spellings as the torch backend, so one command line drives either."""
    from .train import try_all_gpus
    if spec is None:
        return try_all_gpus()
    num_gpus = mx.context.num_gpus()
    if spec == "cuda":
        if not num_gpus:
            raise ValueError("--device cuda: no CUDA device is available")
        return [mx.gpu(i) for i in range(num_gpus)]
    devices = []
    for part in (p.strip() for p in spec.split(",")):
        kind, _, index = part.partition(":")
        if not (index or "0").isdigit():
            raise ValueError(f"--device {spec}: {part} is not a device; use cpu, cuda or a list like cuda:0,cuda:1")
        i = int(index or 0)
        if kind == "cpu":
            devices.append(mx.cpu(i))
        elif kind in ("cuda", "gpu") and i < num_gpus:
            devices.append(mx.gpu(i))
        else:
            raise ValueError(f"--device {spec}: {part} is not available")
    return devices


# The job's dist_sync kvstore, once `init_distributed` has joined one: the trainers sum gradients
# through it, and `World.all_sum` sums through it under one integer key (the trainers' keys are the
# parameter indices 0..n-1; MXNet refuses string keys beside them).
_KVSTORE: list = [None]
_SUMS_KEY, _SUMS_WIDTH = 1 << 30, 4


def init_distributed(timeout: float = JOIN_TIMEOUT_S) -> World:
    """Join the job the environment describes for ps-lite (`DMLC_ROLE=worker`, `DMLC_PS_ROOT_URI`,
    `DMLC_PS_ROOT_PORT`, `DMLC_NUM_WORKER`, `DMLC_NUM_SERVER`; `launch_processes` sets them on one
    machine): a `dist_sync` kvstore, which sums the workers' gradients on the server(s). The rank is
    the scheduler's (the order in which workers connect); `LOCAL_RANK` picks this worker's device.
    ps-lite has no timeout: a dead worker leaves the others waiting, so a job is stopped from
    outside when one dies (`core.distributed.launch` does; `timeout` is accepted for the contract).
    Not a worker: a job of one process."""
    if os.environ.get("DMLC_ROLE") != "worker":
        return World()
    if _KVSTORE[0] is None:
        _KVSTORE[0] = mx.kv.create("dist_sync")
    kv = _KVSTORE[0]
    ready = []

    def all_sum(values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if not ready:  # a collective: every worker gets here at the same point of its loop
            kv.init(_SUMS_KEY, mx.nd.zeros(_SUMS_WIDTH, dtype="float64"))
            ready.append(True)
        padded = np.zeros(_SUMS_WIDTH)
        padded[:len(values)] = values
        total = mx.nd.array(padded, dtype="float64")
        kv.pushpull(_SUMS_KEY, total, out=total)
        return total.asnumpy()[:len(values)]  # read before the key's next round

    return World(rank=kv.rank, size=kv.num_workers, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 all_sum=all_sum, barrier=kv._barrier)


def launch_processes(nproc: int, port: int) -> list[LaunchProcess]:
    """An `nproc`-worker job on this machine: ps-lite's scheduler and one server (each just imports
    mxnet, which serves until the workers finish), and the workers, all on 127.0.0.1:`port`
    (`DMLC_NODE_HOST` too: ps-lite would otherwise pick the default route's address)."""
    common = {"DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": str(port), "DMLC_NUM_SERVER": "1",
              "DMLC_NUM_WORKER": str(nproc), "DMLC_NODE_HOST": "127.0.0.1"}
    serve = (sys.executable, "-c", "import mxnet")
    return [LaunchProcess(role, {**common, "DMLC_ROLE": role}, serve) for role in ("scheduler", "server")] + \
        [LaunchProcess(f"worker {i}", {**common, "DMLC_ROLE": "worker", "LOCAL_RANK": str(i)}) for i in range(nproc)]


def _trainer_options() -> dict:
    """A Trainer's kvstore options: in a job, the job's kvstore summing gradients, each worker
    updating its own copy (the same update everywhere; no optimizer on the server, so a schedule's
    learning rate applies at once); else Gluon's defaults."""
    if _KVSTORE[0] is None:
        return {}
    return {"kvstore": _KVSTORE[0], "update_on_kvstore": False}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def make_loss() -> gluon.loss.Loss:
    """The book's loss: per-example softmax cross-entropy."""
    return gluon.loss.SoftmaxCrossEntropyLoss()


def make_trainer(net: gluon.Block, lr: float, fused: bool = False, optimizer: str = "adam",
                 weight_decay: float = 0.0) -> gluon.Trainer:
    """The book's Adam, or with `optimizer='adamw'` AdamW's decoupled `weight_decay` on the
    parameters `core.names.decays` names (not biases, not LayerNorm weights). `fused` is accepted
    for symmetry with the torch backend: MXNet's Adam is already one `adam_update` kernel per
    parameter, and 1.9.1's multi-tensor `multi_adamw_update` took 5x as long on the CPU (measured)."""
    if optimizer == "adam":
        return gluon.Trainer(_ordered_params(net), "adam", {"learning_rate": lr}, **_trainer_options())
    if optimizer != "adamw":
        raise ValueError(f"unknown optimizer {optimizer!r}: use adam or adamw")
    return _AdamW(net, lr, weight_decay)


def _ordered_params(net: gluon.Block) -> list:
    """The net's parameters in the order of their structured names (`encoder.blks.0...`). Given
    `collect_params()`, a Trainer sorts by Gluon's generated names (`dense16_weight`), which depend
    on how many layers the process built before; the kvstore keys parameters by that position, so
    in a job every worker must list them alike. (Checkpoints key optimizer state by name anyway.)"""
    return [param for _, param in sorted(net._collect_params_with_prefix().items())]


class _AdamW(gluon.Trainer):
    """Adam with AdamW's decoupled weight decay. MXNet 1.9.1 has no AdamW, and its Adam's `wd` adds
    wd * w to the gradient (L2 regularisation, which Adam then rescales), so each update here first
    shrinks the decayed weights by lr * wd * w, as `torch.optim.AdamW` does, then takes Adam's step
    (which does not depend on the weights: the order is immaterial). `_update` is where both
    `step` and `update` (after `allreduce_grads`, for clipping) apply the optimizer."""

    def __init__(self, net: gluon.Block, lr: float, weight_decay: float) -> None:
        # update_on_kvstore=False: the updates (and so the decay) happen here, on every device's copy.
        super().__init__(_ordered_params(net), "adam", {"learning_rate": lr},
                         **{"update_on_kvstore": False, **_trainer_options()})
        self._decayed = [p for name, p in net._collect_params_with_prefix().items()
                         if decays(canonical_key(name, "mxnet"))]
        self._weight_decay = weight_decay

    def _update(self, ignore_stale_grad: bool = False) -> None:
        shrink = 1.0 - self.learning_rate * self._weight_decay
        for param in self._decayed:
            for data in param.list_data():
                data *= shrink
        super()._update(ignore_stale_grad)


def framework_versions() -> dict[str, str]:
    return {"mxnet": mx.__version__, "cpu_count": str(os.cpu_count())}


def initialize_classifier_head(net: gluon.Block, devices: list[mx.Context]) -> None:
    """As the book: only the new `output` layer is initialised (Gluon's default Uniform(0.07)), on every device."""
    net.output.initialize(ctx=devices)


def bert_outputs(bert: gluon.Block, token_ids: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray,
                 pred_positions: np.ndarray, device: mx.Context) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(encoded_X, mlm_Y_hat, nsp_Y_hat)` of a `BERTModel` outside `autograd.record` (no dropout), as numpy."""
    inputs = [mx.np.array(a, ctx=device, dtype=a.dtype) for a in (token_ids, segments, pred_positions)]
    valid = mx.np.array(valid_lens, ctx=device, dtype="float32")  # the book's valid_lens are float32
    outputs = bert(inputs[0], inputs[1], valid, inputs[2])
    return tuple(o.asnumpy() for o in outputs)


def classifier_logits(net: gluon.Block, token_ids: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray,
                      device: mx.Context) -> np.ndarray:
    """A `BERTClassifier`'s logits outside `autograd.record` (no dropout), as a numpy array."""
    inputs = (mx.np.array(token_ids, ctx=device, dtype=token_ids.dtype),
              mx.np.array(segments, ctx=device, dtype=segments.dtype),
              mx.np.array(valid_lens, ctx=device, dtype="float32"))
    return net(inputs).asnumpy()
