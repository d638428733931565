"""The `nlibert` command end to end, on small data the tests make."""
import json
import math
import shutil

import pytest

from nlibert import cli
from nlibert.backends import BACKENDS
from nlibert.core.sample import write_sample_snli

SMALL = ["--pretrained", "random", "--train-limit", "96", "--test-limit", "48", "--epochs", "2", "--batch-size", "32", "--max-len", "32"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_finetune_then_predict_end_to_end(tmp_path, capsys, backend):
    out = tmp_path / "out"
    assert cli.main(["finetune", "--backend", backend, "--out", str(out), "--device", "cpu", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "read 96 training and 48 test examples: embedded NLI sample" in printed
    assert "loss " in printed and "examples/sec on [" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == backend and metrics["num_train"] == 96 and metrics["num_test"] == 48
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert all(math.isfinite(e["loss"]) and 0 <= e["test_acc"] <= 1 and e["examples_per_sec"] > 0
               for e in metrics["epochs"])
    assert metrics["hyperparameters"]["seed"] == 0 and backend in metrics["versions"]
    assert json.loads((out / "model" / "config.json").read_text())["kind"] == "classifier"

    assert cli.main(["predict", "--model", str(out / "model"), "a man is sleeping", "a person is sleeping"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] in ("entailment", "contradiction", "neutral")
    probabilities = json.loads("\n".join(lines[1:]))
    assert sorted(probabilities) == ["contradiction", "entailment", "neutral"]
    assert abs(sum(probabilities.values()) - 1) < 1e-5
    assert max(probabilities, key=probabilities.get) == lines[0]


def test_finetune_splits_a_dev_only_folder_and_reuses_the_seeded_checkpoint(tmp_path, capsys):
    sample = write_sample_snli(tmp_path / "sample", num_train=200, num_test=10, seed=1)
    data = tmp_path / "devonly"
    data.mkdir()
    shutil.copy(f"{sample}/snli_1.0_train.txt", data / "snli_1.0_dev.txt")
    out = tmp_path / "out"
    args = ["finetune", "--pretrained", "random", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "64", "--max-len", "32"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "dev file split 90/10, seed 0" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    total = metrics["num_train"] + metrics["num_test"]
    assert metrics["num_train"] == round(0.9 * total)
    (params,) = out.glob("seeded-bert-torch-*/pretrained.params")
    stamp = params.stat().st_mtime_ns
    assert cli.main(args) == 0  # a complete checkpoint folder is reused, not rebuilt
    assert params.stat().st_mtime_ns == stamp
    # it is keyed by what it was built from: another seed (or other data) gets its own
    assert cli.main(args + ["--seed", "1", "--no-resume"]) == 0
    assert len(list(out.glob("seeded-bert-torch-*/pretrained.params"))) == 2
    assert params.stat().st_mtime_ns == stamp


def test_clear_errors(tmp_path, capsys):
    assert cli.main(["finetune", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli.main(["predict", "--model", str(tmp_path), "a", "b"]) == 2
    assert "not a fine-tuned model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--train-limit", "0"])


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise(tmp_path, monkeypatch):
    import os
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cli.main(["predict", "--model", str(tmp_path), "a", "b"]) == 2  # fails fast, after the setting
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli.main(["predict", "--model", str(tmp_path), "a", "b"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
