"""Checkpoint folders: what they hold, how a user's `--pretrained` string finds one, and the rules
every backend's loaders and savers share.

A folder in the book's layout holds `vocab.json` (a list: index -> token) and `pretrained.params`
(a `BERTModel`) or `classifier.params` (a fine-tuned `BERTClassifier`), in one backend's format.
nlibert also writes `config.json`: the `BERTConfig`, `"format"` (the backend that wrote the params
file), `"kind"` ('pretrained' or 'classifier') and, for a WordPiece vocabulary, its tokenizer
settings; a classifier's also records its task (`TaskRecord`: the label names, pairs or single
texts). The book's own downloads have no config.json: their format is told from the params
file's first bytes, their sizes from the tensors (core/names.py). A Hugging Face BERT folder
(core/hf.py) is the third kind of source; every backend reads it directly.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping

import numpy as np

from .config import BERTConfig
from .hf import (HF_WEIGHT_FILES, PACKAGED_CHECKPOINTS, hf_weights_path, is_hf_folder, load_hf_checkpoint,
                 resolve_packaged_checkpoint)
from .io import read_json
from .names import check_shapes, convert_params, format_key, infer_config, to_canonical
from .snli import LABEL_NAMES

VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.json"
PARAMS_FILES = {"pretrained": "pretrained.params", "classifier": "classifier.params"}
PRETRAINED_FILE, CLASSIFIER_FILE = PARAMS_FILES["pretrained"], PARAMS_FILES["classifier"]
HUGGING_FACE = "huggingface"

# The params formats, told apart by their file's first bytes when a folder has no config.json (the
# book's own folders never have one): `torch.save` writes a zip ('PK'), MXNet's `npx.save` /
# `save_parameters` an NDArray list (magic 0x112, 8 bytes little-endian), and the JAX backend's Flax
# `to_bytes` a msgpack map (fixmap 0x80-0x8f, map16 0xde, map32 0xdf).
_MSGPACK_MAPS = tuple(bytes([b]) for b in (*range(0x80, 0x90), 0xDE, 0xDF))
FORMAT_MAGIC = {"torch": (b"PK",), "mxnet": ((0x112).to_bytes(8, "little"),), "jax": _MSGPACK_MAPS}
# The book's data-hub archives of its pretrained BERTs (d2l's chapter defines them): the torch
# ones carry a '.torch' suffix. core/data_hub.py holds their URLs and sha1 sums. A backend whose
# framework the book publishes no checkpoint for (JAX) reads the torch archive.
HUB_NAMES = {"torch": {"bert.small": "bert.small.torch", "bert.base": "bert.base.torch"},
             "mxnet": {"bert.small": "bert.small", "bert.base": "bert.base"}}
HUB_FALLBACK = "torch"
# How a backend reads a params file of any format: (path, format) -> {name in that format: array}.
# The registry's `read_params_in` (backends/__init__.py) is the one; core never imports a framework.
ParamsReader = Callable[[str, str], Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """Where a checkpoint lives and what it is: `format` is 'huggingface' or the name of the backend
    that wrote it, `kind` 'pretrained' or 'classifier', `params_path` its weights file."""

    folder: str
    format: str
    kind: str
    params_path: str


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """What a classifier folder records of the task it learned, in config.json's `"task"` and
    `"labels"`: the label names (index -> name, one per output), whether an example is a pair of
    texts or one, the `max_len` its texts were packed to in fine-tuning, and the options that chose
    its data (`FinetuneSettings.data_options()`), so that `evaluate` finds the test split again.
    A folder without them is the chapter's: SNLI's three labels, pairs (`SNLI_TASK`)."""

    name: str  # 'snli', 'ag_news' or 'files'
    label_names: tuple[str, ...]
    paired: bool
    max_len: int | None = None  # None: the model's own max_len
    data: dict | None = None  # None: the task's default data

    def to_config(self) -> dict:
        return {"task": {"name": self.name, "paired": self.paired, "max_len": self.max_len, "data": self.data},
                "labels": list(self.label_names)}

    @classmethod
    def from_config(cls, written: Mapping, path: str = CONFIG_FILE) -> "TaskRecord":
        """The record of a config.json (SNLI's for a folder written before tasks were recorded)."""
        if "labels" not in written and "task" not in written:
            return SNLI_TASK
        task, labels = written.get("task"), written.get("labels")
        well_formed_labels = (isinstance(labels, list) and len(labels) >= 2 and len(set(labels)) == len(labels)
                              and all(isinstance(name, str) for name in labels))
        if not (isinstance(task, Mapping) and isinstance(task.get("name"), str)
                and isinstance(task.get("paired"), bool) and well_formed_labels):
            raise ValueError(f"{path}: 'task' must be {{\"name\": ..., \"paired\": true|false, ...}} and "
                             f"'labels' a list of two or more distinct names; found task={task!r}, "
                             f"labels={labels!r}; fine-tune the model again")
        return cls(task["name"], tuple(labels), task["paired"], task.get("max_len"), task.get("data"))


SNLI_TASK = TaskRecord("snli", tuple(LABEL_NAMES), True)


def read_checkpoint_config(folder: str | os.PathLike) -> dict | None:
    """The `config.json` nlibert writes beside a checkpoint, or None for the book's own folders."""
    path = os.path.join(folder, CONFIG_FILE)
    return read_json(path, dict) if os.path.exists(path) else None


def sniff_params_format(path: str | os.PathLike) -> str:
    """The format ('torch', 'mxnet' or 'jax') of a params file, judged by its first bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    for fmt, magics in FORMAT_MAGIC.items():
        if any(head.startswith(magic) for magic in magics):
            return fmt
    raise ValueError(f"{os.fspath(path)}: neither a torch state_dict, an MXNet parameter file nor a JAX "
                     "(Flax msgpack) parameter file")


def describe_checkpoint(folder: str | os.PathLike) -> CheckpointSource:
    """What a checkpoint folder holds: a Hugging Face BERT folder, or one in the book's layout
    (its format and kind from config.json, else from the files)."""
    folder = os.fspath(folder)
    if is_hf_folder(folder):
        return CheckpointSource(folder, HUGGING_FACE, "pretrained", hf_weights_path(folder))
    config = read_checkpoint_config(folder) or {}
    if "model_type" in config:  # Hugging Face's config.json, but is_hf_folder found no weights
        raise FileNotFoundError(f"{folder}: a Hugging Face config.json but none of its weight files "
                                f"({' or '.join(HF_WEIGHT_FILES)}); put the model's weights beside it")
    kind = config.get("kind") or next((k for k, f in PARAMS_FILES.items()
                                       if os.path.exists(os.path.join(folder, f))), None)
    if kind not in PARAMS_FILES:
        raise FileNotFoundError(f"{folder}: no pretrained.params or classifier.params")
    path = os.path.join(folder, PARAMS_FILES[kind])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: config.json says kind {kind!r} but {PARAMS_FILES[kind]} is missing")
    if not os.path.exists(os.path.join(folder, VOCAB_FILE)):
        raise FileNotFoundError(f"{folder}: no vocab.json")
    return CheckpointSource(folder, _params_format(path, config), kind, path)


def _params_format(path: str, written: Mapping) -> str:
    """The format of a folder's params file: its first bytes say, and config.json's `format`, where
    there is one, must agree."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing; the folder holds no complete checkpoint")
    found = sniff_params_format(path)
    if written.get("format", found) != found:
        raise ValueError(f"{os.path.join(os.path.dirname(path), CONFIG_FILE)}: says format {written['format']!r} "
                         f"but {os.path.basename(path)} is a {found} parameter file; set \"format\": \"{found}\" there")
    return found


