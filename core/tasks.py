"""Text classification tasks beyond SNLI: what to read, its texts and labels, and the labels' names.

A `Task` holds a run's training and test examples in the form the SNLI path uses, a tuple of
columns (`(texts, labels)` for single texts, `(texts_a, texts_b, labels)` for pairs), so
`split_dataset`, `sources.take` and `SNLIBERTDataset` work on it unchanged, plus the label names
(index -> name). SNLI keeps its own reader (`core/snli.py`, `core/sources.py`).

- AG News (`ag_news_task`): its original CSV layout, no header, `"class 1-4","title","description"`.
- The user's own files (`file_task`): CSV, TSV or JSON Lines, read by `core/tables.py`.
A folder or file without a test split is split 90/10 with the run's seed, as SNLI's dev file.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

from .data_hub import data_root, download
from .snli import SPLIT_FRACTION, split_dataset
from .tables import Columns, DataFileError, encode_labels, read_table, read_texts

AG_NEWS_HUB_NAMES = ("ag_news.train", "ag_news.test", "ag_news.classes")  # core/data_hub.py
AG_NEWS_INDICES = ("1", "2", "3", "4")  # the label names when classes.txt is absent

# AG News's texts came from web pages whose line breaks were written as a backslash: "gave\no
# indication" is "gave" and "no" on two lines, and "\\" a paragraph break. A dollar sign was
# escaped too: "\$1 billion". So `\$` is a "$" and every other backslash a line break.
_AG_NEWS_ESCAPE = re.compile(r"\\(\$?)")


@dataclasses.dataclass(frozen=True)
class Task:
    """A run's data: examples as column tuples (labels are indices into `label_names`)."""

    name: str  # 'ag_news' or 'files'
    label_names: tuple[str, ...]
    train: tuple[list, ...]
    test: tuple[list, ...]
    description: str

    @property
    def paired(self) -> bool:
        """Whether an example is two texts (packed `<cls> a <sep> b <sep>`) rather than one."""
        return len(self.train) == 3

    def to_dict(self) -> dict:
        """The task's name, label names and form (a model folder records more: `core.folders.TaskRecord`)."""
        return {"name": self.name, "label_names": list(self.label_names), "paired": self.paired}


def _split(dataset: tuple[list, ...], seed: int) -> tuple[tuple[list, ...], tuple[list, ...]]:
    """90% to train, 10% to test, by the seeded permutation SNLI's dev file is split with."""
    return split_dataset(dataset, SPLIT_FRACTION, seed)


# --- AG News ---------------------------------------------------------------------------------------

def undo_ag_news_escapes(text: str) -> str:
    """AG News's text with `\\$` as "$" and every other backslash as the line break it stands for."""
    return _AG_NEWS_ESCAPE.sub(lambda m: m.group(1) or "\n", text)


def ag_news_label_names(folder: str | os.PathLike) -> tuple[str, ...]:
    """The class names from `classes.txt` in `folder` (one per line, in class-index order), else 1..4."""
    path = os.path.join(os.fspath(folder), "classes.txt")
    if not os.path.isfile(path):
        return AG_NEWS_INDICES
    with open(path, encoding="utf-8-sig") as f:
        names = tuple(line.strip() for line in f if line.strip())
    if len(set(names)) != len(names) or len(names) < 2:
        raise DataFileError(f"{path}: expected one distinct class name per line (at least two), "
                            f"found {list(names)}; fix the file or remove it to name the classes 1..4")
    return names


