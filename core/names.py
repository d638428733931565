"""Parameter names: one canonical naming, and one ordered rename table per checkpoint format.

The hub is the canonical naming, PyTorch's `state_dict` keys of the book's models (d2l's
`BERTModel` has 13 + 16 per layer tensors, its `BERTClassifier` 7 + 16 per layer). Every other
format is a spoke: a table of `(canonical template, format template)` rules, GluonNLP style. A
template is a name in which `{}` stands for one dot-free name segment (a block index, `weight`).
A name takes the first rule whose template matches it, in either direction; in a format whose
table `keeps_unmatched`, a name no rule matches is the same as the canonical one. Converting from
format A to format B goes A -> canonical -> B, so adding a backend adds one table here and
nothing pairwise. No tensor is ever transposed: Gluon's `Dense.weight` is (out, in) like torch's
`Linear.weight`, and embeddings are (V, H) in all three formats.

The sizes of a model follow from its names (`expected_shapes`), so a checkpoint's sizes can be
read off its tensors (`infer_config`) and any mismatch named key by key (`check_shapes`).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Mapping

import numpy as np

from .config import BERTConfig

# Every canonical name the book's models have (with BERT's optional embedding LayerNorm).
_CANONICAL = [re.compile(p) for p in (
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


@dataclasses.dataclass(frozen=True)
class RenameTable:
    """Ordered `(canonical template, format template)` rules; `keeps_unmatched`: whether a name
    no rule matches is the same in the format (else it is not a name of the format)."""

    rules: tuple[tuple[str, str], ...]
    keeps_unmatched: bool = True


# MXNet's `save_parameters` names (the book's MXNet checkpoints): the torch and Gluon models have
# the same structure but for three spellings.
MXNET_NAMES = RenameTable((
    # Gluon names LayerNorm's parameters gamma and beta.
    ("encoder.blks.{}.addnorm{}.ln.weight", "encoder.blks.{}.addnorm{}.ln.gamma"),
    ("encoder.blks.{}.addnorm{}.ln.bias", "encoder.blks.{}.addnorm{}.ln.beta"),
    ("encoder.embedding_ln.weight", "encoder.embedding_ln.gamma"),
    ("encoder.embedding_ln.bias", "encoder.embedding_ln.beta"),
    # Gluon fuses the pooler's Tanh into its Dense: no Sequential index.
    ("hidden.0.{}", "hidden.{}"),
    # ... and the MLM head's ReLU into its first Dense, so the later Sequential indices shift by one.
    ("mlm.mlp.2.weight", "mlm.mlp.1.gamma"),
    ("mlm.mlp.2.bias", "mlm.mlp.1.beta"),
    ("mlm.mlp.3.{}", "mlm.mlp.2.{}"),
))

# Hugging Face `BertModel` / `BertForPreTraining` names, without the `bert.` prefix of task models
# (core/hf.py strips it, and reshapes the (P, H) position table to our (1, P, H)).
HF_NAMES = RenameTable((
    ("encoder.pos_embedding", "embeddings.position_embeddings.weight"),
    ("encoder.token_embedding.weight", "embeddings.word_embeddings.weight"),
    ("encoder.segment_embedding.weight", "embeddings.token_type_embeddings.weight"),
    ("encoder.embedding_ln.{}", "embeddings.LayerNorm.{}"),
    ("encoder.blks.{}.attention.W_q.{}", "encoder.layer.{}.attention.self.query.{}"),
    ("encoder.blks.{}.attention.W_k.{}", "encoder.layer.{}.attention.self.key.{}"),
    ("encoder.blks.{}.attention.W_v.{}", "encoder.layer.{}.attention.self.value.{}"),
    ("encoder.blks.{}.attention.W_o.{}", "encoder.layer.{}.attention.output.dense.{}"),
    ("encoder.blks.{}.addnorm1.ln.{}", "encoder.layer.{}.attention.output.LayerNorm.{}"),
    ("encoder.blks.{}.ffn.dense1.{}", "encoder.layer.{}.intermediate.dense.{}"),
    ("encoder.blks.{}.ffn.dense2.{}", "encoder.layer.{}.output.dense.{}"),
    ("encoder.blks.{}.addnorm2.ln.{}", "encoder.layer.{}.output.LayerNorm.{}"),
    ("hidden.0.{}", "pooler.dense.{}"),
    ("mlm.mlp.0.{}", "cls.predictions.transform.dense.{}"),
    ("mlm.mlp.2.{}", "cls.predictions.transform.LayerNorm.{}"),
    ("mlm.mlp.3.weight", "cls.predictions.decoder.weight"),  # tied to the word embeddings in BERT
    ("mlm.mlp.3.bias", "cls.predictions.bias"),
    ("nsp.output.{}", "cls.seq_relationship.{}"),
), keeps_unmatched=False)

# The table of each backend's checkpoint format, by the name its config.json records (the
# backend's name in nlibert.backends). A new backend adds its line.
FORMAT_NAMES: dict[str, RenameTable] = {
    "torch": RenameTable(()),  # the canonical names themselves
    "mxnet": MXNET_NAMES,
    "jax": RenameTable(()),  # the canonical names: backends/jax lays its parameters out as torch does
}


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    return re.compile(r"([^.]+)".join(re.escape(part) for part in template.split("{}")))


def _rename(name: str, table: RenameTable, to_format: bool) -> str | None:
    """`name` through the first matching rule (canonical -> format, or back); None when no rule
    matches and the table does not keep unmatched names."""
    for canonical, formatted in table.rules:
        source, target = (canonical, formatted) if to_format else (formatted, canonical)
        match = _pattern(source).fullmatch(name)
        if match:
            return _fill(target, match.groups())
    return name if table.keeps_unmatched else None


def _fill(template: str, values: tuple[str, ...]) -> str:
    parts = template.split("{}")
    return "".join(p + v for p, v in zip(parts, values)) + parts[-1]


# LayerNorm weights by canonical name (every bias ends in '.bias'): what AdamW does not decay.
_LAYER_NORM_WEIGHT = re.compile(r"(.*\.ln|encoder\.embedding_ln|mlm\.mlp\.2)\.weight")


def decays(name: str) -> bool:
    """Whether weight decay applies to the parameter of canonical name `name`: BERT's recipe decays
    every weight but biases and LayerNorm weights (scales near 1 that decay would pull to 0)."""
    return not (name.endswith(".bias") or _LAYER_NORM_WEIGHT.fullmatch(name))


def is_canonical(name: str) -> bool:
    return any(p.fullmatch(name) for p in _CANONICAL)


def table_of(fmt: str) -> RenameTable:
    if fmt not in FORMAT_NAMES:
        raise ValueError(f"unknown checkpoint format {fmt!r}: use one of {sorted(FORMAT_NAMES)}")
    return FORMAT_NAMES[fmt]


def format_key(key: str, fmt: str | RenameTable) -> str:
    """The name in format `fmt` of a canonical name; a name that is not canonical is a KeyError."""
    table = table_of(fmt) if isinstance(fmt, str) else fmt
    if not is_canonical(key):
        raise KeyError(f"unknown parameter name {key!r}")
    renamed = _rename(key, table, to_format=True)
    if renamed is None:
        raise KeyError(f"{key!r} has no name in this format")
    return renamed


def canonical_key(key: str, fmt: str | RenameTable) -> str:
    """The canonical name of a name in format `fmt`; a KeyError when it is none of that format's
    names (the round trip must come back, so a canonical name passed as an MXNet one is refused)."""
    table = table_of(fmt) if isinstance(fmt, str) else fmt
    canonical = _rename(key, table, to_format=False)
    if canonical is None or not is_canonical(canonical) or _rename(canonical, table, to_format=True) != key:
        raise KeyError(f"unknown parameter name {key!r}")
    return canonical


def _renamed(params: Mapping[str, np.ndarray], rename, error: str) -> dict[str, np.ndarray]:
    """`params` with every name through `rename`, in order; the names it refuses are one KeyError."""
    out, unknown = {}, []
    for key, value in params.items():
        try:
            out[rename(key)] = np.asarray(value)
        except KeyError:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{error}: {unknown}")
    return out


def to_canonical(params: Mapping[str, np.ndarray], fmt: str, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """A checkpoint of format `fmt` under canonical names; every unknown name is one error."""
    return _renamed(params, lambda key: canonical_key(key, fmt),
                    f"{source}: parameter names that are not {fmt}-format BERT names")


def from_canonical(params: Mapping[str, np.ndarray], fmt: str, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """A canonically named checkpoint under format `fmt`'s names, in the same order."""
    return _renamed(params, lambda key: format_key(key, fmt), f"{source}: parameter names that are not BERT names")


