"""Read a user's own text files: CSV, TSV or JSON Lines (told by the extension), columns chosen by
header name, or by 0-based index when the file has no header; and write rows back in any of the
three (`write_table`, for the predictions of a file).

Every fault is a `DataFileError` (a `ValueError`, so the CLI prints it as `nlibert: error: ...`)
naming the file, the 1-based line the row starts on, the column, and what to do.

- CSV: Python's `csv` with its default (Excel) dialect, strict about quotes; a quoted field may
  span lines, and errors name the line its row starts on.
- TSV: one row per line, fields split on tabs, no quoting (quotes are text), as GLUE's files.
- JSON Lines (`.jsonl`, `.json`): one JSON object per line, columns are its keys; texts must be
  strings, labels strings or integers.
Blank lines are skipped. Every row of a CSV/TSV file has as many fields as the header (or, without
one, the first row): a different count is an error, as it usually means an unquoted delimiter.
Texts that are empty or only whitespace are errors; labels are stripped of outer whitespace.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from typing import Any, Union

from .io import atomic_write, first_non_utf8_line

# Python's csv refuses a field over 128 KiB by default; a real text (a long document, a cell
# nlibert wrote itself) may be larger. The limit is a C long: sys.maxsize overflows it on Windows.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

Column = Union[str, int]  # a header name or JSON key; a 0-based index in a file without a header

FORMATS: dict[str, str] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


class DataFileError(ValueError):
    """A data file cannot be read as asked; the message names the file, line, column and the fix."""


def _column_name(column: Column) -> str:
    return f"column {column}" if isinstance(column, int) else f"column {column!r}"


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where the text(s) and the label are: one text column (a single text) or two (a pair, packed
    `<cls> a <sep> b <sep>`), and a label column (None: an unlabelled file, to predict).
    Names for a file with a header or JSON keys; 0-based indices (ints) when `no_header`."""

    texts: tuple[Column, ...]
    label: Column | None
    no_header: bool = False

    @classmethod
    def parse(cls, text_columns: str, label_column: str | None, no_header: bool = False) -> "Columns":
        """From the CLI's `--text-columns A` or `A,B`, `--label-column L` and `--no-header`."""
        texts = [t.strip() for t in text_columns.split(",")]
        label = label_column.strip() if label_column is not None else None
        if len(texts) not in (1, 2) or not all(texts):
            raise ValueError(f"--text-columns {text_columns!r}: give one column (a single text) or two "
                             "separated by a comma (a pair), e.g. 'text' or 'premise,hypothesis'")
        if label == "":
            raise ValueError("--label-column is empty; name the column that holds the labels")
        if not no_header:
            return cls(tuple(texts), label)

        def index(name: str) -> int:
            if not (name.isascii() and name.isdigit()):
                raise ValueError(f"with --no-header, columns are 0-based indices (e.g. --text-columns 1,2 "
                                 f"--label-column 0), not names such as {name!r}")
            return int(name)
        return cls(tuple(index(t) for t in texts), None if label is None else index(label), no_header=True)


