"""The book's two checkpoint formats, framework-neutral: parameter names, shapes, and the map between them.

A checkpoint folder holds `vocab.json` (a list: index -> token) and `pretrained.params`, a torch
`state_dict` or an MXNet `save_parameters` file. The names differ in only three ways (facts §1.4);
no tensor is ever transposed, because Gluon `Dense.weight` is (out, in) like torch `Linear.weight`:

| torch `state_dict`                    | MXNet `save_parameters`           | why                               |
|---------------------------------------|-----------------------------------|-----------------------------------|
| `....ln.weight` / `....ln.bias`       | `....ln.gamma` / `....ln.beta`    | Gluon names LayerNorm parameters  |
| `hidden.0.weight`                     | `hidden.weight`                   | Gluon fuses Tanh into the Dense   |
| `mlm.mlp.2.weight` / `.bias` (LN)     | `mlm.mlp.1.gamma` / `.beta`       | Gluon fuses ReLU into the Dense,  |
| `mlm.mlp.3.*`                         | `mlm.mlp.2.*`                     | so Sequential indices shift by 1  |

Everything else (`encoder.*`, `nsp.output.*`, a classifier's `output.*`) is the same in both.
Models with BERT's embedding LayerNorm (`BERTConfig.embedding_norm`, Hugging Face checkpoints) add
`encoder.embedding_ln.weight` / `.bias` (MXNet `.gamma` / `.beta`). Hugging Face's own names are
mapped onto the torch names in core/hf.py.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from .config import BERTConfig
from .io import read_json

# Every torch name the book's models have; anything else in a file is an error that names it.
_TORCH_KEY_PATTERNS = [re.compile(p) for p in (
    r"encoder\.pos_embedding",
    r"encoder\.(token|segment)_embedding\.weight",
    r"encoder\.embedding_ln\.(weight|bias)",
    r"encoder\.blks\.\d+\.attention\.W_[qkvo]\.(weight|bias)",
    r"encoder\.blks\.\d+\.addnorm[12]\.ln\.(weight|bias)",
    r"encoder\.blks\.\d+\.ffn\.dense[12]\.(weight|bias)",
    r"hidden\.0\.(weight|bias)",
    r"mlm\.mlp\.[023]\.(weight|bias)",
    r"nsp\.output\.(weight|bias)",
    r"output\.(weight|bias)",
)]

# (torch regex, mxnet replacement) and back; applied first match wins.
_TORCH_TO_MXNET = [
    (re.compile(r"^(.*\.(?:embedding_)?ln)\.weight$"), r"\1.gamma"),
    (re.compile(r"^(.*\.(?:embedding_)?ln)\.bias$"), r"\1.beta"),
    (re.compile(r"^hidden\.0\.(weight|bias)$"), r"hidden.\1"),
    (re.compile(r"^mlm\.mlp\.2\.weight$"), "mlm.mlp.1.gamma"),
    (re.compile(r"^mlm\.mlp\.2\.bias$"), "mlm.mlp.1.beta"),
    (re.compile(r"^mlm\.mlp\.3\.(weight|bias)$"), r"mlm.mlp.2.\1"),
]
_MXNET_TO_TORCH = [
    (re.compile(r"^(.*\.(?:embedding_)?ln)\.gamma$"), r"\1.weight"),
    (re.compile(r"^(.*\.(?:embedding_)?ln)\.beta$"), r"\1.bias"),
    (re.compile(r"^hidden\.(weight|bias)$"), r"hidden.0.\1"),
    (re.compile(r"^mlm\.mlp\.1\.gamma$"), "mlm.mlp.2.weight"),
    (re.compile(r"^mlm\.mlp\.1\.beta$"), "mlm.mlp.2.bias"),
    (re.compile(r"^mlm\.mlp\.2\.(weight|bias)$"), r"mlm.mlp.3.\1"),
]

FORMATS = ("torch", "mxnet")


def _is_torch_key(key: str) -> bool:
    return any(p.fullmatch(key) for p in _TORCH_KEY_PATTERNS)


def _rewrite(key: str, rules) -> str:
    for pattern, repl in rules:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key


def torch_to_mxnet_key(key: str) -> str:
    """The MXNet `save_parameters` name of a torch `state_dict` key; unknown keys raise KeyError."""
    if not _is_torch_key(key):
        raise KeyError(f"unknown torch parameter name {key!r}")
    return _rewrite(key, _TORCH_TO_MXNET)


def mxnet_to_torch_key(key: str) -> str:
    """The torch `state_dict` key of an MXNet `save_parameters` name; unknown keys raise KeyError."""
    torch_key = _rewrite(key, _MXNET_TO_TORCH)
    # The map must be a bijection: reject names whose round trip does not come back.
    if not _is_torch_key(torch_key) or torch_to_mxnet_key(torch_key) != key:
        raise KeyError(f"unknown MXNet parameter name {key!r}")
    return torch_key


def convert_params(params: Mapping[str, np.ndarray], to: str, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Rename every tensor of a checkpoint into the other format; values are copied bit for bit."""
    if to not in FORMATS:
        raise ValueError(f"unknown format {to!r}: use one of {FORMATS}")
    rename = torch_to_mxnet_key if to == "mxnet" else mxnet_to_torch_key
    unknown, out = [], {}
    for key, value in params.items():
        try:
            out[rename(key)] = np.asarray(value)
        except KeyError:
            unknown.append(key)
    if unknown:
        src = "mxnet" if to == "torch" else "torch"
        raise KeyError(f"{source}: parameter names that are not {src}-format BERT names: {unknown}")
    return out


