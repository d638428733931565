"""Long runs speak as they go: a line per epoch, a line every --log-every steps when standard output
is a file, OUT/log.jsonl continued without duplicates by a resumed run, training.png at each epoch's
end; and validation data, on which --save-best chooses (never on the test split)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from nlibert import cli, jobs
from nlibert.backends import BACKENDS
from nlibert.core.runlog import RunLog, epoch_line, read_log
from nlibert.core.sample import write_sample_snli
from nlibert.core.settings import FinetuneSettings, PretrainSettings
from nlibert.core.sources import book_validation, finetune_source, packed_validation, validation_indices
from nlibert.core.training import EpochRecord
from test_pretrain import TINY, write_wiki
from topic_data import topic_rows, write_csv

EPOCH_LINE = re.compile(r"^epoch (\d+), loss \d+\.\d{4}, train acc \d\.\d{3}, (valid acc \d\.\d{4}, )?"
                        r"test acc \d\.\d{4}, \d+\.\d examples/sec, \d+\.\d sec, \d+:\d\d:\d\d elapsed$")
STEP_LINE = re.compile(r"^step (\d+), epoch (\d+), loss \d+\.\d{4}, lr \S+, \d+\.\d examples/sec, "
                       r"\d+:\d\d:\d\d elapsed$")
SAME = ("kind", "step", "epoch", "lr")  # what a resumed run's entries share exactly with an uninterrupted run's


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_snli(tmp_path_factory.mktemp("data") / "snli", num_train=120, num_test=16, seed=4)


def settings(backend, sample, out, **extra):
    # 6 steps an epoch (96 training pairs, 24 held out), 2 epochs, a step line every 2 steps
    return FinetuneSettings(**{**dict(backend=backend, pretrained="random", data=str(sample), max_len=32,
                                      batch_size=16, epochs=2, lr=1e-3, device="cpu", out=str(out),
                                      checkpoint_every=4, log_every=2, validation_split=0.2), **extra})


@pytest.mark.slow
def test_a_run_with_its_output_in_a_file_prints_epoch_and_step_lines(sample, tmp_path):
    out, log = tmp_path / "out", tmp_path / "run.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as stdout:  # not a terminal, as under nohup or a scheduler
        code = subprocess.call([sys.executable, "-m", "nlibert.cli", "finetune", "--pretrained", "random",
                                "--data", str(sample), "--max-len", "32", "--batch-size", "16", "--epochs", "2",
                                "--device", "cpu", "--log-every", "2", "--validation-split", "0.2", "--out", str(out)],
                               stdout=stdout, stderr=subprocess.PIPE, env=env, timeout=300)
    assert code == 0
    lines = log.read_text().splitlines()
    epochs = [int(EPOCH_LINE.match(line).group(1)) for line in lines if EPOCH_LINE.match(line)]
    steps = [int(STEP_LINE.match(line).group(1)) for line in lines if STEP_LINE.match(line)]
    assert epochs == [1, 2] and steps == [2, 4, 6, 8, 10, 12], lines
    # the book's two closing lines stay last but one, as train_ch13 prints them
    assert re.match(r"^loss \d\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}$", lines[-3])
    assert lines[-2].endswith("examples/sec on [device(type='cpu')]")
    first_epoch, step_8 = (next(i for i, line in enumerate(lines) if line.startswith(start))
                           for start in ("epoch 1,", "step 8,"))
    assert first_epoch < step_8  # each line as its moment comes


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_log_jsonl_of_a_stopped_and_resumed_run_is_the_uninterrupted_runs(backend, sample, tmp_path, capsys):
    whole = jobs.run_finetune(settings(backend, sample, tmp_path / "whole"))
    assert whole["completed"]
    first = jobs.run_finetune(settings(backend, sample, tmp_path / "split", stop_after=7))
    assert not first["completed"]
    assert (tmp_path / "split" / "training.png").exists()  # drawn at epoch 1's end, before the run ended
    resumed = jobs.run_finetune(settings(backend, sample, tmp_path / "split"))
    assert resumed["resumed_from_step"] == 7
    a, b = (read_log(tmp_path / out / "log.jsonl") for out in ("whole", "split"))
    assert [(e["kind"], e["step"]) for e in a] == [("step", 2), ("step", 4), ("step", 6), ("epoch", 6),
                                                   ("step", 8), ("step", 10), ("step", 12), ("epoch", 12)]
    assert [{k: e.get(k) for k in SAME} for e in b] == [{k: e.get(k) for k in SAME} for e in a]
    for x, y in zip(a, b):  # the same figures (fast mode sums on the device: to rounding)
        for key in ("loss", "train_acc", "validation_acc", "test_acc"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), key
    assert all(e["examples_per_sec"] > 0 and e["elapsed"] >= 0 for e in b)
    assert whole["epochs"][-1]["validation_acc"] == a[-1]["validation_acc"]


def test_a_killed_runs_later_entries_are_dropped_when_it_resumes(sample, tmp_path, monkeypatch):
    """A run that dies writing epoch 1's checkpoint (the last one: step 4) leaves entries of steps 5
    and 6 and of epoch 1, and a half-written line; the resumed run writes each step and epoch once."""
    class Crash(Exception):
        pass

    save = jobs.ResumeFolder.save

    def crashing_save(self, step, progress):
        if step == 6:
            raise Crash
        return save(self, step, progress)

    out = tmp_path / "out"
    options = dict(log_every=1, mode="book", checkpoint_every=4)
    monkeypatch.setattr(jobs.ResumeFolder, "save", crashing_save)
    with pytest.raises(Crash):
        jobs.run_finetune(settings("torch", sample, out, **options))
    monkeypatch.undo()
    with open(out / "log.jsonl", "a") as f:
        f.write('{"kind": "step", "st')  # killed mid-write
    written = [(e.get("kind"), e.get("step")) for e in read_log_lenient(out / "log.jsonl")]
    assert written[-3:] == [("step", 5), ("step", 6), ("epoch", 6)]
    resumed = jobs.run_finetune(settings("torch", sample, out, **options))
    assert resumed["resumed_from_step"] == 4
    entries = read_log(out / "log.jsonl")
    keys = [(e["kind"], e["step"]) for e in entries]
    assert len(keys) == len(set(keys)) == 14
    assert [e["step"] for e in entries if e["kind"] == "step"] == list(range(1, 13))


def read_log_lenient(path):
    entries = []
    for line in open(path):
        try:
            entries.append(json.loads(line))
        except ValueError:
            pass
    return entries


def test_runlog_begin_keeps_what_the_checkpoint_saw(tmp_path, capsys):
    log = RunLog(tmp_path, 2, step_lines=False)
    log.begin()
    assert not log.due(1) and log.due(2) and not RunLog(None, 0).due(2)
    for step in (2, 4, 6):
        log.step({"step": step, "epoch": 1 + step // 5}, f"step {step}")
    log.epoch({"epoch": 1, "step": 5, "loss": 1.0, "train_acc": 0.5, "validation_acc": None, "test_acc": float("nan"),
               "examples_per_sec": 10.0, "seconds": 1.0, "elapsed": 61.0})
    assert capsys.readouterr().out == ("epoch 1, loss 1.0000, train acc 0.500, 10.0 examples/sec, 1.0 sec, "
                                       "0:01:01 elapsed\n")  # no step lines (step_lines=False), no test data
    assert read_log(tmp_path / "log.jsonl", "epoch")[0]["test_acc"] is None  # JSON has no NaN
    RunLog(tmp_path, 2).begin(step=4, epochs_done=0)
    assert [(e["kind"], e["step"]) for e in read_log(tmp_path / "log.jsonl")] == [("step", 2), ("step", 4)]
    RunLog(tmp_path, 2).begin()  # a new run starts the file again
    assert read_log(tmp_path / "log.jsonl") == []
    shown = RunLog(None, 1)  # step_lines None: shown when standard output is not a terminal (here: captured)
    shown.step({"step": 1}, "step 1 line")
    assert capsys.readouterr().out == "step 1 line\n"


def test_epoch_line_has_the_d2l_jax_form():
    entry = {"epoch": 3, "loss": 0.48123, "train_acc": 0.8123, "validation_acc": 0.79, "test_acc": 0.783,
             "examples_per_sec": 512.34, "seconds": 41.25, "elapsed": 3723.0}
    assert epoch_line(entry) == ("epoch 3, loss 0.4812, train acc 0.812, valid acc 0.7900, test acc 0.7830, "
                                 "512.3 examples/sec, 41.2 sec, 1:02:03 elapsed")


# --- validation data and --save-best --------------------------------------------------------------

def test_save_best_is_refused_without_validation_data(tmp_path, capsys):
    with pytest.raises(ValueError, match="--save-best .*--validation-split F.*--validation-file PATH"):
        FinetuneSettings(save_best=True)
    code = cli.main(["finetune", "--pretrained", "random", "--save-best", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("nlibert: error: --save-best chooses the epoch on validation data")
    assert not (tmp_path / "o").exists()
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="--validation-split must be a fraction"):
            FinetuneSettings(validation_split=bad)
    with pytest.raises(ValueError, match="give one of them"):
        FinetuneSettings(validation_split=0.1, validation_file="dev.txt")
    with pytest.raises(ValueError, match="--validation-file: .*--validation-split"):
        FinetuneSettings(task="ag_news", data="x", validation_file="dev.csv")
    # the validation options are in a resumed run's signature when set (absent otherwise, as in
    # checkpoints written before they existed)
    assert "validation_split" not in FinetuneSettings().signature()
    assert FinetuneSettings(validation_split=0.1).signature()["validation_split"] == 0.1
    assert FinetuneSettings(validation_file="d.txt").signature()["validation_file"] == "d.txt"
    assert "log_every" not in FinetuneSettings().signature() and "log_every" not in PretrainSettings().signature([])
    with pytest.raises(ValueError, match="--log-every must be >= 0"):
        PretrainSettings(log_every=-1)


def test_a_validation_split_is_seeded_disjoint_and_the_same_on_both_paths(sample, tmp_path):
    keep, held = validation_indices(10, 0.2, seed=3)
    assert len(held) == 2 and sorted(np.concatenate([keep, held])) == list(range(10))
    assert np.array_equal(held, validation_indices(10, 0.2, seed=3)[1])
    assert any(not np.array_equal(held, validation_indices(10, 0.2, seed)[1]) for seed in (4, 5, 6))
    with pytest.raises(ValueError, match="--validation-split 0.9: 1 training examples leave none"):
        validation_indices(1, 0.9, 0)
    s = settings("torch", sample, tmp_path, validation_split=0.25, train_limit=40)
    source = finetune_source(s)
    train_texts, _ = source.texts(s.seed, s.train_limit, s.test_limit)
    train, valid = book_validation(s, source, train_texts)
    assert (len(train[-1]), len(valid[-1])) == (30, 10)
    assert not {(p, h) for p, h in zip(*train[:2])} & {(p, h) for p, h in zip(*valid[:2])}
    vocab = jobs.seeded_vocab([text for column in train_texts[:2] for text in column])
    train_set, _, _ = source.packed(s.seed, vocab, s.max_len, s.train_limit, s.test_limit, str(tmp_path / "cache"))
    packed_train, packed_valid = packed_validation(s, source, train_set, vocab, str(tmp_path / "cache"))
    assert list(packed_valid.labels) == list(valid[-1]) and list(packed_train.labels) == list(train[-1])


def test_save_best_chooses_on_validation_and_reports_that_models_test_accuracy(sample, tmp_path, capsys):
    best = jobs.run_finetune(settings("torch", sample, tmp_path / "best", epochs=3, lr=0.05, dropout=0.0,
                                      mode="book", save_best=True))
    epochs = best["epochs"]
    chosen = max(range(3), key=lambda i: (epochs[i]["validation_acc"], -i))  # the first of equals
    assert best["best_epoch"] == best["model_epoch"] == chosen + 1
    assert best["test_acc"] == epochs[chosen]["test_acc"] and best["last_epoch_test_acc"] == epochs[-1]["test_acc"]
    assert best["validation_acc"] == epochs[chosen]["validation_acc"] and best["chosen_on"] == "validation accuracy"
    assert best["splits"]["validation"]["examples"] == best["num_validation"] == 24
    assert best["splits"]["test"]["data"].startswith("the test split of")
    assert f"chose epoch {chosen + 1} on validation accuracy" in capsys.readouterr().out
    # the choice follows validation accuracy, not test accuracy
    records = [EpochRecord(1, 1.0, 0.5, test_acc=0.9, examples_per_sec=1.0, validation_acc=0.4),
               EpochRecord(2, 1.0, 0.5, test_acc=0.5, examples_per_sec=1.0, validation_acc=0.6)]
    assert jobs._best_epoch(records) == 2
    # the validation options are part of what a resumed run must share
    with pytest.raises(ValueError, match="validation_split"):
        jobs.run_finetune(settings("torch", sample, tmp_path / "best", epochs=4, lr=0.05, dropout=0.0, mode="book",
                                   save_best=True, validation_split=0.25))


def test_validation_files_of_snli_and_of_the_users_own_files(sample, tmp_path):
    test_file = os.path.join(sample, "snli_1.0_test.txt")
    for mode in ("fast", "book"):  # validating on the test file would be choosing on it
        with pytest.raises(ValueError, match="--validation-file .*: is the file this run tests on"):
            jobs.run_finetune(settings("torch", sample, tmp_path / mode, mode=mode, validation_split=None,
                                       validation_file=test_file))
    copy = tmp_path / "snli_1.0_dev.txt"
    copy.write_bytes(open(test_file, "rb").read())
    snli = jobs.run_finetune(settings("torch", sample, tmp_path / "snli", epochs=1, validation_split=None,
                                      validation_file=str(copy), save_best=True))
    assert snli["num_validation"] == snli["num_test"] == 16 and snli["best_epoch"] == 1
    assert snli["epochs"][0]["validation_acc"] == snli["epochs"][0]["test_acc"]  # the same examples, both paths
    train = write_csv(tmp_path / "train.csv", topic_rows(60, seed=1))
    valid = write_csv(tmp_path / "valid.csv", topic_rows(12, seed=2))
    files = jobs.run_finetune(FinetuneSettings(
        pretrained="random", train_file=train, validation_file=valid, text_columns="text", label_column="topic",
        max_len=16, batch_size=16, epochs=1, device="cpu", out=str(tmp_path / "files"), log_every=0))
    assert files["num_validation"] == 12 and files["splits"]["validation"]["data"] == os.path.abspath(valid)
    assert [e["kind"] for e in read_log(tmp_path / "files" / "log.jsonl")] == ["epoch"]  # --log-every 0


# --- pretraining ----------------------------------------------------------------------------------

def test_pretraining_logs_every_n_steps_and_resumes_its_log(tmp_path, capsys):
    corpus = write_wiki(tmp_path / "wiki")
    options = dict(backend="torch", corpus=str(corpus), steps=6, batch_size=32, max_len=24, device="cpu",
                   checkpoint_every=2, log_every=2, **TINY)
    whole = jobs.run_pretrain(PretrainSettings(out=str(tmp_path / "whole"), **options))
    printed = capsys.readouterr().out
    assert re.findall(r"^step (\d+), epoch \d+, MLM loss \d+\.\d{3}, NSP loss \d+\.\d{3}, lr 0\.01, "
                      r"\d+\.\d sentence pairs/sec, \d:\d\d:\d\d elapsed$", printed, re.M) == ["2", "4", "6"]
    jobs.run_pretrain(PretrainSettings(out=str(tmp_path / "split"), stop_after=3, **options))
    jobs.run_pretrain(PretrainSettings(out=str(tmp_path / "split"), **options))
    a, b = (read_log(tmp_path / out / "log.jsonl") for out in ("whole", "split"))
    assert [e["step"] for e in a] == [2, 4, 6]
    for key in ("kind", "step", "epoch", "mlm_loss", "nsp_loss", "lr"):
        assert [e[key] for e in a] == [e[key] for e in b], key
    assert a[-1]["mlm_loss"] == whole["history"][-1]["mlm_loss"]
