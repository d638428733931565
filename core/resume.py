"""Resumable runs, for fine-tuning and pretraining alike: the checkpoint folder OUT/resume/ and the
lock that keeps a second run out of a busy OUT.

The resume folder holds, per checkpoint, two files written by the backend (the model parameters and
the optimizer state, named after the step: `step-00000040.params`, `step-00000040.trainer`), then
`state.json`, written last and atomically, which names them and records the step, the data
iterator's position, the run's settings (its signature) and the loop's figures so far. A reader
trusts only what `state.json` names, so a run killed at any moment leaves the previous complete
checkpoint; files of older steps are deleted once the new `state.json` is in place.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from typing import Any, Iterator

from .io import read_json, write_json
from .schedule import upgrade_signature
from .vocab import read_vocab_list, save_vocab

STATE_FILE = "state.json"
LOCK_FILE = ".nlibert.lock"
# The signature's keys that describe a run's data rather than its settings (jobs.py adds them).
DATA_KEYS = ("labels", "examples")
_STEP_FILE = re.compile(r"^step-(\d+)\.[a-z]+$")


def step_file(step: int, suffix: str) -> str:
    """'step-00000040.params' and the like: checkpoint files are named after their step."""
    return f"step-{step:08d}.{suffix}"


def read_resume_state(folder: str | os.PathLike) -> dict | None:
    """The last complete checkpoint's `state.json`, or None when there is none."""
    path = os.path.join(folder, STATE_FILE)
    if not os.path.exists(path):
        return None
    state = read_json(path)
    for key in ("step", "files"):
        if key not in state:
            raise ValueError(f"{path}: not a resume state (no {key!r}); pass --no-resume to start over")
    for name in state["files"].values():
        if not os.path.exists(os.path.join(folder, name)):
            raise FileNotFoundError(f"{path}: names {name}, which is missing; pass --no-resume to start over")
    return state


def commit_resume_state(folder: str | os.PathLike, state: dict) -> None:
    """Write `state.json` (atomically, after the files it names), then delete files of other steps."""
    write_json(os.path.join(folder, STATE_FILE), state)
    keep = set(state["files"].values())
    for name in os.listdir(folder):
        if _STEP_FILE.match(name) and name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


def open_resume(folder: str | os.PathLike, signature: dict, resume: bool | None) -> dict | None:
    """The checkpoint state to resume from, or None to start fresh. `resume` None resumes when the
    folder holds a checkpoint, True insists on one, False starts over (the folder is cleared). A
    checkpoint written with other settings (`signature`) is refused, naming them."""
    folder = os.fspath(folder)
    if resume is False:
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        return None
    state = read_resume_state(folder)
    if state is None and resume:
        raise FileNotFoundError(f"{folder}: no checkpoint to resume from")
    written = upgrade_signature(state.get("signature", {})) if state is not None else None
    if state is not None and written != signature:
        raise ValueError(f"{folder}: written by a run with {_differences(written, signature)}; "
                         "re-run with those settings and data, or pass --no-resume to start over")
    return state


def _differences(written: dict, signature: dict) -> str:
    """What differs between a checkpoint's signature and this run's: the settings by name, the data
    (`DATA_KEYS`: the label list, the examples' fingerprint) by what changed."""
    differ = sorted(k for k in set(signature) | set(written) if written.get(k) != signature.get(k))
    parts = []
    settings = [k for k in differ if k not in DATA_KEYS]
    if settings:
        parts.append(f"other settings ({', '.join(settings)})")
    if "labels" in differ:
        parts.append(f"other labels (its {written.get('labels')}, this run's {signature.get('labels')})")
    if "examples" in differ:
        parts.append("other training or test examples (the data changed since)")
    return " and ".join(parts)


class ResumeFolder:
    """OUT/resume/ of one run: puts a checkpoint back (`restore`) and writes new ones (`save`),
    through the backend's `save_training_state` / `load_training_state`; what the loop records of
    itself (its position and figures) travels as `progress`, a JSON object."""

    def __init__(self, folder: str | os.PathLike, *, signature: dict, backend: Any, net: Any, trainer: Any,
                 devices: list, train_iter: Any, vocab: Any, seed: int) -> None:
        self.folder, self.signature = os.fspath(folder), signature
        self.backend, self.net, self.trainer, self.devices = backend, net, trainer, devices
        self.train_iter, self.vocab, self.seed = train_iter, vocab, seed

    def restore(self, state: dict) -> dict:
        """Load the model, optimizer and data position of `state`; returns its `progress`."""
        if read_vocab_list(os.path.join(self.folder, "vocab.json")) != list(self.vocab.idx_to_token):
            raise ValueError(f"{self.folder}: its vocabulary differs from this run's; pass --no-resume")
        try:
            self.backend.load_training_state(self.folder, state["files"], self.net, self.trainer, self.devices)
        except (OSError, ValueError, KeyError, RuntimeError, EOFError) as e:  # a truncated or foreign file
            cause = str(e).split(". ")[0]  # frameworks append paragraphs of advice for their own API
            raise ValueError(f"{self.folder}: the checkpoint of step {state['step']} cannot be read ({cause}); "
                             "pass --no-resume to start over") from e
        self.train_iter.load_state_dict(state["data"])
        return state.get("progress", {})

    def save(self, step: int, progress: dict) -> None:
        """A checkpoint after optimizer step `step`."""
        os.makedirs(self.folder, exist_ok=True)
        if not os.path.exists(os.path.join(self.folder, "vocab.json")):
            save_vocab(self.vocab, os.path.join(self.folder, "vocab.json"))
        written = self.backend.save_training_state(self.folder, self.net, self.trainer, step)
        commit_resume_state(self.folder, {
            "step": step, "files": written, "data": self.train_iter.state_dict(), "signature": self.signature,
            "rng": {"seed": self.seed, "rule": "framework RNG re-seeded per step from (seed, step)"},
            "progress": progress})


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, option: str = "--out") -> Iterator[None]:
    """Hold OUT for one run: a second run into the same folder is refused while this one lives. The
    lock is the kernel's (flock), so a killed run leaves no stale lock behind."""
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{option} {folder}: is a file, not a folder; choose another {option}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_FILE), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{option} {folder}: another nlibert run is writing there; wait for it to "
                             f"finish or choose another {option}") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