def detect_format(keys) -> str:
    """'torch' or 'mxnet', judged by the parameter names alone."""
    keys = list(keys)
    if any(k.endswith((".gamma", ".beta")) or k.startswith("hidden.weight") for k in keys):
        return "mxnet"
    if any(k.startswith("hidden.0.") or re.search(r"\.ln\.(weight|bias)$", k) for k in keys):
        return "torch"
    raise ValueError(f"cannot tell the checkpoint format from its parameter names: {keys[:5]}...")


def expected_shapes(cfg: BERTConfig, kind: str = "pretrained") -> dict[str, tuple[int, ...]]:
    """Torch names and shapes of the book's `BERTModel` ('pretrained') or `BERTClassifier` ('classifier'),
    in `state_dict` order (facts §1.4)."""
    V, H, F = cfg.vocab_size, cfg.num_hiddens, cfg.ffn_num_hiddens
    shapes: dict[str, tuple[int, ...]] = {
        "encoder.pos_embedding": (1, cfg.max_len, H),
        "encoder.token_embedding.weight": (V, H),
        "encoder.segment_embedding.weight": (2, H),
    }
    if cfg.embedding_norm:
        shapes["encoder.embedding_ln.weight"] = shapes["encoder.embedding_ln.bias"] = (H,)
    for i in range(cfg.num_layers):
        b = f"encoder.blks.{i}."
        for w in "qkvo":
            shapes[b + f"attention.W_{w}.weight"] = (H, H)
            shapes[b + f"attention.W_{w}.bias"] = (H,)
        shapes[b + "addnorm1.ln.weight"] = shapes[b + "addnorm1.ln.bias"] = (H,)
        shapes[b + "ffn.dense1.weight"], shapes[b + "ffn.dense1.bias"] = (F, H), (F,)
        shapes[b + "ffn.dense2.weight"], shapes[b + "ffn.dense2.bias"] = (H, F), (H,)
        shapes[b + "addnorm2.ln.weight"] = shapes[b + "addnorm2.ln.bias"] = (H,)
    shapes["hidden.0.weight"], shapes["hidden.0.bias"] = (H, H), (H,)
    if kind == "pretrained":
        shapes["mlm.mlp.0.weight"], shapes["mlm.mlp.0.bias"] = (H, H), (H,)
        shapes["mlm.mlp.2.weight"] = shapes["mlm.mlp.2.bias"] = (H,)
        shapes["mlm.mlp.3.weight"], shapes["mlm.mlp.3.bias"] = (V, H), (V,)
        shapes["nsp.output.weight"], shapes["nsp.output.bias"] = (2, H), (2,)
    elif kind == "classifier":
        shapes["output.weight"], shapes["output.bias"] = (3, H), (3,)
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}: use 'pretrained' or 'classifier'")
    return shapes