def resolve_checkpoint(spec: str | os.PathLike, fmt: str) -> CheckpointSource:
    """The checkpoint a user names: a folder (the book's layout or Hugging Face's), a checkpoint
    installed as a package ('minilm-l6', core/hf.py), or a data-hub name ('bert.small',
    'bert.base'), downloaded (cached, sha1-checked) in the archive of format `fmt` (the torch one
    for a format the book publishes none in); an archive's own name ('bert.small.torch') is taken as
    it is, whatever `fmt`: every backend reads every format (`read_params_in`)."""
    name = os.fspath(spec)
    if os.path.isdir(name):
        return describe_checkpoint(name)
    if name in PACKAGED_CHECKPOINTS:
        return describe_checkpoint(resolve_packaged_checkpoint(name))
    from . import data_hub  # lazily: only hub names need the network modules
    hub_names = HUB_NAMES.get(fmt, HUB_NAMES[HUB_FALLBACK])
    archive = hub_names.get(name, name)
    if not name.startswith("bert.") or archive not in data_hub.DATA_HUB:
        known = sorted(set(PACKAGED_CHECKPOINTS) | set(hub_names))
        raise FileNotFoundError(f"{name!r} is neither a folder nor a checkpoint name (known: {known})")
    return describe_checkpoint(data_hub.download_extract(archive))


