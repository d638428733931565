"""Data-parallel runs over several processes, once for every backend: who is who (`World`), which
rows of a batch each process computes (`World.shard`), and starting the processes of a job on one
machine (`launch`). Framework-neutral: a backend joins the job its framework's way
(`runtime.init_distributed`: torch.distributed, MXNet's dist_sync kvstore, jax.distributed) and
says which processes a one-machine job needs (`runtime.launch_processes`).

The rules every backend keeps (so that N processes compute what one process computes):
- every process builds the same data iterator with the same seed, so each sees every *global*
  batch, in the same order and composition as a one-process run of the same `--batch-size`;
- rank r computes the contiguous rows `World.shard(len(batch))` of it (sizes differ by one at most);
- the gradient is that of the whole batch (the book sums per-example losses: DDP's average over the
  ranks is scaled back to a sum; MXNet's kvstore sums and the trainer divides by the global size);
- a step's sums and an evaluation's counts are summed over the ranks (`World.all_sum`), so every
  rank runs the same loop on the same figures (and checkpoints at the same steps);
- only rank 0 prints, takes the output lock and writes (metrics.json, the model, checkpoints).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, Sequence

import numpy as np

# Set in the processes `launch` starts, so that their own `--nproc` does not launch again.
LAUNCHED_ENV = "NLIBERT_LAUNCHED"
# Where a process `launch` started writes its error (message or traceback), for the launcher to
# print the cause's alone, once (cli.py).
REPORT_ENV = "NLIBERT_REPORT_FILE"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The exit code of a user's mistake (`nlibert: error: ...`, cli.py), passed on by `launch`.
USER_ERROR_EXIT = 2
# How long a process waits for the others to join (or for a collective) before it gives up.
JOIN_TIMEOUT_S = 1800.0  # torch.distributed's own default: rank 0 may pack a large dataset first


def _identity(values: np.ndarray) -> np.ndarray:
    return values


def _nothing() -> None:
    return None


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job: `rank` of `size`, `local_rank` on its machine
    (which of the machine's devices it drives). `all_sum` sums a small float64 array over the ranks
    (every rank gets the sum) and `barrier` waits for every rank: the backend's collectives. The
    default is a job of one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    all_sum: Callable[[np.ndarray], np.ndarray] = dataclasses.field(default=_identity, compare=False, repr=False)
    barrier: Callable[[], None] = dataclasses.field(default=_nothing, compare=False, repr=False)
    # Leave a job that completed: every rank meets, then the backend tears its group down (torch's
    # gloo can abort a process at exit, "terminate called without an active exception", when its
    # group is left to the interpreter's finalisation while a peer is still inside its own).
    close: Callable[[], None] = dataclasses.field(default=_nothing, compare=False, repr=False)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes."""
        return self.rank == 0

    def shard(self, num_rows: int) -> tuple[int, int]:
        """`(start, stop)`: the rows of a batch of `num_rows` this rank computes (contiguous; the
        first `num_rows % size` ranks take one more, as `np.array_split`). May be empty."""
        base, extra = divmod(num_rows, self.size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def training_shard(self, num_rows: int) -> tuple[int, int]:
        """`shard`, refusing a training batch too small to give every rank a row: a rank without
        rows would still have to join the gradient's all-reduce with nothing to reduce."""
        if num_rows < self.size:
            raise ValueError(f"a training batch of {num_rows} examples cannot be split across {self.size} "
                             "processes; use a --batch-size that leaves no last batch smaller than --nproc")
        return self.shard(num_rows)

    def local_devices(self, devices: Sequence) -> list:
        """The devices this process drives: all of `devices` alone; in a job of several processes on
        a machine, `devices[local_rank]` of a list (`--device cuda:0,cuda:1`: one each), or the one
        device given (`--device cpu`)."""
        devices = list(devices)
        if self.size == 1 or len(devices) == 1:
            return devices
        if self.local_rank >= len(devices):
            raise ValueError(f"process {self.local_rank} on this machine has no device: --device lists "
                             f"{len(devices)}; list one per process, or give one device for all")
        return [devices[self.local_rank]]


@contextlib.contextmanager
def quiet_unless_main(world: World) -> Iterator[None]:
    """Only rank 0 prints: the others' standard output goes nowhere (their errors still show)."""
    if world.main:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


# --- launching the processes of a job on this machine --------------------------------------------

@dataclasses.dataclass(frozen=True)
class LaunchProcess:
    """One process of a job: its role (for messages), the environment it adds, and its command
    (None: the job's worker command, `launch`'s)."""

    role: str
    env: dict
    argv: tuple | None = None


def rank_processes(nproc: int, port: int, **env: str) -> list[LaunchProcess]:
    """One worker per rank with the environment torchrun gives its workers (`RANK`, `WORLD_SIZE`,
    `LOCAL_RANK`, `MASTER_ADDR`/`MASTER_PORT`, here 127.0.0.1:`port`), plus `env`: how torch and
    JAX jobs meet on one machine (`launch_processes`)."""
    common = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port), **env}
    return [LaunchProcess(f"rank {rank}", {**common, "RANK": str(rank), "LOCAL_RANK": str(rank)})
            for rank in range(nproc)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (chosen at run time; the job binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_threads(nproc: int) -> int:
    """Threads per process when `nproc` share this machine's cores (what torchrun's OMP_NUM_THREADS=1
    is for: oversubscribed cores slow every process down)."""
    return max(1, (os.cpu_count() or 1) // nproc)


def check_job(nproc: int, batch_size: int, devices: list, oversubscribe: bool = False) -> None:
    """Refuse a job of `nproc` processes that cannot work, or would crawl, before starting it: more
    processes than the rows of a batch (each computes a share of every batch), than the GPUs listed
    (one each), or than this machine's CPU cores (each process's threads would fight for them, and
    each holds a copy of the model in memory) unless `oversubscribe`."""
    if nproc > batch_size:
        raise ValueError(f"--nproc {nproc}: more processes than the {batch_size} examples of a batch "
                         f"(--batch-size); use --nproc {batch_size} or fewer, or a larger --batch-size")
    gpus = [d for d in devices if "cpu" not in str(d).lower()]
    if len(gpus) > 1 and nproc > len(gpus):
        raise ValueError(f"--nproc {nproc}: more processes than the {len(gpus)} GPUs of --device (one each); "
                         f"use --nproc {len(gpus)} or list more GPUs")
    if oversubscribe:
        return
    if len(gpus) == 1 and len(devices) == 1:
        raise ValueError(f"--nproc {nproc}: more processes than the one GPU ({gpus[0]}); list one GPU per "
                         "process in --device, or pass --oversubscribe to share it")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not gpus and nproc > cores:
        raise ValueError(f"--nproc {nproc}: more processes than this machine's {cores} CPU cores; they would "
                         "fight for the cores and each hold a copy of the model in memory. Use --nproc "
                         f"{cores} or fewer, or pass --oversubscribe to start them anyway")


def _die_with(launcher: int) -> Callable[[], None]:
    """What a started process runs before its command (`preexec_fn`): a process group of its own (the
    terminal's Ctrl-C reaches the launcher alone, which passes it on once), and death with the
    launcher, even a SIGKILLed one (Linux `PR_SET_PDEATHSIG`); no orphan trains on."""
    prctl = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl

    def setup() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher:  # the launcher died before the line above
            os._exit(1)
    return setup


def launch(command: Sequence[str], processes: Sequence[LaunchProcess], poll_s: float = 0.2,
           grace_s: float = 10.0, stop_grace_s: float = 120.0) -> int:
    """Run the job's `processes` on this machine, the workers running `command` (for instance
    `python -m nlibert.cli finetune ...`), until the workers end. When one exits with an error (or
    is killed), the others are stopped and the job ends with that error; nothing waits on a dead
    peer. The error named is the first process's to end (one waiting thread each): a peer that a
    dead process's broken connection ends a moment later (JAX's workers abort then, torch's raise
    "Connection reset by peer") is not taken for the cause, and its message is never shown: each
    process writes its error to a file of its own (`REPORT_ENV`), and only the cause's is printed,
    once. Returns 0 when every worker succeeded; a process's `USER_ERROR_EXIT` is the job's.

    SIGINT and SIGTERM to the launcher are passed on to the workers, which stop at a step boundary
    with a checkpoint (core/signals.py); the launcher waits for them (at most `stop_grace_s`, then
    kills them) and returns 128 + the signal. The processes die with the launcher even when it is
    SIGKILLed (`_die_with`)."""
    procs: list[tuple[LaunchProcess, subprocess.Popen]] = []
    ended: queue.Queue = queue.Queue()  # (process, exit code), in the order they end
    workers = sum(p.argv is None for p in processes)
    threads = str(worker_threads(workers))
    reports = tempfile.mkdtemp(prefix="nlibert-job-")
    stop: list[int] = []  # the signal the launcher was sent

    def forward(signum: int, frame) -> None:
        if stop:  # a second signal: stop at once
            for _, proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            return
        stop.append(signum)
        for p, proc in procs:
            if p.argv is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    handlers = _handle({signal.SIGINT: forward, signal.SIGTERM: forward})
    try:
        for number, p in enumerate(processes):
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads), **p.env,
                   LAUNCHED_ENV: "1", REPORT_ENV: os.path.join(reports, str(number))}
            procs.append((p, subprocess.Popen(list(p.argv) if p.argv is not None else list(command), env=env,
                                              preexec_fn=_die_with(os.getpid()))))
            threading.Thread(target=lambda p=p, proc=procs[-1][1]: ended.put((p, proc.wait())), daemon=True).start()
        deadline = None
        while workers:
            if stop and deadline is None:
                deadline = time.monotonic() + stop_grace_s
            if deadline is not None and time.monotonic() > deadline:
                break  # _stop kills what is left
            try:
                p, code = ended.get(timeout=poll_s)
            except queue.Empty:
                continue
            workers -= p.argv is None
            if stop:  # every worker ends now; their ends are the stop's, not errors
                continue
            if code == 0:
                continue
            report = _read_report(os.path.join(reports, str(processes.index(p))))
            if code == USER_ERROR_EXIT:  # the process's own message is the user's mistake (cli.py)
                print(report, end="", file=sys.stderr)
                return code
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            print(f"{report}nlibert: error: the {p.role} process {how}; stopped the job's other processes. "
                  "Any checkpoint in OUT/resume is kept: run the same command to resume", file=sys.stderr)
            return 1
        return 128 + stop[0] if stop else 0
    finally:
        _stop(procs, grace_s)
        _handle(handlers)
        shutil.rmtree(reports, ignore_errors=True)


def _handle(handlers: dict) -> dict:
    """Install signal `handlers` (in the main thread only: elsewhere Python cannot); the old ones."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}


def _read_report(path: str) -> str:
    """What a process of the job wrote to its report file (its error message or traceback), or ''."""
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
    return ""


def _stop(procs: Sequence[tuple[LaunchProcess, subprocess.Popen]], grace_s: float) -> None:
    """Ask every process still running to stop (SIGTERM), then kill what is left after `grace_s`
    (helper processes such as MXNet's server usually end on their own once the workers have)."""
    deadline = time.monotonic() + grace_s
    for _, proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for _, proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
