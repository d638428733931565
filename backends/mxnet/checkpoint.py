"""Reading and writing checkpoints in the book's MXNet format.

A pretrained folder is what the book downloads: `vocab.json` (index -> token) and
`pretrained.params` (a `save_parameters` file); we add `config.json` (a `BERTConfig` dict plus
`"format": "mxnet"`, `"kind": "pretrained"`). A fine-tuned folder holds `vocab.json`,
`classifier.params` and `config.json` with `"kind": "classifier"`.

Unlike the book's `load_pretrained_model`, which builds the model from the sizes it is given, a
size passed as None is read off the file, and any size the file contradicts is an error that
names the key and both shapes.

Parameter files come in two namings: `save_parameters` writes structured names
(`encoder.blks.0.attention.W_q.weight`), while the deprecated `collect_params().save` wrote
Gluon's global prefixed names (`bertencoder0_pos_embedding`, `dense3_weight`, ...), whose counters
depend on what else the saving process had built. `read_params` always returns structured names:
a prefixed file is mapped by position onto the model's `collect_params()` order, after checking
that every name has the right block type and parameter kind at its position; anything that does
not fit is refused with a message naming the file and the first mismatch.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import mxnet as mx
import numpy as onp
from mxnet import init, np, npx
from mxnet.base import MXNetError
from mxnet.gluon import nn

from nlibert.backends import read_params_in
from nlibert.core.config import BERTConfig
from nlibert.core.folders import (CLASSIFIER_FILE, CONFIG_FILE, PRETRAINED_FILE, VOCAB_FILE, check_filled,
                                  TaskRecord, classifier_config, config_dict, read_classifier_folder,
                                  read_pretrained)
from nlibert.core.io import atomic_path, write_json
from nlibert.core.names import canonical_key, check_shapes, from_canonical
from nlibert.core.training import require_devices
from nlibert.core.vocab import Vocab, save_vocab

from .model import BERTClassifier, BERTEncoder, BERTModel

npx.set_np()

FORMAT = "mxnet"  # the format config.json records, the backend's name in nlibert.backends

def _load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The name -> array dict of an MXNet parameter file (numpy- or legacy-semantics); anything
    else is a ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such parameter file")
    try:
        loaded = npx.load(path)
    except MXNetError as e:
        if "is_np_shape" not in str(e):
            raise ValueError(f"{path}: not an MXNet parameter file ({str(e).strip().splitlines()[-1]}); "
                             "a PyTorch checkpoint must be converted first") from e
        # Saved outside numpy semantics (mx.nd.save): load it the legacy way, as load_parameters does.
        with mx.util.np_array(False), mx.util.np_shape(False):
            legacy = mx.nd.load(path)
        loaded = {k: v.as_np_ndarray() for k, v in legacy.items()} if isinstance(legacy, dict) else legacy
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: holds an unnamed list of {len(loaded)} arrays, not named parameters")
    return loaded


def _strip_counters(name: str) -> str:
    """'bertencoder0_pos_embedding' -> 'bertencoder_pos_embedding': a prefixed name minus Gluon's counters."""
    return re.sub(r"\d+_", "_", name)