def infer_config(params: Mapping[str, np.ndarray], num_heads: int | None = None,
                 dropout: float = 0.1) -> BERTConfig:
    """Sizes read off a torch-named checkpoint. The head count leaves no trace in the tensors:
    without `num_heads`, BERT's usual 64-dimensional heads are assumed (4 for bert.small, 12 for bert.base)."""
    for key in ("encoder.token_embedding.weight", "encoder.pos_embedding", "encoder.blks.0.ffn.dense1.weight"):
        if key not in params:
            raise KeyError(f"checkpoint has no {key!r}, so its sizes cannot be read")
    vocab_size, num_hiddens = params["encoder.token_embedding.weight"].shape
    blocks = {int(m.group(1)) for k in params if (m := re.match(r"encoder\.blks\.(\d+)\.", k))}
    heads = num_heads if num_heads is not None else max(1, num_hiddens // 64)
    return BERTConfig(vocab_size=int(vocab_size), num_hiddens=int(num_hiddens),
                      ffn_num_hiddens=int(params["encoder.blks.0.ffn.dense1.weight"].shape[0]),
                      num_heads=heads, num_layers=len(blocks), dropout=dropout,
                      max_len=int(params["encoder.pos_embedding"].shape[1]),
                      embedding_norm="encoder.embedding_ln.weight" in params)


def check_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple], file: str) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped key of `file`."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: file has {tuple(found[k])}, model expects {tuple(expected[k])}"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = []
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong))
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if problems:
        raise ValueError(f"{file}: " + " | ".join(problems)
                         + " (pass sizes that match the checkpoint, or None to read them from it)")


def read_checkpoint_config(folder: str | os.PathLike) -> dict | None:
    """The `config.json` nlibert writes beside a checkpoint, or None for the book's own folders."""
    path = os.path.join(folder, "config.json")
    return read_json(path) if os.path.exists(path) else None


