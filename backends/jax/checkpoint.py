"""Reading and writing checkpoints in the JAX backend's format.

The book's JAX code keeps parameters in memory only; nlibert's JAX folders are laid out as the
other backends' (`vocab.json`, `config.json` with `"format": "jax"`, and `pretrained.params` or
`classifier.params`). The params file is what a Flax user writes, `flax.serialization.to_bytes`
(msgpack) of the linen parameter tree: `msgpack_restore` of it is a tree `module.apply` takes.
Its leaves sit at the canonical names split at their dots, with the torch backend's shapes
(core/names.py's table for this format is empty), so converting between the formats copies
arrays bit for bit and renames nothing. Flax sorts a tree's keys when it writes it;
`read_params` gives the names back in the canonical (`state_dict`) order.

As in the other backends, sizes passed as None are read off the file, and any size the file
contradicts is an error that names the key and both shapes.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from nlibert.backends import read_params_in
from nlibert.core.config import BERTConfig
from nlibert.core.folders import (CLASSIFIER_FILE, CONFIG_FILE, FORMAT_MAGIC, PRETRAINED_FILE, VOCAB_FILE,
                                  check_filled, TaskRecord, classifier_config, config_dict,
                                  read_classifier_folder, read_pretrained)
from nlibert.core.io import atomic_write, write_json
from nlibert.core.names import check_shapes, expected_shapes, infer_config
from nlibert.core.training import require_devices
from nlibert.core.vocab import Vocab, save_vocab

from ._layers import _draw_params, _shapes_only
from .model import BERTClassifier, BERTModel, _BERT, _config_items, _MaskLM, _NextSentencePred, _Params, _Pooler
from .runtime import _next_key

FORMAT = "jax"  # the format config.json records, the backend's name in nlibert.backends


def read_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a JAX-format params file, keyed by canonical name, in `state_dict` order."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such parameter file")
    with open(path, "rb") as f:
        data = f.read()
    if not any(data.startswith(magic) for magic in FORMAT_MAGIC[FORMAT]):  # a msgpack map
        raise ValueError(f"{path}: not a JAX (Flax msgpack) parameter file (a torch or MXNet checkpoint? "
                         "convert it with `nlibert convert SRC DST --to jax`)")
    try:
        flat = _flatten(serialization.msgpack_restore(data))
    except Exception as e:  # truncated or damaged msgpack, or not a tree of arrays
        raise ValueError(f"{path}: not a readable JAX parameter file ({type(e).__name__}: {e})") from e
    if not all(isinstance(v, np.ndarray) for v in flat.values()):
        raise ValueError(f"{path}: expected a tree of arrays")
    return _in_canonical_order(flat)


def write_params(params: Mapping[str, np.ndarray | jax.Array], path: str | os.PathLike) -> None:
    """Write a name -> array map atomically as the Flax msgpack of its tree (names split at dots)."""
    tree = _nest({k: np.asarray(v) for k, v in params.items()})
    with atomic_write(path, "wb") as f:
        f.write(serialization.msgpack_serialize(tree))


def _in_canonical_order(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`flat` in the order of a `BERTModel`'s (or, with `output.*`, a `BERTClassifier`'s) state_dict;
    names outside it (none in a well-formed file; `check_shapes` names them) go last."""
    try:
        cfg = infer_config(flat)
    except (KeyError, ValueError):
        return flat
    order = list(expected_shapes(cfg, "classifier" if "output.weight" in flat else "pretrained"))
    return {**{k: flat[k] for k in order if k in flat}, **{k: v for k, v in flat.items() if k not in order}}


def _first_device(devices: Sequence[jax.Device] | None) -> jax.Device:
    return jax.devices("cpu")[0] if devices is None else require_devices(devices)[0]


def _flatten(params: _Params, prefix: str = "") -> dict[str, np.ndarray]:
    """{'encoder': {'blks': {'0': ...}}} -> {'encoder.blks.0....': array}: the canonical names."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _nest(flat: Mapping[str, np.ndarray]) -> _Params:
    """The inverse of `_flatten`: canonical names split at their dots."""
    tree: dict = {}
    for name, value in flat.items():
        *path, leaf = name.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _state_dict(params: _Params, config: BERTConfig, kind: str) -> dict[str, np.ndarray]:
    """The parameters as numpy arrays under canonical names, in the torch `state_dict`'s order."""
    flat = _flatten(params)
    return {name: np.asarray(flat[name]) for name in expected_shapes(config, kind)}


def _shapes(params: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in params.items()}


