"""download / download_extract against a loopback HTTP server; nothing here touches the internet."""
import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
import zipfile

import pytest

from nlibert.core import data_hub
from nlibert.core.data_hub import (ChecksumError, DownloadError, UnsafeArchiveError, download,
                                   download_extract, file_digest, parse_checksum, sha1_of)
from nlibert.core.tasks import download_ag_news


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    requests: list = []

    def do_GET(self):
        type(self).requests.append(self.path)
        body = self.files.get(self.path)
        if self.path == "/broken" or body is None:
            self.send_response(500 if self.path == "/broken" else 404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server():
    """A loopback HTTP server on an ephemeral port: `files` maps paths to bodies, `requests` logs GETs."""
    handler = type("Handler", (_Handler,), {"files": {}, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield handler
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def test_hub_has_the_books_entries():
    assert {"SNLI", "wikitext-2", "bert.small", "bert.base", "bert.small.torch",
            "bert.base.torch"} <= set(data_hub.DATA_HUB)
    assert data_hub.DATA_HUB["bert.small.torch"][0] == data_hub.DATA_URL + "bert.small.torch.zip"
    assert data_hub.DATA_HUB["SNLI"][1] == "9fcde07509c7e87ec61c640c1b2753d9041758e4"


def test_data_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NLIBERT_DATA", str(tmp_path))
    assert data_hub.data_root() == str(tmp_path)
    monkeypatch.delenv("NLIBERT_DATA")
    assert data_hub.data_root() == os.path.join(os.path.expanduser("~"), ".cache", "nlibert")


def test_sha1_of_reads_large_files(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # crosses the 1 MiB chunk boundary
    (tmp_path / "f").write_bytes(data)
    assert sha1_of(tmp_path / "f") == sha1(data)


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(KeyError, match="bert.small.torch"):
        download("bert.tiny", tmp_path)


def test_download_checks_sha1_and_then_uses_the_cache(server, tmp_path):
    body = os.urandom(2 * (1 << 20) + 5)
    server.files["/data/x.bin"] = body
    hub = {"x": (server.url + "/data/x.bin", sha1(body))}
    path = download("x", tmp_path, timeout=5, hub=hub)
    assert path == str(tmp_path / "x.bin") and (tmp_path / "x.bin").read_bytes() == body
    assert server.requests == ["/data/x.bin"]
    assert download("x", tmp_path, timeout=5, hub=hub) == path
    assert server.requests == ["/data/x.bin"]  # the cache hit did not contact the server
    assert sorted(os.listdir(tmp_path)) == ["x.bin"]  # no temp files left


def test_checksum_mismatch_leaves_no_file(server, tmp_path):
    server.files["/x.bin"] = b"not what was pinned"
    hub = {"x": (server.url + "/x.bin", "0" * 40)}
    with pytest.raises(ChecksumError) as info:
        download("x", tmp_path, timeout=5, hub=hub)
    message = str(info.value)
    assert "/x.bin" in message and "0" * 40 in message and sha1(b"not what was pinned") in message
    assert os.listdir(tmp_path) == []


def test_cached_file_with_wrong_sha1_is_downloaded_again(server, tmp_path):
    body = b"the right bytes"
    server.files["/x.bin"] = body
    (tmp_path / "x.bin").write_bytes(b"stale bytes")
    download("x", tmp_path, timeout=5, hub={"x": (server.url + "/x.bin", sha1(body))})
    assert (tmp_path / "x.bin").read_bytes() == body and server.requests == ["/x.bin"]


def test_stale_cache_and_bad_download_keep_nothing_bad_in_place(server, tmp_path):
    server.files["/x.bin"] = b"also wrong"
    (tmp_path / "x.bin").write_bytes(b"stale bytes")
    with pytest.raises(ChecksumError):
        download("x", tmp_path, timeout=5, hub={"x": (server.url + "/x.bin", sha1(b"right"))})
    assert (tmp_path / "x.bin").read_bytes() == b"stale bytes"  # never replaced by a bad download
    assert os.listdir(tmp_path) == ["x.bin"]


def test_http_error_raises_download_error_with_offline_hint(server, tmp_path):
    hub = {"x": (server.url + "/broken", "0" * 40)}
    with pytest.raises(DownloadError) as info:
        download("x", tmp_path, timeout=5, hub=hub)
    message = str(info.value)
    assert not isinstance(info.value, ChecksumError)
    assert server.url + "/broken" in message and "500" in message
    assert "NLIBERT_DATA" in message and str(tmp_path) in message
    assert os.listdir(tmp_path) == []


def test_connection_refused_raises_download_error_with_offline_hint(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/bert.small.torch.zip"
    with pytest.raises(DownloadError) as info:
        download("bert.small.torch", tmp_path, timeout=5, hub={"bert.small.torch": (url, "0" * 40)})
    message = str(info.value)
    assert url in message and "bert.small.torch.zip" in message and "NLIBERT_DATA" in message
    assert os.listdir(tmp_path) == []


def make_zip(members: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def make_tar_gz(members: dict, symlinks: dict | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buffer.getvalue()


def test_download_extract_zip_book_semantics(server, tmp_path):
    body = make_zip({"bert.small.torch/vocab.json": b'["<unk>"]', "bert.small.torch/pretrained.params": b"P",
                     "__MACOSX/._junk": b"J"})
    server.files["/bert.small.torch.zip"] = body
    hub = {"bert.small.torch": (server.url + "/bert.small.torch.zip", sha1(body))}
    folder = download_extract("bert.small.torch", cache_dir=tmp_path, timeout=5, hub=hub)
    assert folder == str(tmp_path / "bert.small.torch")
    assert (tmp_path / "bert.small.torch" / "vocab.json").read_bytes() == b'["<unk>"]'
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # no temp folder left behind
    # A second call finds the folder and does not go back to the server.
    assert download_extract("bert.small.torch", cache_dir=tmp_path, timeout=5, hub=hub) == folder
    assert server.requests == ["/bert.small.torch.zip"]


def test_download_extract_tar_gz_with_folder(server, tmp_path):
    body = make_tar_gz({"wikitext-2/wiki.train.tokens": b"a b c\n", "wikitext-2/wiki.valid.tokens": b"d\n"})
    server.files["/wikitext-2-v1.tar.gz"] = body
    hub = {"wikitext-2": (server.url + "/wikitext-2-v1.tar.gz", sha1(body))}
    folder = download_extract("wikitext-2", "wikitext-2", cache_dir=tmp_path, timeout=5, hub=hub)
    assert folder == str(tmp_path / "wikitext-2")
    assert (tmp_path / "wikitext-2" / "wiki.train.tokens").read_bytes() == b"a b c\n"


def test_existing_folder_is_used_offline(tmp_path):
    (tmp_path / "snli_1.0").mkdir()
    hub = {"SNLI": ("http://127.0.0.1:9/snli_1.0.zip", "0" * 40)}  # unreachable on purpose
    assert download_extract("SNLI", cache_dir=tmp_path, hub=hub) == str(tmp_path / "snli_1.0")
    # The real hub entry too: the book's target folder name comes from the archive name.
    assert download_extract("SNLI", cache_dir=tmp_path) == str(tmp_path / "snli_1.0")


@pytest.mark.parametrize("kind,members", [
    ("zip", {"../evil.txt": b"x"}),
    ("zip", {"ok/../../evil.txt": b"x"}),
    ("zip", {"/tmp/evil-absolute.txt": b"x"}),
    ("tar.gz", {"../evil.txt": b"x"}),
])
def test_members_outside_the_cache_are_refused(server, tmp_path, kind, members):
    body = make_zip(members) if kind == "zip" else make_tar_gz(members)
    server.files[f"/a.{kind}"] = body
    cache = tmp_path / "cache"
    hub = {"a": (server.url + f"/a.{kind}", sha1(body))}
    with pytest.raises(UnsafeArchiveError) as info:
        download_extract("a", cache_dir=cache, timeout=5, hub=hub)
    assert list(members)[0] in str(info.value)
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/tmp/evil-absolute.txt")
    assert sorted(os.listdir(cache)) == [f"a.{kind}"]  # no half-extracted folder


def test_tar_symlink_is_refused(server, tmp_path):
    body = make_tar_gz({"a/file": b"x"}, symlinks={"a/link": "/etc/passwd"})
    server.files["/a.tar.gz"] = body
    with pytest.raises(UnsafeArchiveError, match="a/link"):
        download_extract("a", cache_dir=tmp_path, timeout=5, hub={"a": (server.url + "/a.tar.gz", sha1(body))})
    assert not (tmp_path / "a").exists()


def test_archive_without_the_expected_folder_is_an_error(server, tmp_path):
    body = make_zip({"other/file": b"x"})
    server.files["/a.zip"] = body
    with pytest.raises(DownloadError, match="does not contain a/"):
        download_extract("a", cache_dir=tmp_path, timeout=5, hub={"a": (server.url + "/a.zip", sha1(body))})
    assert not (tmp_path / "a").exists() and not (tmp_path / "other").exists()


def test_download_extract_failure_names_the_folder_to_place(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub = {"SNLI": (f"http://127.0.0.1:{port}/snli_1.0.zip", "0" * 40)}
    with pytest.raises(DownloadError) as info:
        download_extract("SNLI", cache_dir=tmp_path, timeout=5, hub=hub)
    assert str(tmp_path / "snli_1.0") in str(info.value) and "snli_1.0.zip" in str(info.value)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_ag_news_entries_are_torchtexts_files_and_md5s():
    base = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/"
    assert data_hub.DATA_HUB["ag_news.train"] == (base + "train.csv", "md5:b1a00f826fdfbd249f79597b59e1dc12")
    assert data_hub.DATA_HUB["ag_news.test"] == (base + "test.csv", "md5:d52ea96a97a2d943681189a97654912d")
    assert data_hub.DATA_HUB["ag_news.classes"][0] == base + "classes.txt"


def test_parse_checksum():
    assert parse_checksum("9fcde07509c7e87ec61c640c1b2753d9041758e4") == (
        "sha1", "9fcde07509c7e87ec61c640c1b2753d9041758e4")
    assert parse_checksum("md5:D52EA96A97A2D943681189A97654912D") == ("md5", "d52ea96a97a2d943681189a97654912d")
    with pytest.raises(ValueError, match="unknown checksum kind 'sha256'"):
        parse_checksum("sha256:00")


def test_md5_entry_is_checked_after_download_and_on_the_cached_copy(server, tmp_path):
    body = os.urandom((1 << 20) + 3)
    server.files["/train.csv"] = body
    hub = {"t": (server.url + "/train.csv", "md5:" + md5(body))}
    path = download("t", tmp_path, timeout=5, hub=hub)
    assert (tmp_path / "train.csv").read_bytes() == body and file_digest(path, "md5") == md5(body)
    assert download("t", tmp_path, timeout=5, hub=hub) == path and server.requests == ["/train.csv"]
    hub = {"t": (server.url + "/train.csv", "md5:" + "0" * 32)}
    with pytest.raises(ChecksumError) as info:  # the cached copy fails too, and so does the server's
        download("t", tmp_path, timeout=5, hub=hub)
    assert f"MD5 mismatch, expected {'0' * 32}, got {md5(body)}" in str(info.value)
    assert (tmp_path / "train.csv").read_bytes() == body  # the old copy stays


def test_download_ag_news_fills_its_folder(server, tmp_path):
    files = {"train.csv": b'"1","a","b"\n', "test.csv": b'"2","c","d"\n', "classes.txt": b"World\nSports\n"}
    hub = {}
    for name, entry in zip(("ag_news.train", "ag_news.test", "ag_news.classes"), files):
        server.files["/ag/" + entry] = files[entry]
        hub[name] = (server.url + "/ag/" + entry, "md5:" + md5(files[entry]) if entry.endswith(".csv")
                     else sha1(files[entry]))
    folder = download_ag_news(tmp_path, timeout=5, hub=hub)
    assert folder == str(tmp_path / "ag_news_csv")
    assert {name: (tmp_path / "ag_news_csv" / name).read_bytes() for name in files} == files