def _legacy_template(num_tensors: int) -> tuple[str, list[tuple[str, str]]] | None:
    """(kind, [(prefixed name, structured name), ...]) in `collect_params()` order for the book model
    that has `num_tensors` parameters: 13 + 16 L for a BERTModel, 7 + 16 L for a BERTClassifier."""
    if num_tensors > 13 and (num_tensors - 13) % 16 == 0:
        kind, model = "pretrained", BERTModel(1, 1, 1, 1, (num_tensors - 13) // 16, 0.0, 1)
    elif num_tensors > 7 and (num_tensors - 7) % 16 == 0:
        cfg = BERTConfig(vocab_size=1, num_hiddens=1, ffn_num_hiddens=1, num_heads=1,
                         num_layers=(num_tensors - 7) // 16, dropout=0.0, max_len=1)
        kind, model = "classifier", BERTClassifier(_Backbone(cfg))
    else:
        return None
    # A tiny unallocated model of the right depth: only its names are used. Both orders list a
    # block's own parameters, then its children in the order they were assigned.
    return kind, list(zip(model.collect_params().keys(), model._collect_params_with_prefix().keys()))


def _rename_legacy(arrays: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """Map Gluon's prefixed names onto structured ones by position, refusing anything that does not fit."""
    names = list(arrays)
    template = _legacy_template(len(names))
    if template is None:
        raise ValueError(f"{path}: uses Gluon's legacy prefixed names (no '.' in any key) but holds "
                         f"{len(names)} tensors, which is neither a BERTModel (13 + 16 per layer) nor a "
                         "BERTClassifier (7 + 16 per layer); cannot map it to structured names")
    kind, pairs = template
    renamed = {}
    for i, (name, (prefixed, structured)) in enumerate(zip(names, pairs)):
        want = _strip_counters(prefixed)
        got = _strip_counters(name)
        # The saver may have used name scopes, which prepend its parents' prefixes.
        if got != want and not got.endswith("_" + want):
            raise ValueError(f"{path}: uses Gluon's legacy prefixed names, mapped by the order of the book's "
                             f"{kind} model, but tensor {i} is {name!r} where a name like {prefixed!r} "
                             f"({structured}) belongs; re-save it with save_parameters")
        renamed[structured] = arrays[name]
    return renamed


def read_params(path: str | os.PathLike) -> dict[str, onp.ndarray]:
    """The tensors of an MXNet parameter file as numpy arrays, keyed by `save_parameters` name.
    Files with Gluon's legacy prefixed names are renamed to structured names (module docstring)."""
    path = os.fspath(path)
    arrays = _load_arrays(path)
    if arrays and not any("." in k for k in arrays):  # the test load_parameters itself uses
        arrays = _rename_legacy(arrays, path)
    return {k: v.asnumpy() for k, v in arrays.items()}


def _to_cpu_array(value: onp.ndarray | np.ndarray) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.as_in_ctx(mx.cpu())
    value = onp.asarray(value)
    return np.array(value, dtype=value.dtype, ctx=mx.cpu())


def write_params(params: Mapping[str, onp.ndarray | np.ndarray], path: str | os.PathLike) -> None:
    """`npx.save` a name -> array dict atomically (temp file beside `path`, then rename); order is kept.
    With structured names the file is what `save_parameters` writes and `load_parameters` reads."""
    arrays = {k: _to_cpu_array(v) for k, v in params.items()}
    with atomic_path(path) as tmp:
        npx.save(tmp, arrays)


def _as_contexts(devices: Sequence[mx.Context] | mx.Context | None) -> list[mx.Context]:
    if devices is None:
        return [mx.cpu()]
    if isinstance(devices, mx.Context):
        return [devices]
    return require_devices(devices)


def _shapes(params: Mapping) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in params.items()}


def _load_strict(net: nn.Block, params: Mapping[str, onp.ndarray], file: str,
                 devices: Sequence[mx.Context]) -> None:
    """Check every name and shape first (a readable error), then copy the arrays onto every device."""
    own = net._collect_params_with_prefix()  # the names save_parameters / load_parameters use
    check_shapes(_shapes(own), _shapes(params), file)
    # Every shape is known at construction (model.py), so this allocates at once; the zeros are
    # overwritten below. force_reinit: a net loaded twice is simply reloaded.
    net.initialize(init.Zero(), ctx=list(devices), force_reinit=True)
    for name, param in own.items():
        param.set_data(np.array(params[name], dtype=params[name].dtype))


def load_pretrained_model(pretrained_model: str | os.PathLike, num_hiddens: int | None = None,
                          ffn_num_hiddens: int | None = None, num_heads: int | None = None,
                          num_layers: int | None = None, dropout: float | None = None, max_len: int | None = None,
                          devices: Sequence[mx.Context] | None = None) -> tuple[BERTModel, Vocab]:
    """The book's loader: `(bert, vocab)` from a data-hub name ('bert.small', 'bert.base'), a
    packaged checkpoint ('minilm-l6'), an MXNet-format folder or a Hugging Face BERT folder
    (core/folders.py `read_pretrained`).

    The vocabulary size comes from `vocab.json`. A size left out (None) is read from the checkpoint
    (the head count, which leaves no trace in the tensors, from config.json if there is one, else
    64-dimensional heads). The parameters are placed on every device in `devices` (None: the CPU).
    Heads a Hugging Face file lacks (MiniLM has no MLM or NSP head) get the book's `init.Xavier()`.
    """
    devices = _as_contexts(devices)
    cfg, vocab, params, missing_heads, path = read_pretrained(
        pretrained_model, FORMAT, read_params_in, num_hiddens=num_hiddens, ffn_num_hiddens=ffn_num_hiddens,
        num_heads=num_heads, num_layers=num_layers, dropout=dropout, max_len=max_len)
    bert = BERTModel.from_config(cfg)
    own = bert._collect_params_with_prefix()  # the names save_parameters / load_parameters use
    check_filled({canonical_key(k, FORMAT): p.shape for k, p in own.items()}, params, missing_heads, path, FORMAT)
    # Every shape is known at construction (model.py), so this allocates at once; what the file
    # holds overwrites it below. force_reinit: a net loaded twice is simply reloaded.
    bert.initialize(init.Xavier() if missing_heads else init.Zero(), ctx=devices, force_reinit=True)
    for name, value in from_canonical(params, FORMAT, path).items():
        own[name].set_data(np.array(value, dtype="float32"))
    return bert, vocab


def _uninitialized(net: nn.Block) -> list[str]:
    """Names of the parameters that hold no data yet."""
    missing = []
    for name, param in net._collect_params_with_prefix().items():
        try:
            param.list_ctx()
        except RuntimeError:
            missing.append(name)
    return missing


def _save_parameters(net: nn.Block, path: str) -> None:
    """`net.save_parameters`, atomically: the book's file, written beside `path` and renamed over it."""
    with atomic_path(path) as tmp:
        net.save_parameters(tmp)


def save_pretrained(bert: BERTModel, vocab: Vocab, folder: str | os.PathLike) -> None:
    """Write a folder the book's MXNet loader can read (`vocab.json` + `pretrained.params`), plus config.json.

    A model that was never initialised first gets the book's pretraining init, `init.Xavier()`
    (torch models are initialised when built; Gluon ones are not). `pretrained.params` is written
    last, so its presence means the folder is complete.
    """
    own = bert._collect_params_with_prefix()
    for name in _uninitialized(bert):
        # As `bert.initialize(init.Xavier())`: Xavier only where a parameter names no initializer
        # of its own (Dense biases stay zeros, LayerNorm gamma/beta ones/zeros).
        own[name].initialize(default_init=init.Xavier())
    os.makedirs(folder, exist_ok=True)
    save_vocab(vocab, os.path.join(folder, VOCAB_FILE))
    write_json(os.path.join(folder, CONFIG_FILE), config_dict(bert.config, FORMAT, "pretrained", vocab))
    _save_parameters(bert, os.path.join(folder, PRETRAINED_FILE))


def save_classifier(net: BERTClassifier, vocab: Vocab, config: BERTConfig | Mapping | None,
                    folder: str | os.PathLike, task: TaskRecord | None = None) -> None:
    """Write a fine-tuned classifier: `classifier.params`, `vocab.json`, `config.json` (kind 'classifier',
    and `task`: its label names, one per output; None: SNLI's).
    `config` None means the one the classifier carries; `classifier.params` is written last."""
    missing = _uninitialized(net)
    if missing:
        raise ValueError(f"cannot save a classifier with uninitialised parameters {missing} "
                         "(call net.output.initialize(ctx=devices) as the book does)")
    config = config if config is not None else getattr(net, "config", None)
    os.makedirs(folder, exist_ok=True)
    save_vocab(vocab, os.path.join(folder, VOCAB_FILE))
    write_json(os.path.join(folder, CONFIG_FILE), classifier_config(config, FORMAT, vocab, task, net.num_classes))
    _save_parameters(net, os.path.join(folder, CLASSIFIER_FILE))


class _Backbone(nn.Block):
    """Encoder + pooler only: what `BERTClassifier` keeps of a `BERTModel`, built without the
    MLM head, whose (V, H) output layer a classifier would never use."""

    def __init__(self, cfg: BERTConfig, **kwargs) -> None:
        super().__init__(**kwargs)
        self.config = cfg
        self.encoder = BERTEncoder.from_config(cfg)
        self.hidden = nn.Dense(cfg.num_hiddens, activation="tanh", in_units=cfg.num_hiddens)


def load_classifier(folder: str | os.PathLike, devices: Sequence[mx.Context]
                    ) -> tuple[BERTClassifier, Vocab, BERTConfig]:
    """Read back what `save_classifier` wrote: `(net, vocab, config)`, the net on every device, with one
    output per label config.json records."""
    devices = _as_contexts(devices)
    cfg, vocab, params, task = read_classifier_folder(folder, FORMAT, read_params_in)
    net = BERTClassifier(_Backbone(cfg), num_classes=len(task.label_names))
    _load_strict(net, params, os.path.join(folder, CLASSIFIER_FILE), devices)
    return net, vocab, cfg