def _fresh_heads(cfg: BERTConfig, prefixes: Iterable[str]) -> _Params:
    """`BERTModel`'s heads named by `prefixes` ('hidden', 'mlm', 'nsp'), each drawn alone as the
    whole model draws it (torch's initial distributions), keyed by those names."""
    H = cfg.num_hiddens
    states, positions = jax.ShapeDtypeStruct((1, 1, H), jnp.float32), jax.ShapeDtypeStruct((1, 1), jnp.int32)
    pooled = jax.ShapeDtypeStruct((1, H), jnp.float32)
    heads = {"hidden": (_Pooler(H), pooled), "nsp": (_NextSentencePred(), pooled),
             "mlm": (_MaskLM(cfg.vocab_size, H, cfg.hidden_act, cfg.layer_norm_eps), states, positions)}
    return {name: _draw_params(heads[name][0], _next_key(), *heads[name][1:]) for name in prefixes}


def load_pretrained_model(pretrained_model: str | os.PathLike, num_hiddens: int | None = None,
                          ffn_num_hiddens: int | None = None, num_heads: int | None = None,
                          num_layers: int | None = None, dropout: float | None = None, max_len: int | None = None,
                          devices: Sequence[jax.Device] | None = None) -> tuple[BERTModel, Vocab]:
    """The book's loader: `(bert, vocab)` from a data-hub name (after `nlibert convert`: the book
    published torch and MXNet checkpoints only), a packaged checkpoint ('minilm-l6'), a JAX-format
    folder or a Hugging Face BERT folder (core/folders.py `read_pretrained`).

    Sizes left out (None) are read off the checkpoint; `dropout` is honoured. Heads a Hugging Face
    file lacks (MiniLM has no MLM or NSP head) keep their fresh initialisation. `bert(tokens,
    segments, valid_lens, pred_positions)` returns `(encoded_X, mlm_Y_hat, nsp_Y_hat)`, dropout off.
    """
    cfg, vocab, params, missing_heads, path = read_pretrained(
        pretrained_model, FORMAT, read_params_in, num_hiddens=num_hiddens, ffn_num_hiddens=ffn_num_hiddens,
        num_heads=num_heads, num_layers=num_layers, dropout=dropout, max_len=max_len)
    with _shapes_only():  # the checkpoint fills them; only the heads it lacks are drawn
        bert = BERTModel.from_config(cfg)
    own = _flatten(bert.params)
    check_filled(_shapes(own), params, missing_heads, path, FORMAT)
    own.update(_flatten(_fresh_heads(cfg, sorted({name.split(".")[0] for name in missing_heads}))))
    own.update({k: np.array(v, dtype=np.float32) for k, v in params.items()})
    bert.params = jax.device_put(_nest(own), _first_device(devices))
    return bert, vocab


def save_pretrained(bert: BERTModel, vocab: Vocab, folder: str | os.PathLike) -> None:
    """`vocab.json`, `config.json` and `pretrained.params` (written last: its presence means complete)."""
    os.makedirs(folder, exist_ok=True)
    save_vocab(vocab, os.path.join(folder, VOCAB_FILE))
    write_json(os.path.join(folder, CONFIG_FILE), config_dict(bert.config, FORMAT, "pretrained", vocab))
    write_params(_state_dict(bert.params, bert.config, "pretrained"), os.path.join(folder, PRETRAINED_FILE))


def save_classifier(net: BERTClassifier, vocab: Vocab, config: BERTConfig | Mapping | None,
                    folder: str | os.PathLike, task: TaskRecord | None = None) -> None:
    """Write a fine-tuned classifier: `classifier.params`, `vocab.json`, `config.json` (kind 'classifier',
    and `task`: its label names, one per output; None: SNLI's).
    `config` None means the one the classifier carries."""
    config = config if config is not None else getattr(net, "config", None)
    os.makedirs(folder, exist_ok=True)
    save_vocab(vocab, os.path.join(folder, VOCAB_FILE))
    written = classifier_config(config, FORMAT, vocab, task, net.num_classes)
    write_json(os.path.join(folder, CONFIG_FILE), written)
    write_params(_state_dict(net.params, BERTConfig.from_dict(written), "classifier"),
                 os.path.join(folder, CLASSIFIER_FILE))


class _Backbone:
    """What `BERTClassifier` takes of a `BERTModel` (config, module flags, encoder and pooler), with
    no parameters drawn: the file's replace the classifier's at once."""

    def __init__(self, cfg: BERTConfig) -> None:
        self.config, self.module = cfg, _BERT(_config_items(cfg))
        self.params = {"encoder": {}, "hidden": {}}


def load_classifier(folder: str | os.PathLike, devices: Sequence[jax.Device]
                    ) -> tuple[BERTClassifier, Vocab, BERTConfig]:
    """Read back what `save_classifier` wrote: `(net, vocab, config)`, the net on devices[0], with one
    output per label config.json records."""
    cfg, vocab, params, task = read_classifier_folder(folder, FORMAT, read_params_in)
    check_shapes(expected_shapes(cfg, "classifier", len(task.label_names)), _shapes(params),
                 os.path.join(folder, CLASSIFIER_FILE))
    net = BERTClassifier(_Backbone(cfg), num_classes=len(task.label_names))
    net.params = jax.device_put(_nest(params), _first_device(devices))
    return net, vocab, cfg
