"""Reading and writing checkpoints in the book's PyTorch format.

A pretrained folder is what the book downloads: `vocab.json` (index -> token) and
`pretrained.params` (a `torch.save`d `state_dict`); we add `config.json` (a `BERTConfig` dict plus
`"format": "torch"`, `"kind": "pretrained"`). A fine-tuned folder holds `vocab.json`,
`classifier.params` and `config.json` with `"kind": "classifier"`.

Unlike the book's `load_pretrained_model`, which hard-codes bert.small's sizes and dropout 0.2,
the sizes here are the ones passed (or read off the file when passed as None), and any size the
file contradicts is an error that names the key and both shapes.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from nlibert.backends import read_params_in
from nlibert.core.config import BERTConfig
from nlibert.core.folders import (CLASSIFIER_FILE, CONFIG_FILE, PRETRAINED_FILE, VOCAB_FILE, check_filled,
                                  TaskRecord, classifier_config, config_dict, read_classifier_folder,
                                  read_pretrained)
from nlibert.core.io import atomic_write, write_json
from nlibert.core.names import check_shapes
from nlibert.core.training import require_devices
from nlibert.core.vocab import Vocab, save_vocab

from .model import BERTClassifier, BERTEncoder, BERTModel

FORMAT = "torch"  # the format config.json records, the backend's name in nlibert.backends


def _load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torch `state_dict` from `path`, on the CPU; anything else is a ValueError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such parameter file")
    with open(path, "rb") as f:
        if not f.read(2) == b"PK":  # torch.save writes a zip; torch's own error would suggest weights_only=False
            raise ValueError(f"{path}: not a PyTorch state_dict file (an MXNet checkpoint? convert it with "
                             "`nlibert convert SRC DST --to torch`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or damaged zip, pickle errors, ...
        raise ValueError(f"{path}: not a readable PyTorch state_dict file ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise ValueError(f"{path}: expected a state_dict (names -> tensors), found {type(obj).__name__}")
    return dict(obj)


def read_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a torch parameter file as numpy arrays, keyed by `state_dict` name."""
    return {k: v.detach().cpu().numpy() for k, v in _load_state_dict(path).items()}


def write_params(params: Mapping[str, np.ndarray | torch.Tensor], path: str | os.PathLike) -> None:
    """`torch.save` a name -> tensor dict atomically; numpy arrays become tensors, order is kept."""
    def as_tensor(v: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            return v.detach().cpu()
        return torch.from_numpy(np.array(v, order="C"))  # a copy: the array may be read-only

    tensors = {k: as_tensor(v) for k, v in params.items()}
    with atomic_write(path, "wb") as f:
        torch.save(tensors, f)


def _first_device(devices: Sequence[torch.device] | torch.device | str | None) -> torch.device:
    if devices is None:
        return torch.device("cpu")
    if isinstance(devices, (torch.device, str)):
        return torch.device(devices)
    return torch.device(require_devices(devices)[0])


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _load_strict(net: nn.Module, state: Mapping[str, torch.Tensor], file: str) -> None:
    """Check every name and shape first (a readable error), then copy the tensors in."""
    check_shapes(_shapes(net.state_dict()), _shapes(state), file)
    net.load_state_dict(state, strict=True)


def load_pretrained_model(pretrained_model: str | os.PathLike, num_hiddens: int | None = None,
                          ffn_num_hiddens: int | None = None, num_heads: int | None = None,
                          num_layers: int | None = None, dropout: float | None = None, max_len: int | None = None,
                          devices: Sequence[torch.device] | None = None) -> tuple[BERTModel, Vocab]:
    """The book's loader: `(bert, vocab)` from a data-hub name ('bert.small', 'bert.base'), a
    packaged checkpoint ('minilm-l6'), a torch-format folder or a Hugging Face BERT folder
    (core/folders.py `read_pretrained`).

    The vocabulary size comes from `vocab.json`. A size left out (None) is read from the checkpoint
    (the head count, which leaves no trace in the tensors, from config.json if there is one, else
    64-dimensional heads); `dropout` is honoured (the book's torch code ignored it and used 0.2).
    Heads a Hugging Face file lacks (MiniLM has no MLM or NSP head) keep torch's initialisation.
    """
    cfg, vocab, params, missing_heads, path = read_pretrained(
        pretrained_model, FORMAT, read_params_in, num_hiddens=num_hiddens, ffn_num_hiddens=ffn_num_hiddens,
        num_heads=num_heads, num_layers=num_layers, dropout=dropout, max_len=max_len)
    bert = BERTModel.from_config(cfg)
    check_filled(_shapes(bert.state_dict()), params, missing_heads, path, FORMAT)
    bert.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in params.items()},
                         strict=not missing_heads)
    return bert.to(_first_device(devices)), vocab


def _unwrap(net: nn.Module) -> nn.Module:
    """The module inside an `nn.DataParallel`, so saved keys never carry a `module.` prefix."""
    return net.module if isinstance(net, nn.DataParallel) else net


def save_pretrained(bert: BERTModel, vocab: Vocab, folder: str | os.PathLike) -> None:
    """Write a folder the book's torch loader can read (`vocab.json` + `pretrained.params`), plus config.json."""
    bert = _unwrap(bert)
    os.makedirs(folder, exist_ok=True)
    # The params file last: a folder that has it is complete (jobs reuse such folders).
    save_vocab(vocab, os.path.join(folder, VOCAB_FILE))
    write_json(os.path.join(folder, CONFIG_FILE), config_dict(bert.config, FORMAT, "pretrained", vocab))
    write_params(bert.state_dict(), os.path.join(folder, PRETRAINED_FILE))


def save_classifier(net: BERTClassifier, vocab: Vocab, config: BERTConfig | Mapping | None,
                    folder: str | os.PathLike, task: TaskRecord | None = None) -> None:
    """Write a fine-tuned classifier: `classifier.params`, `vocab.json`, `config.json` (kind 'classifier',
    and `task`: its label names, one per output; None: SNLI's).
    `config` None means the one the classifier carries."""
    net = _unwrap(net)
    config = config if config is not None else getattr(net, "config", None)
    os.makedirs(folder, exist_ok=True)
    save_vocab(vocab, os.path.join(folder, VOCAB_FILE))
    write_json(os.path.join(folder, CONFIG_FILE), classifier_config(config, FORMAT, vocab, task, net.num_classes))
    write_params(net.state_dict(), os.path.join(folder, CLASSIFIER_FILE))


class _Backbone(nn.Module):
    """Encoder + pooler only: what `BERTClassifier` keeps of a `BERTModel`, built without the
    MLM head, whose (V, H) output layer a classifier would never use."""

    def __init__(self, cfg: BERTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = BERTEncoder.from_config(cfg)
        self.hidden = nn.Sequential(nn.Linear(cfg.num_hiddens, cfg.num_hiddens), nn.Tanh())


def load_classifier(folder: str | os.PathLike, devices: Sequence[torch.device]
                    ) -> tuple[BERTClassifier, Vocab, BERTConfig]:
    """Read back what `save_classifier` wrote: `(net, vocab, config)`, the net on devices[0], with one
    output per label config.json records."""
    cfg, vocab, params, task = read_classifier_folder(folder, FORMAT, read_params_in)
    net = BERTClassifier(_Backbone(cfg), num_classes=len(task.label_names))
    _load_strict(net, {k: torch.from_numpy(np.array(v)) for k, v in params.items()},
                 os.path.join(folder, CLASSIFIER_FILE))
    return net.to(_first_device(devices)), vocab, cfg