def read_params_as(path: str, file_format: str, fmt: str, read_params: ParamsReader) -> dict[str, np.ndarray]:
    """The tensors of a params file of format `file_format` under format `fmt`'s names, in the
    file's order: read by `read_params` (the file's own format's reader), renamed through the
    canonical names (core/names.py); values are never changed."""
    return convert_params(read_params(path, file_format), file_format, fmt, source=path)


def checkpoint_config(params: Mapping[str, np.ndarray], written: Mapping, vocab_size: int, source: str,
                      **given) -> BERTConfig:
    """The `BERTConfig` to build for a canonically named checkpoint: the sizes given, those given as
    None read off the tensors (the head count, which leaves no trace in them, from config.json if
    there is one, else 64-dimensional heads; dropout from config.json, else 0.1); the architecture
    options from config.json (the book's folders have none: the book's defaults), the embedding
    LayerNorm wherever its tensors are."""
    sizes = dict(given)
    if any(v is None for v in sizes.values()):
        heads = sizes.get("num_heads") if sizes.get("num_heads") is not None else written.get("num_heads")
        drop = sizes.get("dropout") if sizes.get("dropout") is not None else written.get("dropout", 0.1)
        try:
            inferred = infer_config(params, num_heads=heads, dropout=drop).to_dict()
        except KeyError as e:
            raise ValueError(f"{source}: cannot read sizes off the file: {e}") from e
        sizes = {k: (inferred[k] if v is None else v) for k, v in sizes.items()}
    defaults = BERTConfig(vocab_size=1)
    return BERTConfig(vocab_size=vocab_size, **sizes,
                      hidden_act=written.get("hidden_act", defaults.hidden_act),
                      layer_norm_eps=written.get("layer_norm_eps", defaults.layer_norm_eps),
                      embedding_norm="encoder.embedding_ln.weight" in params,
                      attention_dropout=written.get("attention_dropout", defaults.attention_dropout))


# The sizes `checkpoint_config` takes (the book's `load_pretrained_model` arguments); None: off the file.
SIZE_FIELDS = ("num_hiddens", "ffn_num_hiddens", "num_heads", "num_layers", "dropout", "max_len")


def folder_config(source: CheckpointSource, params: Mapping[str, np.ndarray]) -> dict:
    """The config.json of a checkpoint folder; for the book's own folders, which have none, the one
    their canonically named `params` imply (sizes off the tensors, 64-dimensional heads, the book's
    options), so that a copy (`convert`) carries its format and sizes and any backend reads it."""
    written = read_checkpoint_config(source.folder)
    if written is not None:
        return written
    vocab = load_folder_vocab(source.folder, {})
    cfg = checkpoint_config(params, {}, len(vocab), source.params_path, **dict.fromkeys(SIZE_FIELDS))
    return config_dict(cfg, source.format, source.kind, vocab)


def read_pretrained(spec: str | os.PathLike, fmt: str, read_params: ParamsReader,
                    **given) -> tuple[BERTConfig, object, dict[str, np.ndarray], list[str], str]:
    """Everything backend `fmt` needs to build and fill a `BERTModel` from what a user named:
    `(config, vocab, params under canonical names, canonical names of heads the file lacks, path)`.
    A Hugging Face folder gives its own config (sizes given must agree); a folder in the book's
    layout, of any backend's format, with or without config.json, is read in its own format by
    `read_params` and renamed to the canonical names."""
    source = resolve_checkpoint(spec, fmt)
    if source.format == HUGGING_FACE:
        return load_hf_checkpoint(source.folder, **given)
    written = read_checkpoint_config(source.folder) or {}
    vocab = load_folder_vocab(source.folder, written)
    params = to_canonical(read_params(source.params_path, source.format), source.format, source.params_path)
    return checkpoint_config(params, written, len(vocab), source.params_path, **given), vocab, params, [], \
        source.params_path


