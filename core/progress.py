"""A progress bar (tqdm) on a terminal, silence otherwise (logs and CI stay clean)."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, TextIO

from tqdm import tqdm


class Progress:
    """Wrap an iterable; each pass over it draws a tqdm bar on `stream` (default stderr) if that is
    a terminal, or if `enabled`. A new bar per pass, because the epoch loop iterates once per epoch
    and a tqdm bar closes at the end of its one pass; the bar is cleared when its pass ends."""

    def __init__(self, iterable: Iterable, desc: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.iterable = iterable
        self.desc = desc
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        yield from tqdm(self.iterable, desc=self.desc, file=self.stream, disable=not self.enabled,
                        leave=False, unit="batch", dynamic_ncols=True)
