"""The book's multi-device fine-tuning loop (`train_ch13`) and its helpers, in PyTorch.

Semantics kept from d2l: per-example cross-entropy summed before `backward()` (so the gradient is
a sum over the batch, not a mean), `nn.DataParallel` across GPUs, the timer covering training
batches only, and the two summary lines printed at the end. Changed: no Animator (figures are
returned as `EpochRecord`s instead), no `num_batches // 5` plotting step (which divided by zero
with fewer than 5 batches), and `try_all_gpus()` falls back to the CPU as r0.17 does.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from nlibert.core.training import Accumulator, EpochRecord, Timer, format_summary


def try_all_gpus() -> list[torch.device]:
    """Every CUDA device, or `[cpu]` when there is none (never `[]`, unlike d2l master)."""
    n = torch.cuda.device_count()
    return [torch.device(f"cuda:{i}") for i in range(n)] if n else [torch.device("cpu")]


def _to_device(x, device: torch.device):
    """numpy arrays, tensors, or (nested) lists/tuples of them, as tensors on `device`."""
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(t, device) for t in x)
    return torch.as_tensor(x).to(device, non_blocking=True)


def _correct(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Number of rows whose argmax equals the label, as a 0-d tensor (no host sync)."""
    return (y_hat.argmax(dim=1) == y.to(torch.long)).sum()


def evaluate_accuracy(net: nn.Module, data_iter: Iterable, devices: Sequence[torch.device]) -> float:
    """Accuracy over `data_iter` in eval mode (dropout off), without building a graph."""
    was_training = net.training
    net.eval()
    correct, total = torch.zeros((), dtype=torch.long, device=devices[0]), 0
    with torch.no_grad():
        for X, y in data_iter:
            X, y = _to_device(X, devices[0]), _to_device(y, devices[0])
            correct += _correct(net(X), y)
            total += y.numel()
    net.train(was_training)
    return correct.item() / total if total else float("nan")


def train_batch_ch13(net: nn.Module, X, y, loss: nn.Module, trainer: torch.optim.Optimizer,
                     devices: Sequence[torch.device]) -> tuple[float, float]:
    """One optimizer step on one batch; returns (sum of per-example losses, number correct)."""
    X, y = _to_device(X, devices[0]), _to_device(y, devices[0]).to(torch.long)
    net.train()
    trainer.zero_grad()
    pred = net(X)  # (B, num_classes)
    l = loss(pred, y)  # (B,): the loss must be built with reduction='none', as the book
    l.sum().backward()
    trainer.step()
    # One host sync for both numbers; it also makes the caller's per-batch timing honest on a GPU.
    loss_sum, correct = torch.stack([l.detach().sum().float(), _correct(pred.detach(), y).float()]).tolist()
    return loss_sum, correct


def train_ch13(net: nn.Module, train_iter: Iterable, test_iter: Iterable | None, loss: nn.Module,
               trainer: torch.optim.Optimizer, num_epochs: int, devices: Sequence[torch.device],
               verbose: bool = True, on_epoch: Callable[[EpochRecord], None] | None = None
               ) -> list[EpochRecord]:
    """Train for `num_epochs`, testing after each; print the book's two lines; return per-epoch records.

    With more than one CUDA device the net is wrapped in `nn.DataParallel` (the batch is split
    across them, as the book); the caller's `net` keeps the trained weights either way.
    `on_epoch`, if given, is called with each epoch's record as soon as it is known.
    """
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty: pass at least one device (try_all_gpus() never returns [])")
    net.to(devices[0])
    model = net
    if len(devices) > 1 and all(d.type == "cuda" for d in devices):
        model = nn.DataParallel(net, device_ids=devices).to(devices[0])
    records: list[EpochRecord] = []
    for epoch in range(1, num_epochs + 1):
        # Sum of training loss, no. of correct predictions, no. of examples, no. of predictions
        metric, timer = Accumulator(4), Timer()
        for features, labels in train_iter:
            timer.start()
            l, acc = train_batch_ch13(model, features, labels, loss, trainer, devices)
            timer.stop()
            n = int(np.prod(np.shape(labels)))
            metric.add(l, acc, len(labels), n)
        if metric[2] == 0:
            raise ValueError("train_iter yielded no batches")
        test_acc = evaluate_accuracy(model, test_iter, devices) if test_iter is not None else float("nan")
        record = EpochRecord.from_sums(epoch, metric[0], metric[1], int(metric[2]), test_acc, timer.sum())
        record.train_acc = metric[1] / metric[3]  # the book divides by predictions, not examples
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    if verbose and records:
        print(format_summary(records, str(devices)))
    return records


PRECISIONS = ("float32", "bfloat16")


