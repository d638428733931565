"""Download and unpack the chapter's data sets and checkpoints (d2l's `DATA_HUB`), safely and offline-friendly.

Differences from the book's `download`, all on purpose: the checksum is checked *after* downloading too
(a bad file is never put in place), files are written atomically, a cached file with the wrong hash
is fetched again instead of used, archives are extracted into a temporary folder and renamed into
place (a half-extracted folder is never used), members that would land outside the cache folder are
refused, and an already extracted folder is used without touching the network, so a copy placed by
hand works offline.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Mapping

from .io import atomic_write

DATA_URL = "http://d2l-data.s3-accelerate.amazonaws.com/"

# name -> (url, checksum of the file at that url): a SHA-1 in hex, or 'md5:<hex>' where the pinned
# value published for a file is an MD5. The book's entries are d2l's `DATA_HUB` ones.
AG_NEWS_URL = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/"
DATA_HUB: dict[str, tuple[str, str]] = {
    "SNLI": ("https://nlp.stanford.edu/projects/snli/snli_1.0.zip",
             "9fcde07509c7e87ec61c640c1b2753d9041758e4"),
    "wikitext-2": ("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
                   "3c914d17d80b1459be871a5039ac23e752a53cbe"),
    "bert.small": (DATA_URL + "bert.small.zip", "a4e718a47137ccd1809c9107ab4f5edd317bae2c"),
    "bert.base": (DATA_URL + "bert.base.zip", "7b3820b35da691042e5d34c0971ac3edbd80d3f4"),
    "bert.small.torch": (DATA_URL + "bert.small.torch.zip", "c72329e68a732bef0452e4b96a1c341c8910f81f"),
    "bert.base.torch": (DATA_URL + "bert.base.torch.zip", "225d66f04cae318b841a13d32af3acc165f253ac"),
    # AG News's original CSVs, as torchtext's AG_NEWS downloads them, with the MD5s it pins
    # (pytorch/text, torchtext/datasets/ag_news.py).
    "ag_news.train": (AG_NEWS_URL + "train.csv", "md5:b1a00f826fdfbd249f79597b59e1dc12"),
    "ag_news.test": (AG_NEWS_URL + "test.csv", "md5:d52ea96a97a2d943681189a97654912d"),
    # The class names beside them (torchtext does not fetch it): the SHA-1 of that repository's
    # classes.txt (commit 555590d), the same bytes as the original archive's.
    "ag_news.classes": (AG_NEWS_URL + "classes.txt", "e33d4d4ce9786a12ff0e2cf95dd3602ec117aab3"),
}

_CHUNK = 1 << 20  # 1 MiB, as the book hashes


class DownloadError(RuntimeError):
    """The file could not be fetched (HTTP error, no connection, timeout)."""


class ChecksumError(DownloadError):
    """The fetched file's checksum differs from the one pinned in the hub."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the extraction folder (or is a link/device)."""


