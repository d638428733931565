"""Faults on the data side: damaged cache entries heal, written files can be shared, bad SNLI rows
and half-present checkpoints are errors that name the file and line, and tests that need the real
data skip (or, in CI, fail) when it is absent."""
import os
import stat
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from nlibert import jobs
from nlibert.core.folders import describe_checkpoint
from nlibert.core.io import atomic_write, temp_folder_beside, write_json
from nlibert.core.packed_cache import load_packed_snli
from nlibert.core.snli import SNLIFormatError, read_snli_file
from nlibert.core.vocab import RESERVED_TOKENS, Vocab

HEADER = "gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tx\n"
ROWS = [("entailment", "a man plays", "a person plays"), ("-", "no gold", "label"),
        ("contradiction", "a dog sleeps", "the dog runs"), ("neutral", "kids play", "kids play soccer")] * 4


def write_snli(path, rows, header=HEADER):
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + "".join(f"{label}\t( {p} )\t( {h} )\tz\n" for label, p, h in rows))
    return path


@pytest.fixture
def vocab():
    words = "a man plays person dog sleeps the runs kids play soccer no gold label".split()
    return Vocab([words], reserved_tokens=RESERVED_TOKENS)


# --- the packed cache heals ---------------------------------------------------------------------------

def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_payload_bytes(path):
    """Flip bytes in the middle of the stored token ids, so the zip still opens."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("ids.npy")
    data = bytearray(open(path, "rb").read())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    middle = info.header_offset + 30 + name_len + extra_len + info.file_size - 8
    for i in range(middle, middle + 4):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _entry_with_changed_labels(path):
    """A well-formed entry whose arrays were changed after writing: only the checksum can tell."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["labels"] = (arrays["labels"] + 1) % 3
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage", [_truncate, _flip_payload_bytes, _entry_with_changed_labels])
def test_a_damaged_cache_entry_is_rebuilt_with_one_line_saying_so(damage, tmp_path, vocab, capsys):
    source = write_snli(tmp_path / "snli_1.0_dev.txt", ROWS)
    first = load_packed_snli(source, vocab, 16, cache_dir=tmp_path / "cache")
    damage(first.cache_path)
    capsys.readouterr()
    rebuilt = load_packed_snli(source, vocab, 16, cache_dir=tmp_path / "cache")
    out = capsys.readouterr().out
    assert rebuilt.cache_hit is False
    assert out.count("rebuilding the packed cache entry") == 1 and first.cache_path in out
    np.testing.assert_array_equal(rebuilt.labels, first.labels)
    np.testing.assert_array_equal(rebuilt.all_token_ids, first.all_token_ids)
    assert load_packed_snli(source, vocab, 16, cache_dir=tmp_path / "cache").cache_hit is True


# --- written files have normal permissions ------------------------------------------------------------

def test_written_files_and_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_write(tmp_path / "b.bin") as f:
            f.write(b"x")
        folder = temp_folder_beside(tmp_path / "model")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b.bin").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755


# --- SNLI rows ----------------------------------------------------------------------------------------

def test_an_unknown_gold_label_names_the_file_and_line(tmp_path):
    rows = ROWS[:3] + [("entailmnet", "a man plays", "a person plays")]
    path = write_snli(tmp_path / "snli.txt", rows)
    with pytest.raises(SNLIFormatError, match=r"snli\.txt, line 5: unknown gold label 'entailmnet'"):
        read_snli_file(path)


def test_rows_without_a_gold_label_are_counted(tmp_path, capsys):
    path = write_snli(tmp_path / "snli.txt", ROWS)
    premises, _, labels = read_snli_file(path, verbose=True)
    assert len(labels) == 12 and "no gold" not in premises
    assert capsys.readouterr().out == "read 12 examples from snli.txt (skipped 4 rows without a gold label '-')\n"


def test_non_utf8_data_names_the_file_and_line(tmp_path):
    path = write_snli(tmp_path / "snli.txt", ROWS[:3])
    with open(path, "ab") as f:
        f.write(b"neutral\t( caf\xe9 )\t( x )\tz\n")
    with pytest.raises(SNLIFormatError, match=r"snli\.txt, line 5: not UTF-8"):
        read_snli_file(path)


def test_the_cli_reports_a_bad_label_as_an_error(tmp_path, capsys):
    from nlibert import cli
    data = tmp_path / "data"
    data.mkdir()
    write_snli(data / "snli_1.0_dev.txt", ROWS + [("entailmnet", "a", "b")])
    rc = cli.main(["finetune", "--pretrained", "random", "--data", str(data), "--out", str(tmp_path / "out"),
                   "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("nlibert: error: ") and "line 18: unknown gold label 'entailmnet'" in err
    assert not (tmp_path / "out" / "model").exists()


# --- checkpoints that are half there -----------------------------------------------------------------

def test_a_hugging_face_folder_without_weights_says_so(tmp_path):
    write_json(tmp_path / "config.json", {"model_type": "bert", "hidden_size": 8})
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(FileNotFoundError, match="Hugging Face config.json but none of its weight files"):
        describe_checkpoint(tmp_path)


# --- the shared-data fixture --------------------------------------------------------------------------

@pytest.mark.parametrize("require, outcome", [(None, "1 skipped"), ("1", "1 error")])
def test_tests_needing_the_real_data_skip_without_it_and_fail_in_ci(require, outcome, tmp_path):
    """A lone clone passes the README's test command; CI (NLIBERT_REQUIRE_SHARED_DATA=1) cannot
    pass with those tests skipped."""
    for helper in ("conftest.py", "needs.py"):
        (tmp_path / helper).write_text(open(os.path.join(os.path.dirname(__file__), helper)).read())
    (tmp_path / "test_needs_data.py").write_text(textwrap.dedent("""
        def test_reads_it(shared_data):
            assert shared_data.exists()
    """))
    env = {k: v for k, v in os.environ.items() if k != "NLIBERT_REQUIRE_SHARED_DATA"}
    env["NLIBERT_SHARED_DATA"] = str(tmp_path / "absent")
    if require:
        env["NLIBERT_REQUIRE_SHARED_DATA"] = require
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert outcome in result.stdout, result.stdout
    assert "the real data is not at" in result.stdout


def test_jobs_never_write_into_a_file_given_as_out(tmp_path):
    (tmp_path / "file").write_text("keep me")
    from nlibert.core.settings import FinetuneSettings
    with pytest.raises(ValueError, match="file"):
        jobs.run_finetune(FinetuneSettings(pretrained="random", out=str(tmp_path / "file"), epochs=1))
    assert (tmp_path / "file").read_text() == "keep me"
