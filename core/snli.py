"""Read the Stanford Natural Language Inference (SNLI 1.0) `.txt` files, as the book's `read_snli`."""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from .io import first_non_utf8_line

LABELS: dict[str, int] = {"entailment": 0, "contradiction": 1, "neutral": 2}
LABEL_NAMES: list[str] = ["entailment", "contradiction", "neutral"]  # index -> name
NO_GOLD_LABEL = "-"  # SNLI's gold_label when the annotators did not agree
SPLIT_FRACTION = 0.9  # a dev file alone: 90% to train, 10% to test (`split_dataset`)

SPLIT_FILES: dict[str, str] = {
    "train": "snli_1.0_train.txt",
    "dev": "snli_1.0_dev.txt",
    "test": "snli_1.0_test.txt",
}

Dataset = tuple[list[str], list[str], list[int]]  # (premises, hypotheses, labels)

_PARENS = re.compile(r"[()]")
_SPACES = re.compile(r"\s{2,}")


class SNLIFormatError(ValueError):
    """A row of an SNLI file does not have the expected tab-separated columns."""


def extract_text(s: str) -> str:
    """Turn a binary-parse column into plain text: drop '(' and ')', squeeze runs of whitespace."""
    return _SPACES.sub(" ", _PARENS.sub("", s)).strip()


def read_snli_file(path: str | os.PathLike, verbose: bool = False) -> Dataset:
    """Read one SNLI `.txt` file: premises and hypotheses from the binary-parse columns 1 and 2,
    labels as `LABELS` ids. Rows whose gold label is '-' (annotators did not agree; SNLI's marker
    for "no gold label") are dropped as the book drops them and counted; any other label is an error
    naming the file and line, so that a misspelled label never loses a row silently. `verbose`
    prints one line with the examples read and the rows skipped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"SNLI file not found: {path}. Expected one of {', '.join(SPLIT_FILES.values())} "
            f"(from snli_1.0.zip; see nlibert.core.data_hub.download_extract('SNLI')).")
    try:
        premises, hypotheses, labels, dropped = _read_rows(path)
    except UnicodeDecodeError as e:
        raise SNLIFormatError(f"{path}, line {first_non_utf8_line(path)}: not UTF-8 text ({e.reason}); "
                              "save the file as UTF-8") from None
    if verbose:
        print(f"read {len(labels)} examples from {os.path.basename(path)} "
              f"(skipped {dropped} rows without a gold label '{NO_GOLD_LABEL}')")
    return premises, hypotheses, labels


def _read_rows(path: str) -> tuple[list[str], list[str], list[int], int]:
    premises: list[str] = []
    hypotheses: list[str] = []
    labels: list[int] = []
    dropped = 0
    with open(path, encoding="utf-8-sig") as f:
        header = f.readline()
        if not header.startswith("gold_label\t"):
            raise SNLIFormatError(f"{path}, line 1: expected the SNLI header starting with 'gold_label', "
                                  f"found {header[:60]!r}")
        for line_no, line in enumerate(f, start=2):
            if not line.strip():
                continue  # a blank line (e.g. a trailing one) carries no example
            row = line.split("\t", 3)  # only the first 3 columns are read
            if len(row) < 3:
                raise SNLIFormatError(f"{path}, line {line_no}: expected at least 3 tab-separated columns "
                                      f"(gold_label, sentence1_binary_parse, sentence2_binary_parse), "
                                      f"found {len(row)}")
            label = LABELS.get(row[0])
            if label is None:
                if row[0] != NO_GOLD_LABEL:
                    raise SNLIFormatError(f"{path}, line {line_no}: unknown gold label {row[0]!r}; use one of "
                                          f"{', '.join(LABEL_NAMES)} (or '{NO_GOLD_LABEL}' to skip the row)")
                dropped += 1
                continue
            premises.append(extract_text(row[1]))
            hypotheses.append(extract_text(row[2]))
            labels.append(label)
    return premises, hypotheses, labels, dropped


def read_snli(data_dir: str | os.PathLike, is_train: bool, verbose: bool = False) -> Dataset:
    """The book's reader: `snli_1.0_train.txt` if `is_train` else `snli_1.0_test.txt` in `data_dir`."""
    return read_snli_split(data_dir, "train" if is_train else "test", verbose=verbose)


def read_snli_split(data_dir: str | os.PathLike, split: str, verbose: bool = False) -> Dataset:
    """Read split 'train', 'dev' or 'test' from `data_dir`."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown SNLI split {split!r}: use one of {', '.join(SPLIT_FILES)}")
    return read_snli_file(os.path.join(os.fspath(data_dir), SPLIT_FILES[split]), verbose=verbose)


def split_dataset(dataset: Sequence[Sequence], fraction: float,
                  seed: int) -> tuple[tuple[list, ...], tuple[list, ...]]:
    """Split a (premises, hypotheses, labels) dataset by a seeded permutation: the first part gets
    round(fraction * N) examples, the second the rest. Same tuple-of-lists form as the input."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = len(dataset[0])
    if any(len(column) != n for column in dataset):
        raise ValueError(f"dataset columns have different lengths: {[len(c) for c in dataset]}")
    order = np.random.default_rng(seed).permutation(n)
    n_first = int(round(fraction * n))
    first, second = order[:n_first], order[n_first:]
    return (tuple([column[i] for i in first] for column in dataset),
            tuple([column[i] for i in second] for column in dataset))