@dataclasses.dataclass(frozen=True)
class Table:
    """A data file's rows as read: lists of strings (CSV, TSV) or dicts (JSON Lines), the header of
    a CSV/TSV file (None without one, and for JSON Lines), and the 1-based line each row starts on."""

    path: str
    format: str
    header: list[str] | None
    rows: list
    lines: list[int]

    def values(self, column: Column, kind: str = "text") -> list[str]:
        """Every row's value in `column`, checked: there in every row; for `kind` 'text' a non-empty
        string, for 'label' a non-empty string or integer (returned as a stripped string)."""
        key = self._key(column)
        values = []
        for row, line in zip(self.rows, self.lines):
            if self.format == "jsonl" and key not in row:
                raise DataFileError(f"{self.path}, line {line}: no key {key!r} in this row (it has: "
                                    f"{', '.join(map(str, row))}); add it or remove the row")
            values.append(self._check(row[key], kind, line, column))
        return values

    def _key(self, column: Column) -> Column:
        """The list index (CSV, TSV) or dict key (JSON Lines) of `column`; a missing column is an error."""
        if self.format == "jsonl":
            return column
        if self.header is None:
            width = len(self.rows[0])
            if not isinstance(column, int) or not 0 <= column < width:
                raise DataFileError(f"{self.path}, line {self.lines[0]}: no column {column!r}: the rows have "
                                    f"{width} columns, numbered 0 to {width - 1}")
            return column
        if self.header.count(column) != 1:
            problem = "appears more than once in" if column in self.header else "is not in"
            raise DataFileError(f"{self.path}, line 1: column {column!r} {problem} the header "
                                f"({', '.join(self.header)}); choose a column of the header, or pass "
                                "--no-header (and 0-based indices) for a file without one")
        return self.header.index(column)

    def _check(self, value: Any, kind: str, line: int, column: Column) -> str:
        where = f"{self.path}, line {line}, {_column_name(column)}"
        if kind == "label" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            expected = "a string or an integer" if kind == "label" else "a string"
            raise DataFileError(f"{where}: expected {expected}, found {json.dumps(value)}; fix the row")
        if not value.strip():
            raise DataFileError(f"{where}: empty {kind}; fill it in or remove the row")
        return value.strip() if kind == "label" else value


def file_format(path: str | os.PathLike) -> str:
    """'csv', 'tsv' or 'jsonl', from the file's extension."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension not in FORMATS:
        raise DataFileError(f"{os.fspath(path)}: cannot tell the format from the extension "
                            f"{extension or '(none)'!r}; name the file .csv, .tsv, .jsonl or .json")
    return FORMATS[extension]


def read_table(path: str | os.PathLike, no_header: bool = False) -> Table:
    """Read a CSV, TSV or JSON Lines file (by extension): line 1 is the header of a CSV/TSV file
    unless `no_header`. A file with no rows is an error."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataFileError(f"{path}: is a folder; name a data file in it (.csv, .tsv, .jsonl or .json)")
    fmt = file_format(path)
    if fmt == "jsonl" and no_header:
        raise DataFileError(f"{path}: JSON Lines rows are objects whose columns are their keys; "
                            "leave out --no-header and name the columns")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        header, rows, lines = _read_json_lines(path) if fmt == "jsonl" else _read_delimited(path, fmt, no_header)
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}, line {first_non_utf8_line(path)}: not UTF-8 text ({e.reason}); "
                            "save the file as UTF-8") from None
    if not rows:
        raise DataFileError(f"{path}: no rows{' below the header' if header else ''}; "
                            "is it the file you meant?")
    if fmt != "jsonl":
        _check_widths(path, fmt, header, rows, lines)
    return Table(path, fmt, header, rows, lines)


def _read_delimited(path: str, fmt: str, no_header: bool) -> tuple[list[str] | None, list, list[int]]:
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    header, rows, lines = None, [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True, **options)
        start = 1  # the line the next row starts on
        try:
            for row in reader:
                if row:  # a blank line reads as []
                    if header is None and not no_header:
                        header = row
                    else:
                        rows.append(row)
                        lines.append(start)
                start = reader.line_num + 1
        except csv.Error as e:
            hint = ('; quote fields that hold commas, quotes or line breaks, with any " inside doubled'
                    if fmt == "csv" else "")
            raise DataFileError(f"{path}, line {start}: not valid {fmt.upper()} ({e}){hint}") from None
    return header, rows, lines


def _check_widths(path: str, fmt: str, header: list[str] | None, rows: list, lines: list[int]) -> None:
    """Every row has as many fields as the header, or as the first row of a file without one."""
    width = len(header) if header is not None else len(rows[0])
    described = "the header" if header is not None else f"the first row (line {lines[0]})"
    separator = "tab" if fmt == "tsv" else "comma"
    for row, line in zip(rows, lines):
        if len(row) != width:
            raise DataFileError(f"{path}, line {line}: {len(row)} fields where {described} has {width}; "
                                f"a {separator} inside a text must be quoted, or the row fixed")