def convert_params(params: Mapping[str, np.ndarray], src: str, dst: str,
                   source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Rename a checkpoint from format `src` to format `dst` through the canonical names; the
    values are copied bit for bit."""
    return from_canonical(to_canonical(params, src, source), dst, source)


def expected_shapes(cfg: BERTConfig, kind: str = "pretrained", num_classes: int = 3) -> dict[str, tuple[int, ...]]:
    """Canonical names and shapes of the book's `BERTModel` ('pretrained') or `BERTClassifier`
    ('classifier', its `num_classes`-way `output` instead of the MLM and NSP heads), in `state_dict`
    order: a block's own parameters before its children's, so `pos_embedding` comes first."""
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
        shapes["output.weight"], shapes["output.bias"] = (num_classes, H), (num_classes,)
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}: use 'pretrained' or 'classifier'")
    return shapes


def infer_config(params: Mapping[str, np.ndarray], num_heads: int | None = None,
                 dropout: float = 0.1) -> BERTConfig:
    """Sizes read off a canonically named checkpoint. The head count leaves no trace in the
    tensors: without `num_heads`, BERT's usual 64-dimensional heads are assumed (4 for bert.small,
    12 for bert.base)."""
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
        raise ValueError(f"{file}: " + " | ".join(problems) + " (the folder's vocab.json, config.json and "
                         "params file do not belong together, or the sizes given are not the checkpoint's)")
