"""BERT pretraining, once for every backend: the step loop (`train_steps`: per-step seeds, the
learning rate of each step (core/schedule.py's), timing, checkpoints and stopping), its per-step figures and the book's two
printed lines. A backend supplies only a `PretrainStep` (backends/contract.py): its inputs on the
device, one optimizer step, its RNG seed and learning rate.

The resumable checkpoint folder (OUT/resume/) is core/resume.py's, shared with fine-tuning.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from .runlog import RunLog, pretrain_step_line
from .settings import INIT_SCHEMES, MLM_LOSSES
from .training import Timer, TrainingDiverged, step_seed


def check_mlm_loss(mlm_loss: str) -> str:
    """'masked': the mean over real predictions only (padded slots have weight 0); the book's
    MXNet code computes this (`SoftmaxCELoss` with the prediction weights as sample weights).
    'book': the book's PyTorch formula, `CrossEntropyLoss()`'s mean times the weights over their
    sum, which equals the mean over all `max_num_mlm_preds` slots, padded ones (label 0) included."""
    if mlm_loss not in MLM_LOSSES:
        raise ValueError(f"unknown mlm_loss {mlm_loss!r}: use one of {MLM_LOSSES}")
    return mlm_loss


def check_init(init: str) -> str:
    """Refuse an unknown initialisation scheme (see INIT_SCHEMES)."""
    if init not in INIT_SCHEMES:
        raise ValueError(f"unknown init {init!r}: use one of {INIT_SCHEMES}")
    return init


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


@dataclasses.dataclass(frozen=True)
class BatchTotals:
    """What a pretraining batch's mean losses divide by, for a rank of a distributed job that
    computes a shard of it (core/distributed.py): the ranks' shares then add up to the whole
    batch's losses, and their gradients (summed over the ranks) to its gradient."""

    weights: float  # real MLM predictions (the sum of mlm_weights_X): the masked mean's
    slots: int  # MLM prediction slots, padded ones included: the book formula's mean
    rows: int  # sentence pairs: NSP's mean

    @classmethod
    def of(cls, batch: Sequence) -> "BatchTotals":
        """The totals of a book 7-tuple batch (numpy arrays)."""
        weights = np.asarray(batch[4])
        return cls(float(weights.sum()), int(weights.size), len(batch[6]))

    def losses(self, mlm_sum: Any, nsp_sum: Any, mlm_loss: str) -> tuple[Any, Any, Any]:
        """A shard's `(mlm, nsp, mlm + nsp)` shares from its sums (MLM: weighted by mlm_weights for
        'masked', over every slot for 'book'), in whatever framework's arrays they are."""
        if mlm_loss == "masked":
            mlm = mlm_sum / (self.weights + 1e-8)
        else:  # the book's mean over all slots, times sum(weights) / (sum(weights) + 1e-8)
            mlm = mlm_sum / self.slots * (self.weights / (self.weights + 1e-8))
        nsp = nsp_sum / self.rows
        return mlm, nsp, mlm + nsp


def share_of(batch: Sequence, world: Any) -> tuple[Sequence, BatchTotals | None]:
    """What a rank of `world` (a core.distributed.World) computes of a book 7-tuple batch: its rows
    (`world.training_shard`) and the whole batch's `BatchTotals` its means divide by; in a job of one
    process, the batch itself and None (the plain means)."""
    if world.size == 1:
        return batch, None
    start, stop = world.training_shard(len(batch[0]))
    return [x[start:stop] for x in batch], BatchTotals.of(batch)


class PretrainStep(Protocol):
    """What the step loop needs from a backend (each backend's `pretrain.PretrainStep`)."""

    learning_rate: float  # read and set before each step

    def load(self, batch: Sequence) -> Any:
        """The book's 7-tuple batch on the device(s), before the step's timer starts."""

    def __call__(self, inputs: Any) -> tuple[float, float]:
        """One optimizer step; its (MLM loss, NSP loss) as floats, once the step has finished."""

    def reseed(self, seed: int) -> None:
        """Seed the framework's RNG (dropout draws)."""


def train_steps(step: PretrainStep, train_iter: Iterable, num_steps: int, *, start_step: int = 0,
                seed: int | None = None, lr_at: Callable[[int], float] | None = None,
                on_step: Callable[[StepRecord], bool | None] | None = None,
                checkpoint: Callable[[int, list[StepRecord]], None] | None = None, checkpoint_every: int = 0,
                stop_after: int | None = None, rank: int = 0, log: RunLog | None = None) -> list[StepRecord]:
    """Run steps `start_step + 1` .. `num_steps`, passing over `train_iter` as often as needed;
    return their records.

    The timer covers each step's forward, backward and update (the book's), not the batch's copy
    to the device. With `seed`, the framework's RNG is re-seeded before every step from (seed,
    step) (`step_seed`), so a resumed run draws what an uninterrupted one would. `lr_at(step)` sets
    each step's learning rate (None: the trainer's own, the book's constant rate). `checkpoint(step,
    records)` runs every `checkpoint_every` steps before the last; the loop ends early when
    `on_step(record)` returns true or after `stop_after` steps of this call, as if interrupted.
    `rank`: this process's in a distributed job (its dropout seeds, `step_seed`). `log`: every
    `log.log_every` steps, the step's losses, rate and speed as a line and a log.jsonl entry.
    """
    step_no, timer, records = start_step, Timer(), []
    pairs_here = 0  # sentence pairs of this call (a logged step's throughput)
    per_pass = len(train_iter) if hasattr(train_iter, "__len__") else None
    while step_no < num_steps:
        num_batches = 0
        for batch in train_iter:
            num_batches += 1
            inputs = step.load(batch)
            if seed is not None:
                step.reseed(step_seed(seed, step_no + 1, rank))
            if lr_at is not None:
                step.learning_rate = lr_at(step_no + 1)
            timer.start()
            mlm_value, nsp_value = step(inputs)
            seconds = timer.stop()
            if not (math.isfinite(mlm_value) and math.isfinite(nsp_value)):
                raise TrainingDiverged(f"the loss became {mlm_value + nsp_value} at step {step_no + 1}",
                                       step_no + 1)
            step_no += 1
            record = StepRecord(step_no, mlm_value, nsp_value, int(len(batch[0])), seconds,
                                float(step.learning_rate))
            records.append(record)
            pairs_here += record.num_pairs
            if log is not None and log.due(step_no):
                entry = {"step": step_no, "epoch": (step_no - 1) // per_pass + 1 if per_pass else None,
                         "mlm_loss": mlm_value, "nsp_loss": nsp_value, "lr": record.lr,
                         "examples_per_sec": log.throughput(pairs_here), "elapsed": log.elapsed()}
                log.step(entry, pretrain_step_line(entry))
            if checkpoint is not None and checkpoint_every and step_no % checkpoint_every == 0 \
                    and step_no < num_steps:
                checkpoint(step_no, records)
            if on_step is not None and on_step(record):
                return records
            if step_no >= num_steps or (stop_after is not None and step_no - start_step >= stop_after):
                return records
        if num_batches == 0:
            raise ValueError("train_iter yielded no batches")
    return records
