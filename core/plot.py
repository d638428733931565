"""The book's training plot as a PNG: train loss, train acc and test acc per epoch, drawn as d2l's
`Animator` draws them in `train_ch13` (x: epoch from 1 to the number of epochs, y from 0 to 1,
line styles '-', 'm--', 'g-.', a grid and a legend, a 3.5 x 2.5 inch figure).

The book adds a training point every fifth of an epoch; the loop records epochs only
(`core.training.EpochRecord`), so the lines join one point per epoch, each marked so that a
one-epoch run still shows its points. Where the loss is above 1 the y axis grows to show it (the
book's figure cuts it off). A run with validation data gets a fourth line, its validation accuracy.
Jobs redraw it at each epoch's end, so a user can watch a long run.
"""
from __future__ import annotations

import os
from typing import Sequence

from .io import atomic_path
from .training import EpochRecord

# d2l's Animator: its default fmts and the legend train_ch13 gives it.
SERIES = (("loss", "train loss", "-"), ("train_acc", "train acc", "m--"), ("test_acc", "test acc", "g-."))
# A run with validation data adds its line in the Animator's fourth style.
VALIDATION = ("validation_acc", "valid acc", "r:")


def plot_training(records: Sequence[EpochRecord], path: str | os.PathLike, num_epochs: int | None = None) -> None:
    """Write the plot of `records` to `path` (a PNG, atomically) with matplotlib's Agg backend,
    imported here: only plotting needs it. `num_epochs` (default: the last record's epoch) sets
    the x axis, so a run that stopped early is drawn on the axis of the whole run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not records:
        raise ValueError("no finished epochs to plot")
    num_epochs = num_epochs or records[-1].epoch
    figure = Figure(figsize=(3.5, 2.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    epochs = [r.epoch for r in records]
    series = SERIES + ((VALIDATION,) if any(r.validation_acc is not None for r in records) else ())
    for field, label, fmt in series:
        axes.plot(epochs, [getattr(r, field) for r in records], fmt, label=label, marker=".")
    if num_epochs > 1:
        axes.set_xlim(1, num_epochs)
    axes.set_ylim(0, max(1.0, *(r.loss for r in records)))
    axes.set_xlabel("epoch")
    axes.legend()
    axes.grid()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=150)