def data_root() -> str:
    """The cache folder: `$NLIBERT_DATA` if set, else `~/.cache/nlibert`."""
    return os.environ.get("NLIBERT_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "nlibert")


_HASH_NAMES = {"sha1": "SHA-1", "md5": "MD5"}


def _new_hash(algorithm: str):
    # usedforsecurity=False: MD5 here only checks a download against its published value.
    return hashlib.new(algorithm, usedforsecurity=False)


def file_digest(path: str | os.PathLike, algorithm: str = "sha1") -> str:
    """Hex digest ('sha1' or 'md5') of a file, read in 1 MiB chunks."""
    digest = _new_hash(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha1_of(path: str | os.PathLike) -> str:
    """Hex SHA-1 of a file, read in 1 MiB chunks."""
    return file_digest(path, "sha1")


def parse_checksum(checksum: str) -> tuple[str, str]:
    """(algorithm, hex digest) of a hub checksum: 'md5:<hex>', or a plain SHA-1."""
    algorithm, _, digest = checksum.rpartition(":")
    algorithm = algorithm or "sha1"
    if algorithm not in _HASH_NAMES:
        raise ValueError(f"unknown checksum kind {algorithm!r} in {checksum!r}: use a SHA-1 or 'md5:<hex>'")
    return algorithm, digest.lower()


def _lookup(name: str, hub: Mapping[str, tuple[str, str]] | None) -> tuple[str, str]:
    hub = DATA_HUB if hub is None else hub
    if name not in hub:
        raise KeyError(f"{name!r} is not in the data hub; known names: {', '.join(sorted(hub))}")
    return hub[name]


def _offline_hint(file_name: str, cache_dir: str) -> str:
    return (f"To work offline, put {file_name} (or the folder it extracts to) into {cache_dir}, "
            f"or set NLIBERT_DATA to a folder that holds it.")


def download(name: str, cache_dir: str | os.PathLike | None = None, timeout: float = 30.0,
             hub: Mapping[str, tuple[str, str]] | None = None) -> str:
    """Return the local path of hub entry `name`, fetching it into `cache_dir` unless a copy with
    the right checksum is already there. `hub` replaces `DATA_HUB` (tests point it at a local server)."""
    url, checksum = _lookup(name, hub)
    algorithm, expected = parse_checksum(checksum)
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else data_root()
    os.makedirs(cache_dir, exist_ok=True)
    file_name = url.split("/")[-1]
    path = os.path.join(cache_dir, file_name)
    if os.path.isfile(path) and file_digest(path, algorithm) == expected:
        return path
    # A cached file with another hash falls through and is replaced: it is stale or corrupt.
    with atomic_write(path, "wb") as f:
        digest = _new_hash(algorithm)
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "nlibert"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                while chunk := response.read(_CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}. "
                                + _offline_hint(file_name, cache_dir)) from e
        except (OSError, http.client.HTTPException) as e:  # URLError, refused, timeout, reset
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise DownloadError(f"could not download {url}: {reason}. "
                                + _offline_hint(file_name, cache_dir)) from e
        found = digest.hexdigest()
        if found != expected:
            # Raising inside atomic_write deletes the temp file: nothing lands at `path`.
            raise ChecksumError(f"{url} -> {path}: {_HASH_NAMES[algorithm]} mismatch, expected {expected}, "
                                f"got {found}; the downloaded file was discarded.")
    return path


def _archive_stem(path: str) -> str:
    """The archive path minus its extension ('x.zip' -> 'x', 'x.tar.gz' -> 'x')."""
    for ext in (".tar.gz", ".tgz", ".zip", ".tar", ".gz"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return os.path.splitext(path)[0]


def _check_member(root: str, member_name: str, archive: str) -> None:
    """Refuse a member name that is absolute or resolves outside `root`."""
    if os.path.isabs(member_name) or member_name.startswith(("/", "\\")) or (
            len(member_name) > 1 and member_name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {member_name!r} has an absolute path; refusing to extract")
    target = os.path.realpath(os.path.join(root, member_name))
    if os.path.commonpath([target, root]) != root:
        raise UnsafeArchiveError(f"{archive}: member {member_name!r} would be written outside "
                                 f"{os.path.dirname(root)}; refusing to extract")


def _extract_into(archive: str, root: str) -> None:
    """Extract `archive` into the empty folder `root`, checking every member first."""
    root = os.path.realpath(root)
    if archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member(root, info.filename, archive)
            zf.extractall(root)
        return
    with tarfile.open(archive) as tf:  # .tar, .tar.gz, .tgz, .gz (the book opens .gz with tarfile)
        members = tf.getmembers()
        for m in members:
            _check_member(root, m.name, archive)
            if m.issym() or m.islnk():
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a link to {m.linkname!r}; "
                                         f"refusing to extract")
            if not (m.isfile() or m.isdir()):
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} is not a regular file or folder; "
                                         f"refusing to extract")
        if hasattr(tarfile, "data_filter"):  # the stdlib's own guard where available (3.11.4+)
            tf.extractall(root, members, filter="data")
        else:
            tf.extractall(root, members)


def download_extract(name: str, folder: str | None = None, cache_dir: str | os.PathLike | None = None,
                     timeout: float = 30.0, hub: Mapping[str, tuple[str, str]] | None = None) -> str:
    """Return the folder holding hub entry `name` extracted: `cache_dir/folder` if `folder` is
    given, else the archive path minus its extension (book semantics: 'SNLI' -> cache/snli_1.0).
    An existing folder is returned as is, without the network."""
    url, _ = _lookup(name, hub)
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else data_root()
    archive = os.path.join(cache_dir, url.split("/")[-1])
    target = os.path.join(cache_dir, folder) if folder else _archive_stem(archive)
    if os.path.isdir(target):
        return target
    try:
        archive = download(name, cache_dir, timeout=timeout, hub=hub)
    except DownloadError as e:
        raise type(e)(f"{e} A folder {target} placed by hand is used as it is.") from e
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=".extract-")
    try:
        _extract_into(archive, tmp)
        entries = sorted(os.listdir(tmp))
        target_name = os.path.relpath(target, cache_dir).split(os.sep)[0]
        if target_name not in entries:
            raise DownloadError(f"{archive} does not contain {target_name}/ (it holds: {', '.join(entries)}); "
                                + _offline_hint(os.path.basename(archive), cache_dir))
        # Move the expected folder last, so its presence means everything else is in place too.
        for entry in [e for e in entries if e != target_name] + [target_name]:
            dest = os.path.join(cache_dir, entry)
            if os.path.isdir(dest) and entry != target_name:
                continue  # e.g. __MACOSX from another archive; never delete a user's folder
            os.replace(os.path.join(tmp, entry), dest)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    if not os.path.isdir(target):
        raise DownloadError(f"{archive} was extracted but {target} is not a folder")
    return target