def sniff_params_format(path: str | os.PathLike) -> str:
    """'torch' (a zip written by `torch.save`) or 'mxnet' (an NDArray file), judged by the first bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return "torch"
    if len(head) == 8 and int.from_bytes(head, "little") == 0x112:  # MXNet's NDArray list magic
        return "mxnet"
    raise ValueError(f"{os.fspath(path)}: neither a torch state_dict nor an MXNet parameter file")


PARAMS_FILES = {"pretrained": "pretrained.params", "classifier": "classifier.params"}


def describe_checkpoint(folder: str | os.PathLike) -> tuple[str, str, str]:
    """(format, kind, params path) of a checkpoint folder: from its config.json, else from the files."""
    folder = os.fspath(folder)
    config = read_checkpoint_config(folder) or {}
    kind = config.get("kind") or next((k for k, f in PARAMS_FILES.items()
                                       if os.path.exists(os.path.join(folder, f))), None)
    if kind not in PARAMS_FILES:
        raise FileNotFoundError(f"{folder}: no pretrained.params or classifier.params")
    path = os.path.join(folder, PARAMS_FILES[kind])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder}: config.json says kind {kind!r} but {PARAMS_FILES[kind]} is missing")
    if not os.path.exists(os.path.join(folder, "vocab.json")):
        raise FileNotFoundError(f"{folder}: no vocab.json")
    return config.get("format") or sniff_params_format(path), kind, path


# ---- Checkpoint folders: what both backends' loaders and savers share ----

PRETRAINED_FILE = PARAMS_FILES["pretrained"]
CLASSIFIER_FILE = PARAMS_FILES["classifier"]
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.json"

# The book's data-hub names per format: the torch archives carry a '.torch' suffix.
HUB_NAMES = {"torch": {"bert.small": "bert.small.torch", "bert.base": "bert.base.torch"},
             "mxnet": {"bert.small": "bert.small", "bert.base": "bert.base"}}


def resolve_pretrained_folder(pretrained_model: str | os.PathLike, fmt: str) -> str:
    """A folder path as is; a checkpoint installed as a package ('minilm-l6', core/hf.py); otherwise a
    data-hub name ('bert.small', 'bert.base'), downloaded and extracted (cached) in the archive of
    format `fmt`."""
    if os.path.isdir(pretrained_model):
        return os.fspath(pretrained_model)
    from .hf import PACKAGED_CHECKPOINTS, resolve_packaged_checkpoint  # lazily: hf imports this module
    name = os.fspath(pretrained_model)
    if name in PACKAGED_CHECKPOINTS:
        return resolve_packaged_checkpoint(name)
    from . import data_hub  # lazily: only hub names need it
    if fmt == "mxnet" and name.endswith(".torch"):
        raise ValueError(f"{name!r} is the book's PyTorch checkpoint; the MXNet backend reads "
                         f"{name[:-len('.torch')]!r}, or convert it first")
    name = HUB_NAMES[fmt].get(name, name)
    if name not in data_hub.DATA_HUB:
        raise FileNotFoundError(f"{pretrained_model!r} is neither a folder nor a data-hub name "
                                f"(known: {sorted(HUB_NAMES[fmt])})")
    return data_hub.download_extract(name)


def check_folder_format(folder: str | os.PathLike, fmt: str) -> dict:
    """The folder's config.json (or {} for the book's own folders), refused if written for the other format."""
    written = read_checkpoint_config(folder) or {}
    if written.get("format", fmt) != fmt:
        raise ValueError(f"{os.path.join(folder, CONFIG_FILE)}: format {written.get('format')!r}; "
                         f"the {fmt} backend reads {fmt!r} checkpoints (run `nlibert convert` first)")
    return written


def resolve_sizes(folder: str | os.PathLike, torch_named: Mapping[str, np.ndarray], params_path: str,
                  written: Mapping, **sizes) -> dict:
    """The model sizes to build: those given, and those given as None read off the checkpoint (the
    head count from config.json if there is one, else 64-dimensional heads; dropout from config.json,
    else 0.1)."""
    if all(v is not None for v in sizes.values()):
        return sizes
    heads = sizes.get("num_heads") if sizes.get("num_heads") is not None else written.get("num_heads")
    drop = sizes.get("dropout") if sizes.get("dropout") is not None else written.get("dropout", 0.1)
    try:
        inferred = infer_config(torch_named, num_heads=heads, dropout=drop).to_dict()
    except KeyError as e:
        raise ValueError(f"{params_path}: cannot read sizes off the file: {e}") from e
    return {k: (inferred[k] if v is None else v) for k, v in sizes.items()}


def resolve_architecture(torch_named: Mapping[str, np.ndarray], written: Mapping) -> dict:
    """The architecture options (`BERTConfig.architecture()`) of a checkpoint in our format: the
    embedding LayerNorm is there when its tensors are, the rest comes from config.json (the book's
    folders have none, and the book's defaults then apply)."""
    defaults = BERTConfig(vocab_size=1)
    return {"hidden_act": written.get("hidden_act", defaults.hidden_act),
            "layer_norm_eps": written.get("layer_norm_eps", defaults.layer_norm_eps),
            "embedding_norm": "encoder.embedding_ln.weight" in torch_named,
            "attention_dropout": written.get("attention_dropout", defaults.attention_dropout)}


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


def read_classifier_folder(folder: str | os.PathLike, fmt: str):
    """`(config, vocab, params_path)` of a fine-tuned model folder of format `fmt`, checked for consistency."""
    written = read_checkpoint_config(folder)
    if written is None:
        raise FileNotFoundError(f"{os.path.join(folder, CONFIG_FILE)}: missing; not a classifier folder")
    if written.get("kind") != "classifier" or written.get("format", fmt) != fmt:
        raise ValueError(f"{os.path.join(folder, CONFIG_FILE)}: kind {written.get('kind')!r}, "
                         f"format {written.get('format')!r}; expected a {fmt} classifier")
    cfg = BERTConfig.from_dict(written)
    vocab = load_folder_vocab(folder, written)
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"{folder}: vocab.json has {len(vocab)} tokens, config.json says {cfg.vocab_size}")
    return cfg, vocab, os.path.join(folder, CLASSIFIER_FILE)