def _autocast(device: torch.device, precision: str):
    """bfloat16 autocast on the device (matmuls in bf16, reductions in float32), or a no-op."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {PRECISIONS}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def train_batch_fast(net: nn.Module, X, y, loss: nn.Module, trainer: torch.optim.Optimizer,
                     devices: Sequence[torch.device], precision: str = "float32"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`train_batch_ch13`'s step (summed per-example loss, `backward`, `trainer.step()`), but the loss
    sum and the number correct come back as 0-d tensors on the device: no host synchronisation."""
    X, y = _to_device(X, devices[0]), _to_device(y, devices[0]).to(torch.long)
    trainer.zero_grad(set_to_none=True)
    with _autocast(devices[0], precision):
        pred = net(X)  # (B, num_classes)
    l = loss(pred.float(), y)  # (B,), reduction='none' as the book
    l.sum().backward()
    trainer.step()
    return l.detach().sum(), _correct(pred.detach(), y)


def train_fast(net: nn.Module, train_iter: Iterable, test_iter: Iterable | None, loss: nn.Module,
               trainer: torch.optim.Optimizer, num_epochs: int, devices: Sequence[torch.device], *,
               precision: str = "float32", graph: bool = False, verbose: bool = True,
               on_epoch: Callable[[EpochRecord], None] | None = None) -> list[EpochRecord]:
    """`train_ch13` for the fast path: the same optimisation (same loss, gradient sum, optimizer,
    multi-GPU `nn.DataParallel`), the same records and printed lines, with fewer host round trips:
    the loss and accuracy sums stay on the device and are read once per epoch, and the epoch timer
    covers the whole pass (batching included). Feed it length-bucketed, trimmed batches
    (`core.batching.bucket_batch_indices`, `trim=True`) and a net with fused attention
    (`set_fused_attention`) for the speed.

    `precision='bfloat16'` runs the forward pass under bfloat16 autocast (the loss and the weights
    stay float32); `graph=True` runs the net through `torch.compile` (one device only). Neither pays
    on a CPU without AMX (see the README's Performance section); both are for GPUs.
    """
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty: pass at least one device (try_all_gpus() never returns [])")
    _autocast(devices[0], precision)  # validates the name
    net.to(devices[0])
    model = net
    if len(devices) > 1 and all(d.type == "cuda" for d in devices):
        if graph:
            raise ValueError("graph=True (torch.compile) is for one device; nn.DataParallel replicates the net")
        model = nn.DataParallel(net, device_ids=devices).to(devices[0])
    elif graph:
        model = torch.compile(net, dynamic=True)
    records: list[EpochRecord] = []
    for epoch in range(1, num_epochs + 1):
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float32, device=devices[0])
        correct = torch.zeros((), dtype=torch.long, device=devices[0])
        num_examples, timer = 0, Timer()
        for features, labels in train_iter:
            l, c = train_batch_fast(model, features, labels, loss, trainer, devices, precision)
            loss_sum += l
            correct += c
            num_examples += len(labels)
        if num_examples == 0:
            raise ValueError("train_iter yielded no batches")
        totals = torch.stack([loss_sum, correct.float()]).tolist()  # the epoch's one host sync
        seconds = timer.stop()
        test_acc = evaluate_accuracy(model, test_iter, devices) if test_iter is not None else float("nan")
        record = EpochRecord.from_sums(epoch, totals[0], totals[1], num_examples, test_acc, seconds)
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    if verbose and records:
        print(format_summary(records, str(devices)))
    return records


def predict_proba(net: nn.Module, token_ids, segments, valid_lens, devices: Sequence[torch.device],
                  batch_size: int = 512) -> np.ndarray:
    """Class probabilities (N, 3) for packed examples, in eval mode, `batch_size` rows at a time.

    Inputs are numpy arrays or tensors shaped as `pack_pairs` returns them; one unbatched example
    (1-D ids and segments, a scalar length) is treated as a batch of one.
    """
    token_ids, segments = np.atleast_2d(_as_numpy(token_ids)), np.atleast_2d(_as_numpy(segments))
    valid_lens = np.atleast_1d(_as_numpy(valid_lens))
    if not (len(token_ids) == len(segments) == len(valid_lens)):
        raise ValueError(f"row counts differ: token_ids {len(token_ids)}, segments {len(segments)}, "
                         f"valid_lens {len(valid_lens)}")
    was_training = net.training
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(token_ids), batch_size):
            X = _to_device((token_ids[i:i + batch_size], segments[i:i + batch_size],
                            valid_lens[i:i + batch_size]), devices[0])
            out.append(torch.softmax(net(X).float(), dim=-1).cpu().numpy())
    net.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.float32)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
