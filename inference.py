"""Using a fine-tuned model folder: label one text or pair (`run_predict`), every row of a file
(`run_predict_file`), or a labelled test set and measure it (`run_evaluate`).

Framework-neutral, as jobs.py: the folder's config.json names the backend that wrote it, the
registry loads that backend, and only the contract's names are called. What the model was trained
for (label names, pairs or single texts, its data) comes from the folder's `TaskRecord`.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from .backends import load_backend
from .core.evaluation import evaluate, plot_confusion_matrix
from .core.folders import TaskRecord, read_checkpoint_config
from .core.inference_settings import EvaluateSettings, PredictSettings
from .core.io import check_output, write_json
from .core.packing import pack_pairs, pack_singles
from .core.progress import Progress
from .core.resume import output_lock
from .core.settings import FinetuneSettings
from .core.sources import finetune_source
from .core.tables import Columns, encode_labels, file_format, read_table, read_texts, table_records, write_table

PREDICTED_LABEL = "predicted_label"  # the column `predict --file` adds, then `prob_<label>` per label


@dataclasses.dataclass
class LoadedModel:
    """A fine-tuned model folder, loaded: its backend, devices, net and vocabulary, and its task."""

    folder: str
    backend: ModuleType
    devices: list
    net: Any
    vocab: Any
    task: TaskRecord
    max_len: int  # what texts are packed to: the fine-tuning run's max_len, else the model's own

    def check_texts(self, count: int, where: str) -> None:
        """Refuse `count` texts per example where the model takes the other number (two for a model
        of pairs, one otherwise); `where` names what gave them, for the user to change."""
        wanted = 2 if self.task.paired else 1
        if count != wanted:
            kind = "pairs of texts" if self.task.paired else "single texts"
            raise ValueError(f"{self.folder}: this model ({self.task.name}) labels {kind}: {where} gives "
                             f"{count} text{'s' if count > 1 else ''} per example where it needs {wanted}")

    def probabilities(self, texts: Sequence[Sequence[str]], batch_size: int) -> np.ndarray:
        """(N, number of labels) probabilities of the examples whose texts are `texts` (one column,
        or two for pairs). Examples are sorted by length and batched, each batch cut to its longest
        example, so little is computed on padding; a progress bar shows on a terminal."""
        if self.task.paired:
            ids, segments, valid_lens = pack_pairs(texts[0], texts[1], self.vocab, self.max_len)
        else:
            ids, segments, valid_lens = pack_singles(texts[0], self.vocab, self.max_len)
        order = np.argsort(valid_lens, kind="stable")
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        probs = np.zeros((len(valid_lens), len(self.task.label_names)), dtype=np.float32)
        for rows in Progress(batches, "predict"):
            width = int(valid_lens[rows].max())
            probs[rows] = self.backend.predict_proba(self.net, ids[rows, :width], segments[rows, :width],
                                                     valid_lens[rows], self.devices, batch_size)
        if not np.all(np.isfinite(probs)):
            raise ValueError(f"{self.folder}: the model's outputs are not finite (NaN weights?); fine-tune it again")
        return probs


def load_model(folder: str, device: str | None = None) -> LoadedModel:
    """The fine-tuned model in `folder` (any backend's format), on `device` (None: every GPU, else the CPU)."""
    config = read_checkpoint_config(folder)
    if config is None or config.get("kind") != "classifier":
        raise ValueError(f"{folder}: not a fine-tuned model folder (no config.json of kind 'classifier')")
    backend = load_backend(config["format"])
    devices = backend.parse_devices(device)
    net, vocab, cfg = backend.load_classifier(folder, devices)
    task = TaskRecord.from_config(config, os.path.join(folder, "config.json"))
    return LoadedModel(folder, backend, devices, net, vocab, task, task.max_len or cfg.max_len)


def run_predict(model_dir: str, text: str, text_b: str | None = None, device: str | None = None) -> dict:
    """Label one text (a single-text model) or one pair (`text` and `text_b`: premise and
    hypothesis for SNLI): {'label': name, 'probabilities': {name: probability}}."""
    texts = [t for t in (text, text_b) if t is not None]
    if not all(t.strip() for t in texts):
        raise ValueError("each TEXT must have some text; got an empty or blank one")
    model = load_model(model_dir, device)
    model.check_texts(len(texts), "TEXT TEXT_B" if len(texts) > 1 else "TEXT alone")
    probs = model.probabilities([[t] for t in texts], batch_size=1)[0]
    names = model.task.label_names
    return {"label": names[int(np.argmax(probs))],
            "probabilities": {name: float(p) for name, p in zip(names, probs)}}


def _columns(model: LoadedModel, text_columns: str | None, label_column: str | None, no_header: bool | None,
             file: str, need_label: bool) -> Columns:
    """The columns of a file to read: as given, else the ones the model was fine-tuned on (the user's
    own files record them); an error names the option to give when neither says. Whether line 1 is
    a header: as given (`--header`, `--no-header`), else as the model's own files were read; a CSV/TSV
    file's choice is printed, with how to change it."""
    recorded = model.task.data or {}
    if text_columns is None:
        if recorded.get("text_columns") is None:
            example = "premise,hypothesis" if model.task.paired else "text"
            raise ValueError(f"--text-columns: name the column{'s' if model.task.paired else ''} of {file} "
                             f"holding the text{'s' if model.task.paired else ''} (e.g. --text-columns {example})")
        text_columns = recorded["text_columns"]
        label_column = label_column if label_column is not None else recorded.get("label_column")
    delimited = file_format(file) != "jsonl"
    if no_header is None:
        no_header = delimited and model.task.name == "files" and bool(recorded.get("no_header"))
        why = "as the model's training file was; --header or --no-header to override"
    else:
        why = "--no-header" if no_header else "--header"
    if delimited:
        print(f"reading {file} {'without a header line' if no_header else 'with a header line'} ({why})")
    if need_label and label_column is None:
        raise ValueError(f"--label-column: name the column of {file} holding the true labels")
    columns = Columns.parse(text_columns, label_column if need_label else None, no_header)
    model.check_texts(len(columns.texts), f"--text-columns {text_columns}")
    return columns


def run_predict_file(settings: PredictSettings) -> dict:
    """Label every row of `settings.file` (CSV, TSV or JSON Lines) and write the rows, each with
    `predicted_label` and `prob_<label>` per label added, to `settings.output` (its extension sets
    the format), atomically. Returns the row count, seconds and rows/sec of the labelling."""
    check_output("--output", settings.output, models={"--model": settings.model}, inputs={"--file": settings.file})
    model = load_model(settings.model, settings.device)
    columns = _columns(model, settings.text_columns, None, settings.no_header, settings.file, need_label=False)
    table = read_table(settings.file, columns.no_header)
    texts = [table.values(column, "text") for column in columns.texts]
    names, rows = table_records(table)
    added = [PREDICTED_LABEL] + [f"prob_{label}" for label in model.task.label_names]
    clashes = [name for name in added if name in names]
    if clashes:
        raise ValueError(f"{settings.file}: already has the column(s) {', '.join(clashes)} that the predictions "
                         "add; rename them (or label the original file)")
    start = time.perf_counter()
    probs = model.probabilities(texts, settings.batch_size)
    seconds = time.perf_counter() - start
    for row, p in zip(rows, probs):
        row[PREDICTED_LABEL] = model.task.label_names[int(np.argmax(p))]
        row.update((f"prob_{label}", float(value)) for label, value in zip(model.task.label_names, p))
    write_table(settings.output, names + added, rows)
    return {"rows": len(rows), "seconds": seconds, "rows_per_sec": len(rows) / max(seconds, 1e-9),
            "output": settings.output, "devices": [str(d) for d in model.devices]}


def _test_examples(model: LoadedModel, settings: EvaluateSettings) -> tuple[list, list[int], str]:
    """`(texts, labels, description)` of the test set to evaluate on: the user's `--test-file`, or
    the test split of `--data` (a folder in the model's task's layout) or of the data the model was
    fine-tuned on (what its folder records; the full split, whatever --test-limit the run had)."""
    if settings.test_file is not None:
        columns = _columns(model, settings.text_columns, settings.label_column, settings.no_header,
                           settings.test_file, need_label=True)
        data = read_texts(settings.test_file, columns)
        return list(data.texts), encode_labels(data, model.task.label_names), data.path
    options = dict(model.task.data or {})
    if settings.data is not None:
        if model.task.name not in ("snli", "ag_news"):
            raise ValueError(f"--data: this model was fine-tuned on your own files ({model.task.name}), which "
                             "have no folder layout; give --test-file FILE")
        options = {"task": model.task.name, "data": settings.data, "seed": options.get("seed", 0)}
    with tempfile.TemporaryDirectory() as tmp:  # the embedded SNLI sample is written here
        source = finetune_source(FinetuneSettings(**options, out=tmp))
        if tuple(source.label_names) != model.task.label_names:
            raise ValueError(f"{source.description}: its labels ({', '.join(source.label_names)}) are not the "
                             f"model's ({', '.join(model.task.label_names)}); evaluate it on data of its own task")
        _, test = source.texts(options.get("seed", 0))
    return list(test[:-1]), list(test[-1]), source.description


def run_evaluate(settings: EvaluateSettings) -> dict:
    """Evaluate a fine-tuned model on a labelled test set (`_test_examples`): print accuracy,
    per-class precision, recall and F1, macro-F1 and the confusion matrix, and write them to
    OUT/evaluation.json and OUT/confusion.png (OUT: `settings.out_dir()`)."""
    out = settings.out_dir()
    check_output("--out", out, folder=True, models={"--model": settings.model},
                 inputs={"--test-file": settings.test_file})
    model = load_model(settings.model, settings.device)
    texts, labels, description = _test_examples(model, settings)
    probs = model.probabilities(texts, settings.batch_size)
    result = evaluate(labels, probs.argmax(axis=1), model.task.label_names)
    split = "test file" if settings.test_file is not None else "test split"  # what every figure is from
    print(f"evaluated {settings.model} on {result.num_examples} examples of the {split}: {description}")
    print(result.table())
    with output_lock(out):
        report = {"model": os.path.abspath(settings.model), "split": split, "data": description, **result.to_dict()}
        write_json(os.path.join(out, "evaluation.json"), report)
        plot_confusion_matrix(result, os.path.join(out, "confusion.png"))
    return {**report, "out": out}