def read_ag_news_file(path: str | os.PathLike, label_names: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """(texts, labels) of an AG News CSV: text = title + " " + description with the escapes undone
    (`undo_ag_news_escapes`), label = class index - 1. A class index outside 1..len(label_names),
    a row without three fields or a row whose title and description are both empty is an error."""
    table = read_table(path, no_header=True)
    if len(table.rows[0]) != 3:
        raise DataFileError(f"{table.path}, line {table.lines[0]}: {len(table.rows[0])} fields where AG News "
                            'has 3 ("class index","title","description"); is it an AG News CSV?')
    indices = {str(i): i - 1 for i in range(1, len(label_names) + 1)}
    texts, labels = [], []
    for (index, title, description), line in zip(table.rows, table.lines):
        if index.strip() not in indices:
            raise DataFileError(f"{table.path}, line {line}, column 0: class index {index!r} is not one of "
                                f"1..{len(label_names)} ({', '.join(label_names)}); fix the row")
        text = undo_ag_news_escapes(title + " " + description)
        if not text.strip():
            raise DataFileError(f"{table.path}, line {line}: empty title and description; remove the row")
        texts.append(text)
        labels.append(indices[index.strip()])
    return texts, labels


def ag_news_task(folder: str | os.PathLike, seed: int) -> Task:
    """AG News from a folder in its original layout (or holding `ag_news_csv/`): `train.csv` and
    `test.csv`, or `dev.csv` alone, split 90/10 with `seed`. Label names from `classes.txt`."""
    folder = os.fspath(folder)
    if os.path.isdir(os.path.join(folder, "ag_news_csv")):
        folder = os.path.join(folder, "ag_news_csv")
    train_file, test_file, dev_file = (os.path.join(folder, f"{split}.csv") for split in ("train", "test", "dev"))
    names = ag_news_label_names(folder)
    if os.path.isfile(train_file) and os.path.isfile(test_file):
        train, test = (read_ag_news_file(f, names) for f in (train_file, test_file))
        return Task("ag_news", names, train, test, f"AG News folder {folder}")
    if os.path.isfile(dev_file):
        train, test = _split(read_ag_news_file(dev_file, names), seed)
        return Task("ag_news", names, train, test, f"AG News folder {folder} (dev.csv split 90/10, seed {seed})")
    raise FileNotFoundError(f"{folder}: expected AG News's train.csv and test.csv, or dev.csv to split 90/10")


def download_ag_news(cache_dir: str | os.PathLike | None = None, timeout: float = 30.0,
                     hub: Mapping[str, tuple[str, str]] | None = None) -> str:
    """The folder `ag_news_csv` in `cache_dir` (default: the data root) with AG News's train.csv,
    test.csv and classes.txt, each downloaded and checked unless a copy with its checksum is there."""
    folder = os.path.join(os.fspath(cache_dir) if cache_dir is not None else data_root(), "ag_news_csv")
    for name in AG_NEWS_HUB_NAMES:
        download(name, folder, timeout=timeout, hub=hub)
    return folder


# --- the user's own files --------------------------------------------------------------------------

def _refuse_header_row(data) -> None:
    """A file read with `--no-header` whose first row's label appears in no other row: that row is
    most likely a header (a column named 'label' would become a class of one example)."""
    first = data.labels[0]
    if len(data.labels) > 1 and first not in data.labels[1:]:
        raise DataFileError(f"{data.path}, line {data.lines[0]}: label {first!r} appears in no other row; is this "
                            "line a header? Leave out --no-header and name the columns, or remove the line")


def file_task(train_file: str | os.PathLike, test_file: str | os.PathLike | None, columns: Columns,
              seed: int) -> Task:
    """A task from the user's own files (`core/tables.py`): the label names are the training file's
    labels, sorted; a test label not among them is an error. Without `test_file` the training file
    is split 90/10 with `seed`."""
    if columns.label is None:
        raise ValueError("training needs labels: name the label column (--label-column)")
    train_data = read_texts(train_file, columns)
    if columns.no_header:
        _refuse_header_row(train_data)
    names = tuple(sorted(set(train_data.labels)))
    if len(names) < 2:
        raise DataFileError(f"{train_data.path}: every row has the label {names[0]!r}; a classifier "
                            "needs examples of at least two labels")
    train = (*train_data.texts, encode_labels(train_data, names))
    if test_file is None:
        train, test = _split(train, seed)
        description = f"{train_data.path} (split 90/10, seed {seed})"
    else:
        test_data = read_texts(test_file, columns)
        test = (*test_data.texts, encode_labels(test_data, names))
        description = f"{train_data.path} and {test_data.path}"
    return Task("files", names, train, test, description)
