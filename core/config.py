"""One config object describes a model; both backends build from the same one."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class BERTConfig:
    """Sizes of the book's BERT. Defaults are the chapter's `bert.small` (facts §1.9)."""

    vocab_size: int
    num_hiddens: int = 256
    ffn_num_hiddens: int = 512
    num_heads: int = 4
    num_layers: int = 2
    dropout: float = 0.1
    max_len: int = 512

    def __post_init__(self) -> None:
        if self.num_hiddens % self.num_heads:
            raise ValueError(f"num_hiddens={self.num_hiddens} is not divisible by num_heads={self.num_heads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BERTConfig":
        """Build from a dict, ignoring keys that are not sizes (config.json also holds format and kind)."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("vocab_size",) if n not in d]
        if missing:
            raise KeyError(f"config is missing {missing}")
        return cls(**{k: v for k, v in d.items() if k in names})
