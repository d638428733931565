"""Bookkeeping shared by both backends' training loops: sums, timing and the book's printed lines."""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence


class Accumulator:
    """Sums over `n` variables."""

    def __init__(self, n: int) -> None:
        self.data = [0.0] * n

    def add(self, *args: float) -> None:
        self.data = [a + float(b) for a, b in zip(self.data, args)]

    def reset(self) -> None:
        self.data = [0.0] * len(self.data)

    def __getitem__(self, idx: int) -> float:
        return self.data[idx]


class Timer:
    """Records intervals between start() and stop()."""

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
