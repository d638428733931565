"""The fine-tuning epoch loop, once for every backend: timing, sums, the book's printed lines and the
per-epoch records. A backend supplies only a `FinetuneStep` (backends/contract.py): one training
step that leaves its sums on the device, the host read of such sums, and an evaluation pass.

The book's `train_ch13` reads the loss and accuracy back after every batch and times the training
batches only (`sync='batch'`). The fast path keeps the sums on the device and reads them once per
epoch, timing the whole pass, batching included (`sync='epoch'`). Either way an epoch's figures are
the book's: mean loss and accuracy over its examples, test accuracy, examples/sec.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

SYNC_POLICIES = ("batch", "epoch")


class Accumulator:
    """Sums over `n` variables (the book's)."""

    def __init__(self, n: int) -> None:
        self.data = [0.0] * n

    def add(self, *args: float) -> None:
        self.data = [a + float(b) for a, b in zip(self.data, args)]

    def reset(self) -> None:
        self.data = [0.0] * len(self.data)

    def __getitem__(self, idx: int) -> float:
        return self.data[idx]


class Timer:
    """Records intervals between start() and stop() (the book's)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tik = time.perf_counter()

    def start(self) -> None:
        self.tik = time.perf_counter()

    def stop(self) -> float:
        self.times.append(time.perf_counter() - self.tik)
        return self.times[-1]

    def sum(self) -> float:
        return sum(self.times)


@dataclasses.dataclass
class EpochRecord:
    """One epoch's figures: mean training loss and accuracy, test accuracy, training throughput."""

    epoch: int
    loss: float
    train_acc: float
    test_acc: float
    examples_per_sec: float
    num_examples: int = 0
    seconds: float = 0.0

    @classmethod
    def from_sums(cls, epoch: int, loss_sum: float, num_correct: float, num_examples: int,
                  test_acc: float, seconds: float) -> "EpochRecord":
        """Build from an epoch's running sums (what the book's `Accumulator(4)` holds)."""
        return cls(epoch=epoch, loss=loss_sum / num_examples, train_acc=num_correct / num_examples,
                   test_acc=test_acc, examples_per_sec=num_examples / seconds if seconds > 0 else 0.0,
                   num_examples=int(num_examples), seconds=seconds)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def format_summary(records: Sequence[EpochRecord], devices: str) -> str:
    """The two lines `train_ch13` prints: last-epoch figures, then throughput over all epochs."""
    last = records[-1]
    seconds = sum(r.seconds for r in records)
    if seconds > 0:  # the book: all examples seen over all training time
        total_examples_per_sec = sum(r.num_examples for r in records) / seconds
    else:
        total_examples_per_sec = sum(r.examples_per_sec for r in records) / len(records)
    return (f"loss {last.loss:.3f}, train acc {last.train_acc:.3f}, test acc {last.test_acc:.3f}\n"
            f"{total_examples_per_sec:.1f} examples/sec on {devices}")


def require_devices(devices: Sequence[Any]) -> list:
    """`devices` as a list; an empty one is an error (the book's `try_all_gpus()` on d2l master
    returns [] on a machine without GPUs; ours falls back to the CPU)."""
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty: pass at least one device (try_all_gpus() never returns [])")
    return devices


class FinetuneStep(Protocol):
    """What the epoch loop needs from a backend (each backend's `train.FinetuneStep`)."""

    def __call__(self, features: Sequence, labels: Any) -> tuple[Any, Any]:
        """One optimizer step on a batch; (sum of per-example losses, number correct), left on the
        device (no host synchronisation)."""

    def read(self, sums: tuple[Any, Any]) -> tuple[float, float]:
        """Such sums as floats, once every step queued so far has finished."""

    def evaluate(self, data_iter: Iterable) -> float:
        """Accuracy over `data_iter`, dropout off."""


def train_epochs(step: FinetuneStep, train_iter: Iterable, test_iter: Iterable | None, num_epochs: int, *,
                 sync: str = "batch", devices: str = "", verbose: bool = True,
                 on_epoch: Callable[[EpochRecord], None] | None = None) -> list[EpochRecord]:
    """Train for `num_epochs`, testing after each; print the book's two lines (`verbose`); return the
    per-epoch records. `sync` is the host-sync policy (module docstring); `on_epoch`, if given, is
    called with each epoch's record as soon as it is known."""
    if sync not in SYNC_POLICIES:
        raise ValueError(f"unknown sync policy {sync!r}: use one of {SYNC_POLICIES}")
    records: list[EpochRecord] = []
    for epoch in range(1, num_epochs + 1):
        # Sum of training loss, no. of correct predictions, no. of examples, no. of predictions
        metric, timer = Accumulator(4), Timer()
        pending = None  # the epoch's sums still on the device (sync='epoch')
        for features, labels in train_iter:
            if sync == "batch":
                timer.start()
                loss_sum, correct = step.read(step(features, labels))
                timer.stop()
                metric.add(loss_sum, correct, 0, 0)
            else:
                sums = step(features, labels)
                pending = sums if pending is None else (pending[0] + sums[0], pending[1] + sums[1])
            metric.add(0, 0, len(labels), int(np.prod(np.shape(labels))))
        if metric[2] == 0:
            raise ValueError("train_iter yielded no batches")
        if sync == "epoch":
            metric.add(*step.read(pending), 0, 0)  # the epoch's one host sync
            seconds = timer.stop()
        else:
            seconds = timer.sum()
        test_acc = step.evaluate(test_iter) if test_iter is not None else math.nan
        record = EpochRecord.from_sums(epoch, metric[0], metric[1], int(metric[2]), test_acc, seconds)
        if sync == "batch":
            record.train_acc = metric[1] / metric[3]  # the book divides by predictions, not examples
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
    if verbose and records:
        print(format_summary(records, devices))
    return records
