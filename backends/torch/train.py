"""Fine-tuning in PyTorch: the step core/training.py's epoch loop drives, and the book's `train_ch13`.

Semantics kept from d2l: per-example cross-entropy summed before `backward()` (so the gradient is
a sum over the batch, not a mean), `nn.DataParallel` across GPUs, and, in `train_ch13`, the sums
read after every batch, the timer over training batches only and the two summary lines at the
end. Changed: no Animator (figures are returned as `EpochRecord`s instead), no `num_batches // 5`
plotting step (which divided by zero with fewer than 5 batches), and `try_all_gpus()` falls back
to the CPU as r0.17 does.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nlibert.backends import backend_info
from nlibert.core import book
from nlibert.core.book import bind
from nlibert.core.batching import chunk_bounds, rows
from nlibert.core.distributed import World
from nlibert.core.training import require_devices

PRECISIONS = backend_info("torch").precisions  # the registry lists each backend's


def try_all_gpus() -> list[torch.device]:
    """Every CUDA device, or `[cpu]` when there is none (never `[]`, unlike d2l master)."""
    n = torch.cuda.device_count()
    return [torch.device(f"cuda:{i}") for i in range(n)] if n else [torch.device("cpu")]


def _to_device(x, device: torch.device):
    """numpy arrays, tensors, or (nested) lists/tuples of them, as tensors on `device`."""
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(t, device) for t in x)
    return torch.as_tensor(x).to(device, non_blocking=True)


def split_batch_multi_inputs(X: Sequence, y, devices: Sequence[torch.device]
                             ) -> tuple[list[tuple[torch.Tensor, ...]], list[torch.Tensor]]:
    """Split every input of a batch, and its labels, along the batch axis across `devices`: one
    `(tokens, segments, valid_lens)` tuple and one label tensor per device (slices may differ in
    size by one; a batch with fewer examples than devices uses only the first ones). The book's
    MXNet helper; torch's `nn.DataParallel` splits batches the same way by itself."""
    devices = list(devices)[:len(y)]
    chunks = [torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).tensor_split(len(devices))
              for a in (*X, y)]
    X_shards = [tuple(chunk[i].to(d) for chunk in chunks[:-1]) for i, d in enumerate(devices)]
    return X_shards, [chunks[-1][i].to(d) for i, d in enumerate(devices)]


def _correct(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Number of rows whose argmax equals the label, as a 0-d tensor (no host sync)."""
    return (y_hat.argmax(dim=1) == y.to(torch.long)).sum()


def evaluate_accuracy(net: nn.Module, data_iter: Iterable, devices: Sequence[torch.device],
                      split_f: Callable | None = None) -> float:
    """Accuracy over `data_iter` in eval mode (dropout off), without building a graph. `split_f` is
    accepted as the MXNet book's; `nn.DataParallel` splits the batches of a wrapped net itself."""
    correct, total = _count_correct(net, data_iter, require_devices(devices)[0], World())
    return correct / total if total else float("nan")


def _count_correct(net: nn.Module, data_iter: Iterable, device: torch.device, world: World) -> tuple[float, float]:
    """(number correct, number of examples) over `data_iter` in eval mode, summed over the ranks of
    `world`, each of which computes its shard of every batch."""
    was_training = net.training
    net.eval()
    correct, total = torch.zeros((), dtype=torch.long, device=device), 0
    with torch.no_grad():
        for X, y in data_iter:
            start, stop = world.shard(len(y))
            if stop > start:
                X, y = _to_device(rows(X, start, stop), device), _to_device(y[start:stop], device)
                correct += _correct(net(X), y)
                total += y.numel()
    net.train(was_training)
    correct, total = world.all_sum(np.array([correct.item(), total], dtype=np.float64))
    return float(correct), float(total)


def _autocast(device: torch.device, precision: str):
    """bfloat16 autocast on the device (matmuls in bf16, reductions in float32), or a no-op."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {PRECISIONS}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def _step(model: nn.Module, X, y, loss: nn.Module, trainer: torch.optim.Optimizer, device: torch.device,
          precision: str = "float32", micro_batch: int | None = None, max_grad_norm: float | None = None,
          world: World = World()) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: per-example losses (`loss` has reduction='none', as the book) summed,
    `backward`, `trainer.step()`; the loss sum and the number correct as 0-d tensors on the device.
    With `micro_batch`, chunk by chunk: `backward` adds each chunk's gradient to the last. With
    `max_grad_norm`, the gradient is clipped first, to the norm the other backends' mean gradient
    would have: the summed gradient is the mean's len(y) times. In a job of several processes
    (`model` in DDP), this rank computes its shard of the batch (core/distributed.py); its sums are
    its shard's."""
    batch_rows = len(y)
    start, stop = world.training_shard(batch_rows)
    X, y = _to_device(rows(X, start, stop), device), _to_device(y[start:stop], device).to(torch.long)
    model.train()
    trainer.zero_grad(set_to_none=True)
    loss_sum, correct = 0, 0
    chunks = chunk_bounds(len(y), micro_batch)
    for i, (start, stop) in enumerate(chunks):
        # DDP all-reduces the gradient once, after the last chunk's backward.
        sync = model.no_sync() if isinstance(model, DDP) and i < len(chunks) - 1 else contextlib.nullcontext()
        with sync:
            with _autocast(device, precision):
                pred = model(rows(X, start, stop))  # (chunk, num_classes)
            l = loss(pred.float(), y[start:stop])  # (chunk,)
            # DDP averages the ranks' gradients; the book's is the sum over the whole batch.
            (l.sum() * world.size).backward()
        # The loss sum in float64: steps' sums then add up to the same total however a run is split
        # into segments by checkpoints (float32 addition would depend on where the host read it).
        loss_sum = loss_sum + l.detach().sum(dtype=torch.float64)
        correct = correct + _correct(pred.detach(), y[start:stop])
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm * batch_rows)
    trainer.step()
    return loss_sum, correct


