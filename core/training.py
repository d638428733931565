"""The fine-tuning epoch loop, once for every backend: timing, sums, the book's printed lines, the
per-epoch records, checkpoints and resuming. A backend supplies only a `FinetuneStep`
(backends/contract.py): one training step that leaves its sums on the device, the host read of
such sums, an evaluation pass and its RNG seed.

The book's `train_ch13` reads the loss and accuracy back after every batch and times the training
batches only (`sync='batch'`). The fast path keeps the sums on the device and reads them once per
epoch, timing the whole pass, batching included (`sync='epoch'`). Either way an epoch's figures are
the book's: mean loss and accuracy over its examples, test accuracy, examples/sec.

A job passes a `RunLog` (core/runlog.py): a line and a log.jsonl entry per epoch, and every N steps
one more host read for a step's line and entry (the only reads of the fast path besides
checkpoints and epoch ends). The book's wrappers pass none and print only the book's lines.

A run that checkpoints keeps its position in a `LoopState` (epoch, batch, the epoch's sums so far,
finished epochs); a resumed run starts from one. Checkpoints read the sums (one host sync) and
happen at the same steps in every run of the same settings, so a resumed run ends with the figures
and parameters of an uninterrupted one. A non-finite loss ends the run (`TrainingDiverged`) before
anything is written from it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from .batching import template_batches
from .runlog import RunLog, step_line

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
    validation_acc: float | None = None  # with validation data (what --save-best chooses on)

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


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite; `step` is the optimizer step it was seen after."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed a backend gives its framework RNG before step `step` when asked to: dropout then
    depends only on (seed, step), so a run resumed at any step draws the same masks as one that was
    never stopped. MXNet cannot read its generator's state back, so this is how both backends make
    resuming exact. Each `rank` of a distributed job draws its own masks for its own rows (rank 0
    those of a one-process run)."""
    entropy = [seed, step] if rank == 0 else [seed, step, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def purpose_seed(seed: int, purpose: str) -> int:
    """The seed of one kind of random draw of a run (`purpose`: 'classifier-head', ...), a function
    of (seed, purpose) alone. A backend's generator is reset to it right before those draws, so
    what they give never depends on how many draws came before: a run into an OUT that already
    holds its seeded checkpoint (built on the first run, skipped on a second) gives the same model."""
    entropy = [seed, *purpose.encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def require_devices(devices: Sequence[Any]) -> list:
    """`devices` as a list; an empty one is an error (the book's `try_all_gpus()` on d2l master
    returns [] on a machine without GPUs; ours falls back to the CPU)."""
    devices = list(devices)
    if not devices:
        raise ValueError("devices is empty: pass at least one device (try_all_gpus() never returns [])")
    return devices


class FinetuneStep(Protocol):
    """What the epoch loop needs from a backend (each backend's `train.FinetuneStep`)."""

    learning_rate: float  # read and set before each step (a schedule's)

    def __call__(self, features: Sequence, labels: Any) -> tuple[Any, Any]:
        """One optimizer step on a batch; (sum of per-example losses, number correct), left on the
        device (no host synchronisation)."""

    def read(self, sums: tuple[Any, Any]) -> tuple[float, float]:
        """Such sums as floats, once every step queued so far has finished."""

    def evaluate(self, data_iter: Iterable) -> float:
        """Accuracy over `data_iter`, dropout off."""

    def reseed(self, seed: int) -> None:
        """Seed the framework's RNG (dropout draws)."""

    def compile_ahead(self, train_batches: Sequence, eval_batches: Sequence) -> None:
        """Make ready, while the first steps run, what batches like these (`template_batches`: only
        their shapes and types count) will need; a backend without programs per shape does nothing."""


@dataclasses.dataclass
class LoopState:
    """Where the epoch loop is: what a checkpoint records and a resumed run starts from."""

    step: int = 0  # optimizer steps done, over all epochs
    epoch: int = 1  # the epoch in progress
    batch: int = 0  # its batches done
    sums: list = dataclasses.field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # its Accumulator(4)
    seconds: float = 0.0  # its timed seconds so far
    records: list = dataclasses.field(default_factory=list)  # finished epochs, as dicts

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_epochs(step: FinetuneStep, train_iter: Iterable, test_iter: Iterable | None, num_epochs: int, *,
                 sync: str = "batch", devices: str = "", verbose: bool = True,
                 on_epoch: Callable[[EpochRecord], None] | None = None, state: LoopState | None = None,
                 seed: int | None = None, checkpoint: Callable[[LoopState], None] | None = None,
                 checkpoint_every: int = 0, stop_after: int | None = None,
                 lr_at: Callable[[int], float] | None = None, rank: int = 0, valid_iter: Iterable | None = None,
                 log: RunLog | None = None, should_stop: Callable[[], bool] | None = None) -> list[EpochRecord]:
    """Train until epoch `num_epochs` is done, testing after each; print the book's two lines
    (`verbose`); return the records of every finished epoch (those of `state` included).

    `sync` is the host-sync policy (module docstring); `on_epoch(record)` is called as each epoch
    ends. To checkpoint and resume: `state` is where to start (None: the beginning; it is updated
    in place), `seed` re-seeds the framework before every step from (seed, step), `checkpoint(state)`
    runs every `checkpoint_every` steps and after every epoch, and `stop_after` ends this call after
    that many steps, as if interrupted (with a checkpoint). The caller's `train_iter` must already be
    at `state`'s position (its `load_state_dict`). `lr_at(step)` sets the learning rate of each step
    (numbered from 1 over all epochs; None: the trainer's own), a function of the step alone, so a
    resumed run follows the schedule of an uninterrupted one. `on_epoch` runs before the epoch's
    checkpoint: what it writes is written again if the run stops in between and resumes. `rank` is
    this process's in a distributed job (its dropout seeds: `step_seed`). `valid_iter`: validation
    data, evaluated after each epoch before the test data (`EpochRecord.validation_acc`). `log`: where
    each epoch's line and entry go, and every `log.log_every` steps a step's (one host read each).
    `should_stop()`, asked after every step, ends this call there as `stop_after` does (a SIGTERM:
    core/signals.py).
    """
    if sync not in SYNC_POLICIES:
        raise ValueError(f"unknown sync policy {sync!r}: use one of {SYNC_POLICIES}")
    state = state if state is not None else LoopState()
    records = [EpochRecord(**r) for r in state.records]
    steps_here, seen_here = 0, 0  # steps and examples of this call (a logged step's throughput)
    if state.epoch <= num_epochs:  # a backend that compiles per shape starts on the run's shapes now
        step.compile_ahead(template_batches(train_iter),
                           [b for it in (valid_iter, test_iter) if it is not None for b in template_batches(it)])
    while state.epoch <= num_epochs:
        # Sum of training loss, no. of correct predictions, no. of examples, no. of predictions
        metric, timer = Accumulator(4), Timer()
        metric.data = [float(v) for v in state.sums]
        seconds = state.seconds  # timed before a checkpoint this epoch resumed from
        pending = None  # the sums still on the device (sync='epoch')

        def read_sums() -> None:
            """Add the device's sums to the host's; a NaN or infinite loss is the end of the run."""
            nonlocal pending
            if pending is not None:
                metric.add(*step.read(pending), 0, 0)
                pending = None
            if not math.isfinite(metric[0]):
                raise TrainingDiverged(f"the training loss became {metric[0]} in epoch {state.epoch} "
                                       f"(by step {state.step})", state.step)

        def save() -> None:
            nonlocal seconds
            read_sums()
            if sync == "epoch":
                seconds += timer.stop()
            state.sums, state.seconds = list(metric.data), seconds
            checkpoint(state)
            timer.start()  # the write is not training time

        if log is not None:
            log.mark(seen_here)
        timer.start()
        for features, labels in train_iter:
            if seed is not None:
                step.reseed(step_seed(seed, state.step + 1, rank))
            if lr_at is not None:
                step.learning_rate = lr_at(state.step + 1)
            if sync == "batch":
                timer.start()
                sums = step.read(step(features, labels))
                seconds += timer.stop()
                metric.add(*sums, 0, 0)
                read_sums()
            else:
                sums = step(features, labels)
                pending = sums if pending is None else (pending[0] + sums[0], pending[1] + sums[1])
            metric.add(0, 0, len(labels), int(np.prod(np.shape(labels))))
            state.step, state.batch, steps_here = state.step + 1, state.batch + 1, steps_here + 1
            seen_here += len(labels)
            if log is not None and log.due(state.step):
                read_sums()  # a logged step reads the device; the others do not
                log.step(*_step_entry(state, metric, float(step.learning_rate), log.throughput(seen_here),
                                      log.elapsed()))
            stopping = (stop_after is not None and steps_here >= stop_after) or \
                (should_stop is not None and should_stop())
            if checkpoint is not None and (stopping or (checkpoint_every and state.step % checkpoint_every == 0)):
                save()
            if stopping:
                return records
        if metric[2] == 0:
            raise ValueError("train_iter yielded no batches")
        read_sums()  # the fast path's one host sync of the epoch
        if sync == "epoch":
            seconds += timer.stop()
        validation_acc = step.evaluate(valid_iter) if valid_iter is not None else None
        test_acc = step.evaluate(test_iter) if test_iter is not None else math.nan
        record = EpochRecord.from_sums(state.epoch, metric[0], metric[1], int(metric[2]), test_acc, seconds)
        record.validation_acc = validation_acc
        if sync == "batch":
            record.train_acc = metric[1] / metric[3]  # the book divides by predictions, not examples
        if log is not None:  # before on_epoch and the checkpoint: a resumed run's log drops it if need be
            log.epoch({"epoch": record.epoch, "step": state.step, "loss": record.loss, "train_acc": record.train_acc,
                       "validation_acc": validation_acc, "test_acc": test_acc,
                       "examples_per_sec": record.examples_per_sec, "seconds": record.seconds,
                       "elapsed": log.elapsed()})
        records.append(record)
        state.records.append(record.to_dict())
        state.epoch, state.batch, state.sums, state.seconds = state.epoch + 1, 0, [0.0, 0.0, 0.0, 0.0], 0.0
        if on_epoch is not None:
            on_epoch(record)
        if checkpoint is not None:
            checkpoint(state)
    if verbose and records:
        print(format_summary(records, devices))
    return records


def _step_entry(state: LoopState, metric: Accumulator, lr: float, examples_per_sec: float, elapsed: float
                ) -> tuple[dict, str]:
    """A logged step's entry and line: the epoch's mean loss so far (the book's running figure, the
    same in a resumed run as in an uninterrupted one), the step's rate, the speed since the last."""
    entry = {"step": state.step, "epoch": state.epoch, "loss": metric[0] / metric[2], "lr": lr,
             "examples_per_sec": examples_per_sec, "elapsed": elapsed}
    return entry, step_line(entry)
