"""The book's training API, written once: `train_ch13`, `train_fast`, `predict_proba` (the fine-tuning
chapter) and `train_bert` (pretraining), over the contract's step objects. Each backend binds them
to its own pieces in one line (`train_ch13 = bind(book.train_ch13, FinetuneStep)`), so chapter code
ports by changing one import and the loop itself lives in core (core/training.py, core/pretraining.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .pretraining import StepRecord, format_pretrain_summary, train_steps
from .schedule import LRSchedule
from .training import EpochRecord, require_devices, train_epochs


def bind(function: Callable, *pieces: Any) -> Callable:
    """`function` with a backend's pieces as its first arguments: the book's signature (what the
    contract lists), its name and its docstring."""
    bound = functools.partial(function, *pieces)
    bound.__name__, bound.__qualname__, bound.__doc__ = function.__name__, function.__qualname__, function.__doc__
    bound.__module__ = function.__module__
    return bound


def train_ch13(finetune_step: Callable, net, train_iter: Iterable, test_iter: Iterable | None, loss, trainer,
               num_epochs: int, devices: Sequence, split_f: Callable | None = None, *, verbose: bool = True,
               on_epoch: Callable[[EpochRecord], None] | None = None) -> list[EpochRecord]:
    """Train for `num_epochs`, testing after each; print the book's two lines; return per-epoch records.

    One host read per batch, as the book. Several devices: the backend's data parallelism (torch's
    `nn.DataParallel`, MXNet's `split_f` across the devices the parameters live on, JAX's sharded
    rows); the caller's `net` (and `trainer`) hold the trained values either way. `on_epoch`, if
    given, is called with each epoch's record as soon as it is known."""
    step = finetune_step(net, loss, trainer, devices, split_f)
    return train_epochs(step, train_iter, test_iter, num_epochs, sync="batch", devices=str(step.devices),
                        verbose=verbose, on_epoch=on_epoch)


def train_fast(finetune_step: Callable, net, train_iter: Iterable, test_iter: Iterable | None, loss, trainer,
               num_epochs: int, devices: Sequence, split_f: Callable | None = None, *, precision: str = "float32",
               graph: bool = False, verbose: bool = True,
               on_epoch: Callable[[EpochRecord], None] | None = None) -> list[EpochRecord]:
    """`train_ch13` for the fast path: the same optimisation and records, with the sums read once per
    epoch (the timer then covers the whole pass, batching included). Feed it length-bucketed, trimmed
    batches (`core.batching.bucket_batch_indices`, `trim=True`) and a net with fused attention
    (`set_fused_attention`) for the speed.

    `precision='bfloat16'` (torch) runs the forward pass under bfloat16 autocast, the loss and the
    weights float32; `graph=True` is torch.compile (one device) or MXNet's hybridize. The README's
    Performance section says what each buys."""
    step = finetune_step(net, loss, trainer, devices, split_f, precision=precision, graph=graph)
    return train_epochs(step, train_iter, test_iter, num_epochs, sync="epoch", devices=str(step.devices),
                        verbose=verbose, on_epoch=on_epoch)


def predict_proba(probabilities: Callable, as_numpy: Callable, net, token_ids, segments, valid_lens,
                  devices: Sequence, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (N, net.num_classes) for packed examples, in evaluation mode (dropout off),
    `batch_size` rows at a time; `probabilities(net, ids, segments, valid_lens, device)` is the
    backend's for one batch of numpy arrays.

    Inputs are numpy or the framework's arrays shaped as `pack_pairs` returns them; one unbatched
    example (1-D ids and segments, a scalar length) is treated as a batch of one."""
    token_ids, segments = np.atleast_2d(as_numpy(token_ids)), np.atleast_2d(as_numpy(segments))
    valid_lens = np.atleast_1d(as_numpy(valid_lens))
    if not (len(token_ids) == len(segments) == len(valid_lens)):
        raise ValueError(f"row counts differ: token_ids {len(token_ids)}, segments {len(segments)}, "
                         f"valid_lens {len(valid_lens)}")
    device = require_devices(devices)[0]
    out = [probabilities(net, token_ids[i:i + batch_size], segments[i:i + batch_size],
                         valid_lens[i:i + batch_size], device) for i in range(0, len(token_ids), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, net.num_classes), dtype=np.float32)


def train_bert(pretrain_step: Callable, make_trainer: Callable, train_iter: Iterable, net, loss, vocab_size: int,
               devices: Sequence, num_steps: int, *, trainer=None, lr: float = 0.01, mlm_loss: str = "masked",
               start_step: int = 0, seed: int | None = None,
               on_step: Callable[[StepRecord], bool | None] | None = None, verbose: bool = True,
               warmup_steps: int = 0, lr_schedule: str = "constant") -> list[StepRecord]:
    """Pretrain `net` (a `BERTModel`; in MXNet initialised on every device) on batches of the book's
    7-tuples until step `num_steps` (core/pretraining.py `train_steps`).

    Steps are numbered from `start_step + 1`; `train_iter` is passed over as often as needed.
    `trainer` defaults to Adam(lr) as the book. With `seed`, the framework's generators are re-seeded
    from `(seed, step)` before every step (`core.training.step_seed`), so dropout does not depend on
    where a run was resumed. `on_step(record)` is called after each step; a true return stops.
    With `warmup_steps` or `lr_schedule='linear'`, the rate is set before every step to
    `core.schedule.LRSchedule(lr, num_steps, ...).at(step)`; without, it is left alone (the book).
    Returns the figures of the steps run here; prints the book's two lines if `verbose`."""
    lr_at = LRSchedule(lr, num_steps, warmup_steps, lr_schedule).lr_at()
    step = pretrain_step(net, loss, vocab_size, trainer if trainer is not None else make_trainer(net, lr),
                         devices, mlm_loss)
    records = train_steps(step, train_iter, num_steps, start_step=start_step, seed=seed, lr_at=lr_at,
                          on_step=on_step)
    if verbose and records:
        print(format_pretrain_summary(records, str(step.devices)))
    return records