def _read(sums: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """One host sync for both numbers; it waits for every step queued before (same stream)."""
    loss_sum, correct = torch.stack([sums[0].double(), sums[1].double()]).tolist()
    return loss_sum, correct


def train_batch_ch13(net: nn.Module, X, y, loss: nn.Module, trainer: torch.optim.Optimizer,
                     devices: Sequence[torch.device], split_f: Callable | None = None) -> tuple[float, float]:
    """One optimizer step on one batch; returns (sum of per-example losses, number correct)."""
    return _read(_step(net, X, y, loss, trainer, require_devices(devices)[0]))


def _set_learning_rate(step, lr: float) -> None:
    for group in step.trainer.param_groups:
        group["lr"] = lr


# A step object's `learning_rate` (FinetuneStep here, PretrainStep in pretrain.py): its trainer's rate.
_learning_rate = property(lambda step: step.trainer.param_groups[0]["lr"], _set_learning_rate)


class FinetuneStep:
    """core/training.py's step: the net on devices[0], in `nn.DataParallel` across several GPUs (as the
    book) or `torch.compile`d with `graph` (one device); each call is `train_batch_ch13`'s step with
    the sums left on the device. `split_f` is accepted as the MXNet book's argument and not called:
    DataParallel splits the batch. In a `world` of several processes (`init_distributed`), the net
    is in `DistributedDataParallel` on this process's one device, each rank computes its shard of
    every batch, and `read` and `evaluate` give the whole job's figures."""

    def __init__(self, net: nn.Module, loss: nn.Module, trainer: torch.optim.Optimizer,
                 devices: Sequence[torch.device], split_f: Callable | None = None, *, precision: str = "float32",
                 graph: bool = False, micro_batch: int | None = None, max_grad_norm: float | None = None,
                 world: World | None = None) -> None:
        self.devices = require_devices(devices)
        _autocast(self.devices[0], precision)  # validates the name
        self.loss, self.trainer, self.precision, self.micro_batch = loss, trainer, precision, micro_batch
        self.max_grad_norm, self.world = max_grad_norm, world or World()
        net.to(self.devices[0])
        self.net = self.model = net
        if self.world.size > 1:
            if len(self.devices) > 1:
                raise ValueError(f"a process of a distributed job drives one device, got {len(self.devices)}")
            device = self.devices[0]
            if device.type == "cuda":
                torch.cuda.set_device(device)
            # Every rank starts from rank 0's parameters (DDP broadcasts them here).
            self.model = DDP(net, device_ids=[device] if device.type == "cuda" else None)
            if graph:
                self.model = torch.compile(self.model, dynamic=True)
        elif len(self.devices) > 1 and all(d.type == "cuda" for d in self.devices):
            if graph:
                raise ValueError("graph=True (torch.compile) is for one device; nn.DataParallel replicates the net")
            self.model = nn.DataParallel(net, device_ids=self.devices).to(self.devices[0])
        elif graph:
            self.model = torch.compile(net, dynamic=True)

    def __call__(self, features, labels) -> tuple[torch.Tensor, torch.Tensor]:
        return _step(self.model, features, labels, self.loss, self.trainer, self.devices[0], self.precision,
                     self.micro_batch, self.max_grad_norm, self.world)

    learning_rate = _learning_rate

    def read(self, sums: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
        loss_sum, correct = self.world.all_sum(np.array(_read(sums)))
        return float(loss_sum), float(correct)

    def evaluate(self, data_iter: Iterable) -> float:
        # DDP's module itself (evaluating needs no gradient sync); DataParallel splits the batches.
        net = self.net if self.world.size > 1 else self.model
        correct, total = _count_correct(net, data_iter, self.devices[0], self.world)
        return correct / total if total else float("nan")

    def reseed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def compile_ahead(self, train_batches: Sequence, eval_batches: Sequence = ()) -> None:
        """Nothing to do: this backend compiles no program per batch shape ahead (JAX's does)."""


train_ch13 = bind(book.train_ch13, FinetuneStep)
train_fast = bind(book.train_fast, FinetuneStep)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _probabilities(net: nn.Module, token_ids: np.ndarray, segments: np.ndarray, valid_lens: np.ndarray,
                   device: torch.device) -> np.ndarray:
    """One batch's class probabilities, in eval mode (dropout off), without building a graph."""
    was_training = net.training
    net.eval()
    with torch.no_grad():
        probabilities = torch.softmax(net(_to_device((token_ids, segments, valid_lens), device)).float(), dim=-1)
    net.train(was_training)
    return probabilities.cpu().numpy()


predict_proba = bind(book.predict_proba, _probabilities, _as_numpy)
