"""`nlibert finetune --mode fast|book`: the fast path trains on exactly the book path's examples,
records its mode, and reloads packed data from the cache."""
import json
import pathlib
import shutil

import numpy as np
import pytest

from nlibert import cli, jobs
from nlibert.backends import BACKENDS
from nlibert.core.packing import SNLIBERTDataset
from nlibert.core.sample import write_sample_snli
from nlibert.core.settings import FinetuneSettings
from nlibert.core.sources import snli_packed, snli_source, snli_texts
from nlibert.core.vocab import RESERVED_TOKENS, Vocab

SMALL = ["--train-limit", "64", "--test-limit", "32", "--epochs", "1", "--batch-size", "32", "--max-len", "32",
         "--device", "cpu"]


def vocab_of(folder):
    words = set()
    for name in ("train", "test"):
        path = folder / f"snli_1.0_{name}.txt"
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines()[1:]:
                words.update(w.lower() for w in line.replace("(", " ").replace(")", " ").split("\t")[1].split())
    return Vocab([sorted(words)], reserved_tokens=RESERVED_TOKENS)


@pytest.mark.parametrize("dev_only", [False, True])
@pytest.mark.parametrize("limits", [(None, None), (50, 7)])
def test_the_fast_path_packs_exactly_the_book_paths_examples(tmp_path, dev_only, limits):
    sample = write_sample_snli(tmp_path / "sample", num_train=120, num_test=30, seed=2)
    data = tmp_path / "data"
    data.mkdir()
    if dev_only:
        shutil.copy(f"{sample}/snli_1.0_train.txt", data / "snli_1.0_dev.txt")
    else:
        for name in ("train", "test"):
            shutil.copy(f"{sample}/snli_1.0_{name}.txt", data / f"snli_1.0_{name}.txt")
    vocab = vocab_of(pathlib.Path(sample))
    train_limit, test_limit = limits
    source = snli_source(str(data), str(tmp_path), seed=3)
    assert (source.test_file is None) == dev_only and str(data) in source.description
    train, test = snli_texts(source, 3, train_limit, test_limit)
    assert len(train[2]) == (train_limit or (108 if dev_only else 120))
    expected = [SNLIBERTDataset(part, 24, vocab) for part in (train, test)]
    for round_ in range(2):
        train_set, test_set, hit = snli_packed(source, 3, vocab, 24, train_limit, test_limit,
                                               cache_dir=str(tmp_path / "cache"))
        assert hit is bool(round_)
        for got, want in zip((train_set, test_set), expected):
            for name in ("all_token_ids", "all_segments", "valid_lens", "labels"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.mark.slow
def test_finetune_records_its_mode_and_reuses_the_packed_cache(tmp_path, capsys):
    out = tmp_path / "fast"
    assert cli.main(["finetune", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "read 64 training and 32 test examples: embedded NLI sample" in printed
    assert "examples/sec on [" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "fast"
    fast = metrics["fast_path"]
    assert fast["precision"] == "float32" and fast["graph"] is False and fast["fused_attention"] is True
    assert fast["packed_cache"]["hit"] is False and fast["packed_cache"]["dir"] == str(out / "packed")
    assert any((out / "packed").iterdir())
    assert cli.main(["finetune", "--out", str(out), *SMALL]) == 0
    assert json.loads((out / "metrics.json").read_text())["fast_path"]["packed_cache"]["hit"] is True

    book = tmp_path / "book"
    assert cli.main(["finetune", "--mode", "book", "--out", str(book), *SMALL]) == 0
    book_metrics = json.loads((book / "metrics.json").read_text())
    assert book_metrics["mode"] == "book" and "fast_path" not in book_metrics
    assert (book_metrics["num_train"], book_metrics["num_test"]) == (64, 32)
    assert not (book / "packed").exists()


@pytest.mark.slow
@pytest.mark.backends("mxnet")
def test_mxnet_fast_finetune_with_a_graph(tmp_path):
    out = tmp_path / "mx"
    cache = tmp_path / "cache"
    assert cli.main(["finetune", "--backend", "mxnet", "--graph", "--cache-dir", str(cache), "--out", str(out),
                     *SMALL]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "fast" and metrics["fast_path"]["graph"] is True
    assert metrics["fast_path"]["bucketing"]["pad_multiple"] == 8
    assert metrics["fast_path"]["packed_cache"]["dir"] == str(cache) and any(cache.iterdir())


def test_unknown_mode_and_precision_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--mode", "turbo"])
    with pytest.raises(ValueError, match="--mode 'turbo'"):
        FinetuneSettings(mode="turbo", out=str(tmp_path))


@pytest.mark.backends("mxnet")
def test_mxnet_refuses_bfloat16(tmp_path, capsys):
    assert cli.main(["finetune", "--backend", "mxnet", "--precision", "bfloat16", "--out", str(tmp_path / "o"),
                     *SMALL]) == 2
    assert "bfloat16" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bucketing_and_dropout_the_fast_path_retraces_the_book_path(tmp_path, backend):
    """--no-bucketing: the book path's batches, the fast path's kernels. With dropout 0 the two modes
    then differ by rounding only: the same loss and accuracy every epoch, the same predictions."""
    common = ["--backend", backend, "--pretrained", "random", "--dropout", "0", "--lr", "1e-3",
              "--train-limit", "96", "--test-limit", "48", "--epochs", "2", "--batch-size", "32",
              "--max-len", "32", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    runs = {}
    for name, extra in (("book", ["--mode", "book"]), ("fast", ["--no-bucketing"]), ("bucketed", [])):
        assert cli.main(["finetune", "--out", str(tmp_path / name), *common, *extra]) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    book, fast, bucketed = runs["book"]["epochs"], runs["fast"]["epochs"], runs["bucketed"]["epochs"]
    assert runs["fast"]["fast_path"]["bucketing"]["sampler"] == "batch_indices"
    assert runs["bucketed"]["fast_path"]["bucketing"]["sampler"] == "bucket_batch_indices"
    for b, f in zip(book, fast):
        assert f["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert (f["train_acc"], f["test_acc"]) == (b["train_acc"], b["test_acc"])
    # bucketing changes which examples share a batch, hence the steps: the check above can tell
    assert any(abs(b["loss"] - f["loss"]) > 1e-3 for b, f in zip(book, bucketed))


@pytest.mark.slow
def test_jax_plans_its_widths_and_counts_its_compiles(tmp_path, capsys):
    pytest.importorskip("jax")
    out = tmp_path / "jax"
    assert cli.main(["finetune", "--backend", "jax", "--out", str(out), *SMALL]) == 0
    assert "compiled " in capsys.readouterr().out
    fast = json.loads((out / "metrics.json").read_text())["fast_path"]
    plans = fast["bucketing"]["widths"]
    assert set(plans) == {"train", "test"} and all(1 <= len(widths) <= 2 for widths in plans.values())
    # 64 + 32 examples of one epoch at 32 rows: each training width six programs (the staged step's
    # forward and backward of the embeddings, a block and the top; backends/jax/_programs.py), the
    # update one for the run, and each evaluation width one.
    assert fast["compiles"] == 6 * len(plans["train"]) + 1 + len(plans["test"]) and fast["compile_seconds"] > 0


def test_backends_that_compile_nothing_per_shape_plan_no_widths(tmp_path):
    out = tmp_path / "torch"
    assert cli.main(["finetune", "--backend", "torch", "--out", str(out), *SMALL]) == 0
    fast = json.loads((out / "metrics.json").read_text())["fast_path"]
    assert fast["bucketing"]["widths"] == {} and "compiles" not in fast
