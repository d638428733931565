"""Atomic file writes: a reader never sees a half-written file, an interrupted write leaves the old one."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: str) -> tuple[int, str]:
    """A new temporary file in `path`'s folder, with the permissions a plain `open(path, "w")`
    would give (0666 less the umask): `mkstemp` makes it 0600, which would keep a model written
    here from being shared."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def temp_folder_beside(path: str | os.PathLike) -> str:
    """A new empty folder beside `path` (to be renamed onto it), with the permissions `os.makedirs`
    would give (0777 less the umask) rather than `mkdtemp`'s 0700."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success rename it over `path`, on error delete it."""
    path = os.fspath(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` for libraries that write by file name; rename on success."""
    path = os.fspath(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def first_non_utf8_line(path: str | os.PathLike) -> int:
    """The 1-based number of the first line that is not valid UTF-8, 0 if none (read only after a
    decoding error, to name the line in its message)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return line_no
    return 0


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


_JSON_KINDS = {dict: "object", list: "list"}


def read_json(path: str | os.PathLike, expect: type | None = None) -> Any:
    """The parsed file; invalid JSON, or with `expect` (dict or list) a top-level value of another
    kind, is an error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({e})") from e
    if expect is not None and not isinstance(obj, expect):
        raise ValueError(f"{os.fspath(path)}: expected a JSON {_JSON_KINDS[expect]}, found {type(obj).__name__}")
    return obj
