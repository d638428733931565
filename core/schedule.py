"""The learning-rate schedule, once for fine-tuning and pretraining: an optional linear warm-up, then
the book's constant rate or a linear decay to 0 at the last step (BERT's recipe).

The book trains at a constant rate and sets it once, in the optimizer (`LRSchedule.lr_at` is None
then, so the loops leave the optimizer alone). Otherwise the loops (core/training.py's
`train_epochs`, core/pretraining.py's `train_steps`) set the rate of step n, numbered from 1, to
`LRSchedule.at(n)` before the step; a backend only reads and sets its optimizer's rate
(`learning_rate` of its step objects). A resumed run computes the same rates from the step number.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

# After the warm-up: 'constant' (the book's) or 'linear' (down to 0 at the run's last step).
LR_SCHEDULES = ("constant", "linear")
# `nlibert pretrain --lr-decay` named the same choice in other words before both commands shared one
# vocabulary; the option and resume checkpoints written then still use them.
LR_DECAY_WORDS = {"none": "constant", "linear": "linear"}


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """The rate of every step of a run of `num_steps` steps at peak rate `lr`."""

    lr: float
    num_steps: int
    warmup_steps: int = 0
    kind: str = "constant"

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {self.kind!r}: use one of {', '.join(LR_SCHEDULES)}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")

    def at(self, step: int) -> float:
        """The rate of step `step` (from 1). Warm-up: over steps 1..warmup_steps the rate rises
        linearly, lr * step / warmup_steps (lr/N at step 1, lr at step N): Adam's first updates are
        full-sized whatever the gradient's scale, and a small rate while its moment estimates settle
        keeps them from wrecking the initialisation. Then 'constant' keeps lr and 'linear' falls in
        a straight line to 0 at step `num_steps`."""
        if step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.kind == "linear":
            return self.lr * max(0, self.num_steps - step) / (self.num_steps - self.warmup_steps)
        return self.lr

    def lr_at(self) -> Callable[[int], float] | None:
        """The loops' `lr_at`: `at`, or None for the book's constant rate (the optimizer's, untouched)."""
        if self.warmup_steps == 0 and self.kind == "constant":
            return None
        return self.at


def schedule_word(word: str) -> str:
    """A schedule named in LR_SCHEDULES' words or in `--lr-decay`'s (none|linear): LR_SCHEDULES' word
    (anything else is returned as given, for the option's choices to refuse)."""
    return LR_DECAY_WORDS.get(word, word)


def upgrade_signature(signature: dict) -> dict:
    """A resume checkpoint's signature in today's words: pretraining's written before the shared
    vocabulary recorded `lr_decay` ('none'|'linear') where it now records `lr_schedule`."""
    if "lr_decay" not in signature or "lr_schedule" in signature:
        return signature
    upgraded = {k: v for k, v in signature.items() if k != "lr_decay"}
    upgraded["lr_schedule"] = LR_DECAY_WORDS.get(signature["lr_decay"], signature["lr_decay"])
    return upgraded
