"""One config object describes a model; both backends build from the same one."""
from __future__ import annotations

import dataclasses
from typing import Any

HIDDEN_ACTIVATIONS = ("relu", "gelu")


@dataclasses.dataclass
class BERTConfig:
    """Sizes and architecture options of a BERT encoder. Defaults are the chapter's `bert.small`
    (the chapter loads it with num_hiddens=256, ffn_num_hiddens=512, num_heads=4, num_layers=2,
    dropout=0.1, max_len=512) with the book's architecture; Hugging Face BERT checkpoints set the
    last four fields from their config.json (core/hf.py):

    - `hidden_act`: the feed-forward (and masked-LM head) activation, 'relu' (the book) or 'gelu'
      (BERT's, the exact erf form).
    - `layer_norm_eps`: every LayerNorm's epsilon (the book 1e-5, BERT 1e-12).
    - `embedding_norm`: LayerNorm then dropout on the summed embeddings, as BERT does; the book has
      neither.
    - `attention_dropout`: dropout on the attention weights; None means `dropout` (the book uses
      one rate everywhere, BERT names two that are usually equal).
    """

    vocab_size: int
    num_hiddens: int = 256
    ffn_num_hiddens: int = 512
    num_heads: int = 4
    num_layers: int = 2
    dropout: float = 0.1
    max_len: int = 512
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-5
    embedding_norm: bool = False
    attention_dropout: float | None = None

    def __post_init__(self) -> None:
        if self.num_hiddens % self.num_heads:
            raise ValueError(f"num_hiddens={self.num_hiddens} is not divisible by num_heads={self.num_heads}")
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: use one of {HIDDEN_ACTIVATIONS}")

    @property
    def attention_dropout_rate(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    def architecture(self) -> dict[str, Any]:
        """The options beyond the sizes, as keyword arguments of the backends' model classes."""
        return {"hidden_act": self.hidden_act, "layer_norm_eps": self.layer_norm_eps,
                "embedding_norm": self.embedding_norm, "attention_dropout": self.attention_dropout}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BERTConfig":
        """Build from a dict, ignoring keys that are not fields (config.json also holds format and kind)."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("vocab_size",) if n not in d]
        if missing:
            raise KeyError(f"config is missing {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})
