"""Atomic writes: a reader never sees a half-written file or folder, an interrupted write leaves the
old one. Where outputs may go: never onto an input (`check_output`)."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import json
import os
import shutil
import sys
import tempfile
from typing import IO, Any, Callable, Iterator, Mapping


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


def _fsync_folder(folder: str) -> None:
    """Make a folder's entries (files created or renamed in it) durable."""
    with contextlib.suppress(OSError):  # some file systems cannot open or sync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap paths `a` and `b` in one step (Linux `renameat2(RENAME_EXCHANGE)`, ext4, xfs, btrfs,
    tmpfs, overlayfs...); False where the system or file system cannot, nothing changed then."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc before 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot swap
        return False
    raise OSError(errno, os.strerror(errno), b)


def replace_folder(new: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the complete folder `new` (a `temp_folder_beside(dst)`) at `dst`, replacing whatever
    folder is there, so that a kill at any instant leaves at `dst` the old folder or the new one,
    whole, never a mix: the two are swapped in one step (`renameat2(RENAME_EXCHANGE)`), then the
    old one, now at `new`'s hidden name, is deleted. A killed writer leaves at most such a hidden
    `.NAME.*.tmp` sibling, which no reader looks at and the next write removes
    (`remove_leftovers`). Where the file system cannot swap, the old folder is renamed aside first:
    a kill in between leaves `dst` missing and the old folder in `.NAME.*.old`, which the next
    write puts back before anything else (`remove_leftovers`)."""
    new, dst = os.path.abspath(os.fspath(new)), os.path.abspath(os.fspath(dst))
    _fsync_folder(new)  # its files were synced as written (atomic_write); now their names
    parent = os.path.dirname(dst)
    if not os.path.lexists(dst):
        os.rename(new, dst)
    elif _exchange(new, dst):
        _fsync_folder(parent)
        shutil.rmtree(new)  # the old folder
    else:
        aside = new[:-len(".tmp")] + ".old" if new.endswith(".tmp") else new + ".old"
        os.rename(dst, aside)
        os.rename(new, dst)
        _fsync_folder(parent)
        shutil.rmtree(aside)
    _fsync_folder(parent)


def write_folder_whole(write: Callable[[str], None], folder: str | os.PathLike) -> None:
    """`write(tmp)` fills a new folder beside `folder`, which then replaces `folder` whole
    (`replace_folder`); the temporary folder is removed whatever happens."""
    tmp = temp_folder_beside(folder)
    try:
        write(tmp)
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(dst: str | os.PathLike) -> None:
    """Clear what a killed `replace_folder` into `dst` can leave beside it: put back an old folder
    renamed aside (when `dst` is missing), and delete the hidden temporary folders. Call it only
    while no other process writes `dst` (under the output folder's lock)."""
    dst = os.path.abspath(os.fspath(dst))
    pattern = os.path.join(glob.escape(os.path.dirname(dst)), glob.escape("." + os.path.basename(dst)) + ".*")
    for path in glob.glob(pattern):
        if path.endswith(".old") and os.path.isdir(path) and not os.path.lexists(dst):
            os.rename(path, dst)
        elif path.endswith((".tmp", ".old")) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


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


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(option: str, path: str | os.PathLike, *, folder: bool = False,
                 models: Mapping[str, str | None] | None = None, inputs: Mapping[str, str | None] | None = None
                 ) -> None:
    """Refuse, before any work, an output (`path`, given by `option`; a folder when `folder`) that
    cannot be written there or would land on what the command reads: inside a model folder of
    `models` or equal to a file of `inputs` (each keyed by the option that names it)."""
    path = os.fspath(path)
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ValueError(f"{option} {path}: {above} is a file, not a folder; choose another {option}")
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a file, not a folder; choose another {option}")
    if not folder and os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a folder; name a file to write")
    for name, model in (models or {}).items():
        if model is not None and os.path.isdir(model) and _inside(path, model):
            raise ValueError(f"{option} {path}: is inside the model folder {model} ({name}) this command reads; "
                             f"writing there would damage it; choose another {option}")
    for name, file in (inputs or {}).items():
        if file is not None and os.path.exists(file) and os.path.realpath(path) == os.path.realpath(file):
            raise ValueError(f"{option} {path}: is the file {name} names, which this command reads; writing "
                             f"there would replace it; choose another {option}")


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
