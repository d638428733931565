"""How well a classifier labels a test set: accuracy, per-class precision, recall and F1, macro-F1
and the confusion matrix, as a printed table, a dict for `evaluation.json` and a PNG."""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from .io import atomic_path, write_json


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The confusion matrix of a test set (rows: true label, columns: predicted label, counts) and
    the label names; every figure is computed from it.

    Per class, precision = correct / predicted as the class, recall = correct / truly of the class,
    F1 = their harmonic mean. Where a denominator is 0 (a class never predicted, never present, or
    with precision and recall both 0) the figure is 0, as scikit-learn's `zero_division=0`.
    Macro-F1 is the plain mean of every class's F1, those with no test examples included."""

    label_names: tuple[str, ...]
    confusion: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / self.num_examples)

    @property
    def support(self) -> np.ndarray:
        """The number of test examples truly of each class."""
        return self.confusion.sum(axis=1)

    @property
    def precision(self) -> np.ndarray:
        return _ratio(np.diag(self.confusion), self.confusion.sum(axis=0))

    @property
    def recall(self) -> np.ndarray:
        return _ratio(np.diag(self.confusion), self.support)

    @property
    def f1(self) -> np.ndarray:
        precision, recall = self.precision, self.recall
        return _ratio(2 * precision * recall, precision + recall)

    @property
    def macro_f1(self) -> float:
        return float(self.f1.mean())

    def to_dict(self) -> dict:
        """The figures as JSON-ready values: per class by name, and the matrix as lists (rows true)."""
        per_class = {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                     for name, p, r, f, s in zip(self.label_names, self.precision, self.recall, self.f1,
                                                 self.support)}
        return {"num_examples": self.num_examples, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "per_class": per_class, "label_names": list(self.label_names),
                "confusion_matrix": self.confusion.tolist(),
                "confusion_matrix_axes": "rows: true label, columns: predicted label"}

    def table(self) -> str:
        """A printable report: one line per class, accuracy and macro-F1, then the confusion matrix."""
        width = max(len("class"), *(len(name) for name in self.label_names))
        lines = [f"{'class':<{width}}  precision  recall     f1  support"]
        for name, p, r, f, s in zip(self.label_names, self.precision, self.recall, self.f1, self.support):
            lines.append(f"{name:<{width}}  {p:9.3f}  {r:6.3f}  {f:5.3f}  {s:7d}")
        correct = int(np.trace(self.confusion))
        lines += ["", f"accuracy {self.accuracy:.3f} ({correct} of {self.num_examples}), "
                      f"macro-F1 {self.macro_f1:.3f}", "",
                  "confusion matrix (rows: true label, columns: predicted label)"]
        cell = max(width, len(str(self.confusion.max())))
        lines.append(" " * width + "".join(f"  {name:>{cell}}" for name in self.label_names))
        for name, row in zip(self.label_names, self.confusion):
            lines.append(f"{name:<{width}}" + "".join(f"  {count:>{cell}d}" for count in row))
        return "\n".join(lines)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def evaluate(labels: Sequence[int], predictions: Sequence[int], label_names: Sequence[str]) -> Evaluation:
    """The `Evaluation` of `predictions` against the true `labels` (both indices into `label_names`)."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    num_classes = len(label_names)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must be two lists "
                         "of the same length")
    if len(labels) == 0:
        raise ValueError("no test examples to evaluate")
    for what, values in (("labels", labels), ("predictions", predictions)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{what} must be indices 0..{num_classes - 1} of the {num_classes} label names, "
                             f"found {values.min() if values.min() < 0 else values.max()}")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    return Evaluation(tuple(label_names), confusion)


def write_evaluation(evaluation: Evaluation, path: str | os.PathLike) -> None:
    """`evaluation.to_dict()` as JSON at `path`, written atomically."""
    write_json(path, evaluation.to_dict())


def plot_confusion_matrix(evaluation: Evaluation, path: str | os.PathLike) -> None:
    """A PNG of the confusion matrix (counts in the cells, rows true, columns predicted), written
    atomically with matplotlib's Agg backend (imported here: only plotting needs it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, confusion = evaluation.label_names, evaluation.confusion
    size = 1.5 + 0.6 * len(names)
    figure = Figure(figsize=(size + 1, size))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes)
    ticks = range(len(names))
    axes.set_xticks(ticks, labels=names, rotation=45, ha="right")
    axes.set_yticks(ticks, labels=names)
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    axes.set_title(f"accuracy {evaluation.accuracy:.3f}, macro-F1 {evaluation.macro_f1:.3f}")
    dark = confusion.max() / 2  # white text on the darker cells
    for (row, column), count in np.ndenumerate(confusion):
        axes.text(column, row, str(count), ha="center", va="center", color="white" if count > dark else "black")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
