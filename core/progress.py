"""A progress bar on a terminal, silence otherwise (logs and CI stay clean)."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO


class Progress:
    """Wrap an iterable; redraw one status line on `stream` if it is a terminal."""

    def __init__(self, iterable: Iterable, desc: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.iterable = iterable
        self.desc = desc
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        try:
            total = len(self.iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        start = time.perf_counter()
        for i, item in enumerate(self.iterable, 1):
            yield item
            if self.enabled:
                width = 30
                done = int(width * i / total) if total else 0
                bar = "#" * done + "-" * (width - done)
                rate = i / max(time.perf_counter() - start, 1e-9)
                of = f"/{total}" if total else ""
                self.stream.write(f"\r{self.desc} [{bar}] {i}{of} batches, {rate:.2f} it/s")
                self.stream.flush()
        if self.enabled:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()
