"""What a long run says as it goes, once for fine-tuning and pretraining: a line per epoch as it ends,
a line every N steps when standard output is not a terminal (a file under `nohup`, a scheduler's
log; on a terminal tqdm draws the progress), and OUT/log.jsonl, one JSON object per logged step and
per epoch, appended and flushed as the run goes (what Hugging Face's `log_history` and Lightning's
CSV logger keep). The loops (core/training.py `train_epochs`, core/pretraining.py `train_steps`)
decide what an entry holds; this module formats, prints and writes it.

Which steps are logged depends on the step number alone (`RunLog.due`), never on the terminal or
the rank: a logged step reads the device's sums (a host sync, and in a job of several processes a
collective every rank must join), the others do not. A resumed run first cuts the file back to what
its checkpoint had seen (`RunLog.begin`), so it continues the file without duplicates.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from .io import atomic_write

LOG_FILE = "log.jsonl"


def _clock(seconds: float) -> str:
    """Elapsed time as h:mm:ss."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _number(value: Any) -> Any:
    """JSON has no NaN or infinity: such a figure (no test data) is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def epoch_line(entry: dict) -> str:
    """`epoch 3, loss 0.4812, train acc 0.812, test acc 0.7830` (the d2l JAX chapter's form), with
    the validation accuracy when there is validation data, then throughput and time."""
    accs = [f"train acc {entry['train_acc']:.3f}"]
    if entry.get("validation_acc") is not None:
        accs.append(f"valid acc {entry['validation_acc']:.4f}")
    if _number(entry.get("test_acc")) is not None:  # NaN: a loop given no test data
        accs.append(f"test acc {entry['test_acc']:.4f}")
    return (f"epoch {entry['epoch']}, loss {entry['loss']:.4f}, {', '.join(accs)}, "
            f"{entry['examples_per_sec']:.1f} examples/sec, {entry['seconds']:.1f} sec, "
            f"{_clock(entry['elapsed'])} elapsed")


def step_line(entry: dict) -> str:
    """A fine-tuning step's line: where the run is, the epoch's mean loss so far, the rate, speed."""
    return (f"step {entry['step']}, epoch {entry['epoch']}, loss {entry['loss']:.4f}, lr {entry['lr']:.3g}, "
            f"{entry['examples_per_sec']:.1f} examples/sec, {_clock(entry['elapsed'])} elapsed")


def pretrain_step_line(entry: dict) -> str:
    """A pretraining step's line: its batch's MLM and NSP losses, the rate, speed."""
    where = f"step {entry['step']}" + (f", epoch {entry['epoch']}" if entry.get("epoch") is not None else "")
    return (f"{where}, MLM loss {entry['mlm_loss']:.3f}, NSP loss {entry['nsp_loss']:.3f}, "
            f"lr {entry['lr']:.3g}, {entry['examples_per_sec']:.1f} sentence pairs/sec, "
            f"{_clock(entry['elapsed'])} elapsed")


class RunLog:
    """One run's log: `folder`/log.jsonl (None: no file, as on a rank other than 0), a step line and
    entry every `log_every` steps (0: epochs only), printed to standard output when `step_lines`
    (None: when it is not a terminal)."""

    def __init__(self, folder: str | os.PathLike | None, log_every: int, *, step_lines: bool | None = None) -> None:
        if log_every < 0:
            raise ValueError(f"log_every must be >= 0 (0: a line per epoch only), got {log_every}")
        self.path = os.path.join(folder, LOG_FILE) if folder is not None else None
        self.log_every = log_every
        self.step_lines = step_lines
        self.started = time.perf_counter()
        self._mark: tuple[float, float] | None = None  # (time, examples) at the last logged step

    def begin(self, step: int | None = None, epochs_done: int = 0) -> None:
        """Start the file: empty for a new run (`step` None); for one resumed after optimizer step
        `step` with `epochs_done` finished epochs, the entries up to there (a killed run's later
        entries and any line it left half-written are dropped, so none is written twice)."""
        self.started, self._mark = time.perf_counter(), None
        if self.path is None:
            return
        kept = []
        if step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # the half-written last line of a killed run
                    if entry.get("kind") == "epoch" and entry.get("epoch", math.inf) <= epochs_done:
                        kept.append(line.rstrip("\n"))
                    elif entry.get("kind") == "step" and entry.get("step", math.inf) <= step:
                        kept.append(line.rstrip("\n"))
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with atomic_write(self.path, "w") as f:
            f.write("".join(line + "\n" for line in kept))

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` is logged: every `log_every`-th, whatever the terminal or rank."""
        return self.log_every > 0 and step % self.log_every == 0

    def mark(self, examples: float) -> None:
        """Start the next throughput's interval now, `examples` (the count so far) seen: at an
        epoch's start, so that the last epoch's evaluation and checkpoint do not count as training."""
        self._mark = (time.perf_counter(), examples)

    def throughput(self, examples: float) -> float:
        """Examples per second since the previous logged step (or `mark`, or the start), `examples`
        being the count so far; marks now for the next."""
        now = time.perf_counter()
        then, before = self._mark or (self.started, 0.0)
        self._mark = (now, examples)
        return (examples - before) / (now - then) if now > then else 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def step(self, entry: dict, line: str) -> None:
        """A logged step: its entry in the file, its line on standard output unless that is a terminal."""
        self._write({"kind": "step", **entry})
        show = self.step_lines if self.step_lines is not None else not sys.stdout.isatty()
        if show:
            print(line, flush=True)

    def epoch(self, entry: dict) -> None:
        """An epoch's end: its line (always) and its entry."""
        print(epoch_line(entry), flush=True)
        self._write({"kind": "epoch", **entry})

    def _write(self, entry: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _number(v) for k, v in entry.items()}) + "\n")
            f.flush()


def read_log(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The entries of a log.jsonl (those of `kind`, 'step' or 'epoch', if given)."""
    with open(path, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return [e for e in entries if kind is None or e.get("kind") == kind]