def check_filled(expected: Mapping[str, tuple], params: Mapping[str, np.ndarray], missing_heads: list[str],
                 source: str, fmt: str) -> None:
    """Every name and shape of `params` against a model's own (`expected`), both under canonical
    names, heads the file lacks excepted: an error names each mismatch, in backend `fmt`'s names (the
    ones its users see), before any tensor is copied."""
    def in_format(shapes: Mapping[str, tuple]) -> dict[str, tuple]:
        return {format_key(k, fmt): s for k, s in shapes.items()}

    check_shapes(in_format({k: s for k, s in expected.items() if k not in missing_heads}),
                 in_format({k: np.shape(v) for k, v in params.items()}), source)


def config_dict(config: BERTConfig | Mapping | None, fmt: str, kind: str, vocab=None) -> dict:
    """What config.json records: the sizes and options, the format and the kind of checkpoint, and
    for a WordPiece vocabulary the tokenizer settings that rebuild it from vocab.json."""
    if isinstance(config, BERTConfig):
        config = config.to_dict()
    if config is None:
        raise ValueError("no config to record: pass a BERTConfig (the model has no `config`)")
    out = {**BERTConfig.from_dict(dict(config)).to_dict(), "format": fmt, "kind": kind}
    settings = getattr(vocab, "settings", None)
    if settings is not None:
        out["tokenizer"] = settings()
    return out


def classifier_config(config: BERTConfig | Mapping | None, fmt: str, vocab, task: TaskRecord | None,
                      num_classes: int) -> dict:
    """What a classifier's config.json records: `config_dict` plus its task (None: SNLI's), whose
    label names must be as many as the classifier's outputs."""
    task = task if task is not None else SNLI_TASK
    if len(task.label_names) != num_classes:
        raise ValueError(f"the classifier has {num_classes} outputs but its task names {len(task.label_names)} "
                         f"labels ({', '.join(task.label_names)}); build it with num_classes="
                         f"{len(task.label_names)}")
    return {**config_dict(config, fmt, "classifier", vocab), **task.to_config()}


def load_folder_vocab(folder: str | os.PathLike, written: Mapping):
    """The vocabulary of a checkpoint folder: `vocab.json` as the book's word-level `Vocab`, or, when
    config.json records WordPiece tokenizer settings, the `WordPieceVocab` they describe."""
    from .vocab import load_vocab, read_vocab_list
    path = os.path.join(folder, VOCAB_FILE)
    settings = written.get("tokenizer")
    if not settings:
        return load_vocab(path)
    from .wordpiece import WordPieceVocab  # lazily: needs the tokenizers library
    return WordPieceVocab.from_settings(read_vocab_list(path), settings)


def read_classifier_folder(folder: str | os.PathLike, fmt: str, read_params: ParamsReader
                           ) -> tuple[BERTConfig, object, dict[str, np.ndarray], TaskRecord]:
    """`(config, vocab, params under format fmt's names, task)` of a fine-tuned model folder of any
    backend's format (read by `read_params` in its own), checked for consistency; the classifier
    has one output per label of `task`."""
    written = read_checkpoint_config(folder)
    if written is None:
        raise FileNotFoundError(f"{os.path.join(folder, CONFIG_FILE)}: missing; not a classifier folder")
    params_path = os.path.join(folder, CLASSIFIER_FILE)
    if written.get("kind") != "classifier":
        raise ValueError(f"{os.path.join(folder, CONFIG_FILE)}: kind {written.get('kind')!r}; expected a "
                         "classifier (a fine-tuned model folder)")
    cfg = BERTConfig.from_dict(written)
    vocab = load_folder_vocab(folder, written)
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"{folder}: vocab.json has {len(vocab)} tokens, config.json says {cfg.vocab_size}")
    task = TaskRecord.from_config(written, os.path.join(folder, CONFIG_FILE))
    return cfg, vocab, read_params_as(params_path, _params_format(params_path, written), fmt, read_params), task
