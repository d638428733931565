"""Faults and bad input on purpose: no work lost, no silent wrong result, one error surface
(`nlibert: error: ...`, exit 2, no traceback unless --debug)."""
import json
import os

import pytest

from nlibert import cli, jobs
from nlibert.backends import BACKENDS
from nlibert.core import data_hub
from nlibert.core.resume import output_lock
from nlibert.core.sample import write_sample_snli
from nlibert.core.settings import FinetuneSettings

SMALL = ["--pretrained", "random", "--train-limit", "48", "--test-limit", "16", "--epochs", "1", "--batch-size", "16",
         "--max-len", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A fine-tuned torch classifier folder."""
    out = tmp_path_factory.mktemp("model") / "out"
    assert cli.main(["finetune", "--out", str(out), *SMALL]) == 0
    return out / "model"


def error_of(capsys, argv) -> str:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # refused as the options are parsed (e.g. --epochs 0: not a positive integer)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("nlibert: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_diverging_run_is_an_error_and_writes_no_model(backend, tmp_path, capsys):
    out = tmp_path / "out"
    err = error_of(capsys, ["finetune", "--backend", backend, "--out", str(out), "--lr", "1e9", *SMALL])
    assert "the training loss became" in err and "--lr 1e+09" in err and "likely too high" in err
    assert not (out / "model").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"), ("--epochs", "0"),
                                           ("--batch-size", "0"), ("--max-len", "2")])
def test_both_backends_refuse_the_same_bad_settings(backend, option, value, tmp_path, capsys):
    argv = ["finetune", "--backend", backend, "--out", str(tmp_path / "o"), *SMALL, option, value]
    err = error_of(capsys, argv)
    assert option in err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--max-len"):
        cli.main(["finetune", "--debug", "--out", str(tmp_path / "o"), "--max-len", "2"])
    monkeypatch.setenv("NLIBERT_DEBUG", "1")
    with pytest.raises(ValueError, match="--max-len"):
        cli.main(["finetune", "--out", str(tmp_path / "o"), "--max-len", "2"])


def test_errors_name_the_option_or_file(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "--out" in error_of(capsys, ["finetune", "--out", str(a_file), *SMALL])
    assert "--device gpux" in error_of(capsys, ["finetune", "--out", str(tmp_path / "o"), *SMALL[:-2],
                                                "--device", "gpux"])

    def offline(*args, **kwargs):
        raise data_hub.DownloadError("could not download SNLI from https://example.invalid: no network")

    monkeypatch.setattr(data_hub, "download_extract", offline)
    import nlibert.core.sources as sources
    monkeypatch.setattr(sources, "download_extract", offline)
    assert "could not download SNLI" in error_of(capsys, ["finetune", "--data", "SNLI", "--out", str(tmp_path / "o2"),
                                                          *SMALL])


def test_a_second_run_into_a_busy_out_is_refused(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(ValueError, match="another nlibert run is writing there"):
            jobs.run_finetune(FinetuneSettings(out=str(out), pretrained="random", train_limit=16, test_limit=8,
                                               epochs=1, batch_size=8, max_len=16))
    with output_lock(out):  # released: the next run gets it
        pass


def test_an_unreadable_checkpoint_is_an_error_naming_it(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["finetune", "--out", str(out), *SMALL, "--checkpoint-every", "1"]
    assert cli.main(argv + ["--stop-after", "2"]) == 0
    state = json.loads((out / "resume" / "state.json").read_text())
    trainer = out / "resume" / state["files"]["trainer"]
    trainer.write_bytes(trainer.read_bytes()[:100])  # truncated
    err = error_of(capsys, argv)
    assert "resume" in err and "cannot be read" in err and "--no-resume" in err
    assert cli.main(argv + ["--no-resume"]) == 0


@pytest.mark.backends("mxnet")
def test_convert_never_destroys_a_model(model, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    err = error_of(capsys, ["convert", str(model), str(model), "--to", "mxnet"])
    assert "is the source checkpoint itself" in err
    assert error_of(capsys, ["convert", "minilm-l6", str(model), "--to", "torch"])  # holds a model
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    other = tmp_path / "mx"
    assert cli.main(["convert", str(model), str(other), "--to", "mxnet"]) == 0
    assert "already holds files" in error_of(capsys, ["convert", str(model), str(other), "--to", "mxnet"])
    assert cli.main(["convert", str(model), str(other), "--to", "mxnet", "--overwrite"]) == 0
    assert sorted(os.listdir(other)) == ["classifier.params", "config.json", "vocab.json"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left behind
    assert json.loads((other / "config.json").read_text())["format"] == "mxnet"


def test_predict_refuses_empty_text(model, capsys):
    assert "some text" in error_of(capsys, ["predict", "--model", str(model), "", "  "])


@pytest.mark.backends("mxnet")  # parity compares with a second backend
def test_parity_judges_valid_positions_relative_to_the_outputs_scale(model):
    report = jobs.run_parity(str(model), num_pairs=16, max_len=40)
    assert set(report["scale"]) == {"logits"} and report["scale"]["logits"] >= 1.0
    assert report["passed"]
    report = jobs.run_parity(str(model), num_pairs=16, max_len=40, tolerance=0.0)
    assert not report["passed"]  # a tolerance of 0 fails on any rounding: the check is not vacuous


def test_empty_splits_fail_before_training(tmp_path, capsys):
    data = write_sample_snli(tmp_path / "sample", num_train=40, num_test=10, seed=0)
    (tmp_path / "sample" / "snli_1.0_test.txt").write_text(
        (tmp_path / "sample" / "snli_1.0_test.txt").read_text().splitlines()[0] + "\n")  # header only
    err = error_of(capsys, ["finetune", "--data", str(data), "--out", str(tmp_path / "o"), *SMALL[:2], "--epochs", "1"])
    assert "40 training and 0 test pairs; need both" in err
    # Nothing written: no model, no seeded checkpoint built from this data, no resume folder.
    assert not [p for p in (tmp_path / "o").glob("*") if p.name not in ("packed", ".nlibert.lock")]
