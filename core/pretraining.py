"""Bookkeeping for BERT pretraining shared by both backends' `train_bert`: per-step figures, the
book's two printed lines, per-step seeds, and the resumable checkpoint folder (OUT/resume/).

The resume folder holds, per checkpoint, two files written by the backend (the model parameters
and the optimizer state, named after the step: `step-00000040.params`, `step-00000040.trainer`),
then `state.json`, written last and atomically, which names them and records the step, the data
iterator's position, the run's settings and the figures so far. A reader trusts only what
`state.json` names, so a run killed at any moment leaves the previous complete checkpoint;
files of older steps are deleted once the new `state.json` is in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Sequence

import numpy as np

from .io import read_json, write_json

MLM_LOSSES = ("masked", "book")
LR_DECAYS = ("none", "linear")
PRETRAIN_MODES = ("book", "fast")
# 'book': each backend's own book init (torch: its layer defaults; MXNet: init.Xavier()).
# 'xavier': MXNet's book init in both backends (every matrix Xavier-uniform, biases 0, LayerNorm 1/0),
# so a run starts from the same distribution whichever backend pretrains.
INIT_SCHEMES = ("book", "xavier")
STATE_FILE = "state.json"
_STEP_FILE = re.compile(r"^step-(\d+)\.[a-z]+$")


def check_mlm_loss(mlm_loss: str) -> str:
    """'masked': the mean over real predictions only (padded slots have weight 0); the book's
    MXNet code computes this. 'book': the book's PyTorch formula, whose mean runs over all
    `max_num_mlm_preds` slots, padded ones (label 0) included (facts §1.8)."""
    if mlm_loss not in MLM_LOSSES:
        raise ValueError(f"unknown mlm_loss {mlm_loss!r}: use one of {MLM_LOSSES}")
    return mlm_loss


def check_init(init: str) -> str:
    """Refuse an unknown initialisation scheme (see INIT_SCHEMES)."""
    if init not in INIT_SCHEMES:
        raise ValueError(f"unknown init {init!r}: use one of {INIT_SCHEMES}")
    return init


def check_lr_schedule(warmup_steps: int, lr_decay: str) -> None:
    """Refuse a negative warm-up or an unknown decay (see `learning_rate_at`)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"unknown lr_decay {lr_decay!r}: use one of {LR_DECAYS}")


def learning_rate_at(step: int, lr: float, num_steps: int, warmup_steps: int = 0, lr_decay: str = "none") -> float:
    """The learning rate of step `step` (numbered from 1) of a run of `num_steps` steps.

    Warm-up: over steps 1..warmup_steps the rate rises linearly, lr * step / warmup_steps (lr/N
    at step 1, lr at step N): Adam's first updates are full-sized whatever the gradient's scale,
    and a small rate while its moment estimates settle keeps them from wrecking the random
    initialisation. Then `lr_decay='none'` keeps lr (the book: a constant rate) and 'linear' falls
    in a straight line to 0 at step `num_steps`. With neither, every step gets lr.
    """
    check_lr_schedule(warmup_steps, lr_decay)
    if step <= warmup_steps:
        return lr * step / warmup_steps
    if lr_decay == "linear":
        return lr * max(0, num_steps - step) / (num_steps - warmup_steps)
    return lr


@dataclasses.dataclass
class StepRecord:
    """One pretraining step: its number (from 1), the MLM and NSP losses of its batch, how many
    sentence pairs it held, how long it took (the book's timer: forward, backward, update) and
    the learning rate it used (None in records written before rates were recorded)."""

    step: int
    mlm_loss: float
    nsp_loss: float
    num_pairs: int
    seconds: float
    lr: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(records: Sequence[StepRecord]) -> dict:
    """The book's figures over `records`: mean MLM and NSP loss per step, sentence pairs/sec."""
    if not records:
        return {"steps": 0, "mlm_loss": float("nan"), "nsp_loss": float("nan"), "sentence_pairs_per_sec": 0.0}
    seconds = sum(r.seconds for r in records)
    return {"steps": len(records),
            "mlm_loss": sum(r.mlm_loss for r in records) / len(records),
            "nsp_loss": sum(r.nsp_loss for r in records) / len(records),
            "sentence_pairs_per_sec": sum(r.num_pairs for r in records) / seconds if seconds > 0 else 0.0}


def format_pretrain_summary(records: Sequence[StepRecord], devices: str) -> str:
    """The two lines the book's `train_bert` prints (means over the steps it ran)."""
    s = summarize(records)
    return (f"MLM loss {s['mlm_loss']:.3f}, NSP loss {s['nsp_loss']:.3f}\n"
            f"{s['sentence_pairs_per_sec']:.1f} sentence pairs/sec on {devices}")


def step_seed(seed: int, step: int) -> int:
    """The seed a backend gives its framework RNG before step `step` when asked to (`train_bert(...,
    seed=...)`): dropout then depends only on (seed, step), so a run resumed at any step draws the
    same masks as one that was never stopped. MXNet cannot read its generator's state back, so
    this is how both backends make resuming exact."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0] & 0x7FFFFFFF)


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
            raise ValueError(f"{path}: not a resume state (no {key!r})")
    for name in state["files"].values():
        if not os.path.exists(os.path.join(folder, name)):
            raise FileNotFoundError(f"{path}: names {name}, which is missing")
    return state


def commit_resume_state(folder: str | os.PathLike, state: dict) -> None:
    """Write `state.json` (atomically, after the files it names), then delete files of other steps."""
    write_json(os.path.join(folder, STATE_FILE), state)
    keep = set(state["files"].values())
    for name in os.listdir(folder):
        if _STEP_FILE.match(name) and name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