def _read_json_lines(path: str) -> tuple[None, list, list[int]]:
    rows, lines = [], []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}, line {line_no}: not valid JSON ({e.msg}, column {e.colno}); "
                                    "each line must be one JSON object (JSON Lines)") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path}, line {line_no}: expected a JSON object "
                                    f"({{\"text\": ..., \"label\": ...}}), found {type(row).__name__}")
            rows.append(row)
            lines.append(line_no)
    return None, rows, lines


@dataclasses.dataclass(frozen=True)
class FileTexts:
    """The texts (one list per text column) and labels (None: no label column) of a file's rows,
    with the line each row starts on."""

    path: str
    texts: tuple[list[str], ...]
    labels: list[str] | None
    label_column: Column | None
    lines: list[int]


def read_texts(path: str | os.PathLike, columns: Columns) -> FileTexts:
    """The chosen text columns and label column of a CSV, TSV or JSON Lines file."""
    table = read_table(path, columns.no_header)
    texts = tuple(table.values(column, "text") for column in columns.texts)
    labels = table.values(columns.label, "label") if columns.label is not None else None
    return FileTexts(table.path, texts, labels, columns.label, table.lines)


def encode_labels(data: FileTexts, label_names: tuple[str, ...]) -> list[int]:
    """Each row's label as its index in `label_names`; a label not among them is an error naming the row."""
    if data.labels is None:
        raise DataFileError(f"{data.path}: its labels were not read; name the label column (--label-column)")
    index = {name: i for i, name in enumerate(label_names)}
    for label, line in zip(data.labels, data.lines):
        if label not in index:
            raise DataFileError(f"{data.path}, line {line}, {_column_name(data.label_column)}: label {label!r} "
                                f"is not among the training labels ({', '.join(label_names)}); fix the label "
                                "or remove the row")
    return [index[label] for label in data.labels]


def table_records(table: Table) -> tuple[list[str], list[dict]]:
    """`(columns, rows)`: the table's column names in order and its rows as dicts keyed by them.
    A CSV/TSV file's header names its columns (without one, their 0-based indices as strings); a
    JSON Lines file's are its keys, in the order they first appear."""
    if table.format == "jsonl":
        columns = list(dict.fromkeys(key for row in table.rows for key in row))
        return columns, [dict(row) for row in table.rows]
    columns = table.header if table.header is not None else [str(i) for i in range(len(table.rows[0]))]
    return list(columns), [dict(zip(columns, row)) for row in table.rows]


def _cell(value: Any) -> str:
    """A value as CSV/TSV text: strings as they are, anything else (numbers, JSON Lines objects) as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def write_table(path: str | os.PathLike, columns: list[str], rows: list[dict]) -> None:
    """Write `rows` (dicts keyed by `columns`) as CSV (with a header line), TSV (the same, tab
    separated, no quoting) or JSON Lines (one object per row), by `path`'s extension, atomically.
    A value a row lacks is an empty CSV/TSV cell and an absent JSON key. TSV cannot hold a tab or
    a line break inside a value: such a value is an error naming the row and column."""
    path = os.fspath(path)
    fmt = file_format(path)
    with atomic_write(path, "w") as f:
        if fmt == "jsonl":
            for row in rows:
                f.write(json.dumps({c: row[c] for c in columns if c in row}, ensure_ascii=False) + "\n")
            return
        cells = ([_cell(row.get(column, "")) for column in columns] for row in rows)
        if fmt == "csv":
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(cells)
            return
        f.write("\t".join(columns) + "\n")
        for number, row in enumerate(cells, start=1):
            for column, value in zip(columns, row):
                if any(c in value for c in "\t\r\n"):
                    raise DataFileError(f"{path}: row {number}, column {column!r} holds a tab or a line break, "
                                        "which TSV cannot; write .csv or .jsonl instead")
            f.write("\t".join(row) + "\n")
