"""Ending a run on a signal, as torchrun and cluster schedulers expect: SIGINT (Ctrl-C) and SIGTERM
(a scheduler's preemption, `kill`) end a command with exit code 128 + the signal (130, 143) and one
line saying what was kept (cli.py), never a traceback.

SIGINT stops at once (Python's KeyboardInterrupt). SIGTERM raises `Stopped` at once too, except
inside a training loop (`step_boundaries`): there it is only noted (`requested`), the loop ends at
its next step boundary with a checkpoint, and the job raises `Stopped` then, so a preempted run
loses at most one step. A second SIGTERM stops at once. Writes are atomic (core/io.py), so a stop
at any other instant leaves every file and folder whole.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

import numpy as np

SIGNAL_NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class Stopped(BaseException):
    """The command was stopped by signal `signum` (a BaseException, as KeyboardInterrupt: code that
    handles errors must not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {SIGNAL_NAMES.get(signum, signum)}")
        self.signum = int(signum)


_requested: list[int] = []  # the SIGTERM noted inside a training loop
_in_loop = [False]


def _on_sigterm(signum: int, frame) -> None:
    if _in_loop[0] and not _requested:
        _requested.append(signum)  # the loop stops at its next step boundary
        return
    raise Stopped(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Inside, SIGTERM ends the command as `Stopped` (the CLI's commands run inside; only the main
    thread can handle signals, elsewhere this does nothing). The old handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def requested() -> int | None:
    """The signal a training loop was asked to stop on at its next step boundary, or None."""
    return _requested[0] if _requested else None


@contextlib.contextmanager
def step_boundaries() -> Iterator[None]:
    """Inside, a first SIGTERM is only noted (`requested`) for the training loop to stop at a step
    boundary, after its checkpoint."""
    _requested.clear()  # a signal noted by an earlier loop of this process was acted on there
    _in_loop[0] = True
    try:
        yield
    finally:
        _in_loop[0] = False


class StopCheck:
    """`train_epochs`' `should_stop` (and pretraining's): whether a SIGTERM asks the run to stop after
    this step. In a job of several processes (`world`, a core.distributed.World) the ranks agree,
    one tiny sum per step, so all stop after the same step and reach the same checkpoint."""

    def __init__(self, world: Any) -> None:
        self.world, self.stopped = world, False

    def __call__(self) -> bool:
        asked = float(requested() is not None)
        if self.world.size > 1:
            asked = float(self.world.all_sum(np.array([asked], dtype=np.float64))[0])
        self.stopped = asked > 0
        return self.stopped
