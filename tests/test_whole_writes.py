"""Whole writes (issue 24): outputs never land on inputs; a model folder is replaced whole, so a kill
at the first change of its contents leaves the old model or the new one; a resumed run is refused
when its data changed; the header choice a model recorded is followed; CSV cells of any size are
read, and what nlibert writes it reads back."""
import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nlibert import cli, inference
from nlibert.core.io import check_output, remove_leftovers, replace_folder, temp_folder_beside
from nlibert.core.tables import Columns, read_table, read_texts, table_records, write_table
from nlibert.core.tasks import file_task

TINY = ["--pretrained", "random", "--max-len", "16", "--batch-size", "8", "--epochs", "1", "--device", "cpu"]


def write_rows(path, rows, header=("text", "label")) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def labelled(names=("neg", "pos"), count=24) -> list:
    words = {names[0]: "bad awful film", names[1]: "good great movie"}
    return [(f"{words[names[i % 2]]} {i}", names[i % 2]) for i in range(count)]


def finetune(out, train, *extra) -> None:
    assert cli.main(["finetune", *TINY, "--train-file", train, "--text-columns", "text", "--label-column", "label",
                     "--out", str(out), "--cache-dir", str(out) + "-cache", *extra]) == 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    finetune(folder / "out", write_rows(folder / "train.csv", labelled()))
    return folder / "out" / "model"


def error_of(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nlibert: error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


# --- outputs never land on inputs ----------------------------------------------------------------------

def test_predict_refuses_an_output_inside_its_model_or_onto_its_input_before_any_work(model, tmp_path, capsys,
                                                                                    monkeypatch):
    test = write_rows(tmp_path / "test.csv", [("good film",)], header=("text",))
    before = {name: (model / name).read_bytes() for name in os.listdir(model)}
    monkeypatch.setattr(inference, "load_model", lambda *a: pytest.fail("did work before refusing"))
    for output, named in ((model / "config.json", "inside the model folder"), (model / "sub" / "p.csv", "inside"),
                          (test, "is the file --file names"),
                          (tmp_path / "test.csv" / "p.csv", "is a file, not a folder")):
        err = error_of(capsys, ["predict", "--model", str(model), "--file", test, "--output", str(output)])
        assert f"--output {output}" in err and named in err
    assert {name: (model / name).read_bytes() for name in os.listdir(model)} == before


def test_evaluate_refuses_an_out_that_is_a_file_or_the_model_before_evaluating(model, tmp_path, capsys, monkeypatch):
    test = write_rows(tmp_path / "test.csv", labelled(count=4))
    monkeypatch.setattr(inference, "load_model", lambda *a: pytest.fail("evaluated before refusing"))
    assert "--out " + test + ": is a file" in error_of(
        capsys, ["evaluate", "--model", str(model), "--test-file", test, "--out", test])
    assert "inside the model folder" in error_of(
        capsys, ["evaluate", "--model", str(model), "--test-file", test, "--out", str(model)])


def test_finetune_pretrain_and_convert_refuse_outputs_on_what_they_read(model, tmp_path, capsys):
    train = write_rows(tmp_path / "train.csv", labelled())
    assert "--out" in error_of(capsys, ["finetune", *TINY, "--train-file", train, "--text-columns", "text",
                                        "--label-column", "label", "--out", train])
    assert "inside the model folder" in error_of(capsys, ["finetune", *TINY[2:], "--pretrained", str(model.parent),
                                                           "--out", str(model.parent / "again")])
    assert "is a file, not a folder" in error_of(capsys, ["pretrain", "--corpus", str(tmp_path),
                                                           "--out", str(tmp_path / "train.csv" / "out")])
    err = error_of(capsys, ["convert", str(model), str(model / "inside"), "--to", "torch"])
    assert "inside" in err and not (model / "inside").exists()


def test_check_output_names_the_option_and_the_input(tmp_path):
    (tmp_path / "in.csv").write_text("x")
    with pytest.raises(ValueError, match="--output .*is the file --file names"):
        check_output("--output", tmp_path / "in.csv", inputs={"--file": str(tmp_path / "in.csv")})
    check_output("--output", tmp_path / "new" / "deeper" / "out.csv", inputs={"--file": str(tmp_path / "in.csv")})


# --- folders replaced whole --------------------------------------------------------------------------------

def test_replace_folder_swaps_whole_and_leftovers_are_cleared(tmp_path):
    dst = tmp_path / "model"
    dst.mkdir()
    (dst / "a").write_text("old")
    new = temp_folder_beside(dst)
    with open(os.path.join(new, "a"), "w") as f:
        f.write("new")
    replace_folder(new, dst)
    assert (dst / "a").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["model"]
    killed = temp_folder_beside(dst)  # a writer killed before its swap: ignored by readers, then removed
    os.rename(dst, str(dst.parent / ".model.x.old"))  # a fallback writer killed between its two renames
    remove_leftovers(dst)
    assert (dst / "a").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["model"] and not os.path.exists(killed)


def _contents(folder) -> dict:
    try:
        return {e.name: (e.inode(), e.stat().st_mtime_ns) for e in os.scandir(folder)}
    except FileNotFoundError:
        return {}


def _probabilities(folder, texts=("good great movie 3", "bad awful film 4")) -> tuple:
    model = inference.load_model(str(folder), "cpu")
    return model.task.label_names, model.probabilities([list(texts)], 8)


@pytest.mark.slow
@pytest.mark.parametrize("watch", ["model", "out"], ids=["kill-at-the-swap", "kill-while-writing-beside"])
def test_a_kill_at_the_first_change_leaves_the_old_model_or_the_new_one_whole(tmp_path, watch):
    """A run into an OUT that holds a model of other labels, SIGKILLed at the first change of
    OUT/model's contents (or of OUT's, where the new model is written beside): predict then gives the
    old model's answers or the new model's, never a mix (a new config.json beside old parameters)."""
    old_train = write_rows(tmp_path / "old.csv", labelled(("neg", "pos")))
    new_train = write_rows(tmp_path / "new.csv", labelled(("bad", "good"), count=40))
    out = tmp_path / "out"
    finetune(out, old_train)
    old = _probabilities(out / "model")
    finetune(tmp_path / "reference", new_train)
    new = _probabilities(tmp_path / "reference" / "model")
    watched = out / "model" if watch == "model" else out
    ignore = {".nlibert.lock", "resume", "metrics.json", "training.png"}  # written before the model
    before = {k: v for k, v in _contents(watched).items() if k not in ignore and not k.startswith("seeded")}
    argv = ["finetune", *TINY, "--train-file", new_train, "--text-columns", "text", "--label-column", "label",
            "--out", str(out), "--cache-dir", str(out) + "-cache", "--no-resume"]
    job = subprocess.Popen([sys.executable, "-m", "nlibert.cli", *argv], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        now = {k: v for k, v in _contents(watched).items() if k not in ignore and not k.startswith("seeded")}
        if now != before:
            break
        assert job.poll() is None and time.monotonic() < deadline, "the run ended without changing the folder"
    job.send_signal(signal.SIGKILL)
    job.wait()
    labels, probs = _probabilities(out / "model")
    if labels == old[0]:
        np.testing.assert_array_equal(probs, old[1])
    else:
        assert labels == new[0]
        np.testing.assert_allclose(probs, new[1], rtol=0, atol=1e-6)
    assert not [name for name in os.listdir(out / "model") if name.startswith(".")]
    finetune(out, new_train, "--no-resume")  # the next run clears what the killed one left beside
    assert not [name for name in os.listdir(out) if name.startswith(".model.")]


@pytest.mark.slow
def test_a_pretraining_run_killed_at_the_first_change_of_its_model_files_leaves_no_mix(tmp_path):
    """pretrain's OUT holds more than the model, so its files are moved in one by one, the old
    pretrained.params removed first: a kill at the first change leaves the old model whole, none
    (refused by name by every loader), or the new one; never new files beside old parameters."""
    from test_pretrain import write_wiki
    from nlibert.core.folders import describe_checkpoint
    out, model_files = tmp_path / "out", ("vocab.json", "config.json", "pretrained.params")

    def pretrain(corpus, target, *extra):
        return [sys.executable, "-m", "nlibert.cli", "pretrain", "--corpus", str(corpus), "--out", str(target),
                "--steps", "2", "--batch-size", "16", "--max-len", "24", "--num-hiddens", "32",
                "--ffn-num-hiddens", "64", "--num-heads", "2", "--num-layers", "1", "--device", "cpu", *extra]

    old_corpus, new_corpus = write_wiki(tmp_path / "old", seed=0), write_wiki(tmp_path / "new", seed=1)
    subprocess.run(pretrain(old_corpus, out), check=True, capture_output=True)
    old = {name: (out / name).read_bytes() for name in model_files}
    job = subprocess.Popen(pretrain(new_corpus, out, "--no-resume"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    before = {name: _contents(out).get(name) for name in model_files}
    deadline = time.monotonic() + 120
    while {name: _contents(out).get(name) for name in model_files} == before:
        assert job.poll() is None and time.monotonic() < deadline, "the run ended without changing the model"
    job.send_signal(signal.SIGKILL)
    job.wait()
    killed = None
    if not (out / "pretrained.params").exists():
        with pytest.raises(FileNotFoundError, match="pretrained.params is missing|no pretrained.params"):
            describe_checkpoint(str(out))
    else:  # the kill can land after the last file moved in: then the new model is whole
        killed = {name: (out / name).read_bytes() for name in model_files}
    subprocess.run(pretrain(new_corpus, out, "--no-resume"), check=True, capture_output=True)
    assert all((out / name).exists() for name in model_files)
    new = {name: (out / name).read_bytes() for name in model_files}  # the same command: the same bytes
    assert killed is None or killed in (old, new)
    assert not [name for name in os.listdir(out) if name.startswith(".pretrained.params.")]


# --- resume refused on other data --------------------------------------------------------------------------

def test_resume_is_refused_when_the_labels_or_examples_changed(tmp_path, capsys):
    train = tmp_path / "train.csv"
    rows = labelled(count=40)
    write_rows(train, rows)
    argv = ["finetune", *TINY, "--epochs", "2", "--train-file", str(train), "--text-columns", "text",
            "--label-column", "label", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert cli.main([*argv, "--stop-after", "2"]) == 0
    write_rows(train, [(text, {"neg": "pos", "pos": "neg"}[label]) for text, label in rows])  # same rows, same size
    err = error_of(capsys, argv)
    assert "other training or test examples" in err and "--no-resume" in err and "other settings" not in err
    write_rows(train, [(text, "mid" if i % 5 == 0 else label) for i, (text, label) in enumerate(rows)])
    err = error_of(capsys, argv)
    assert "other labels (its ['neg', 'pos'], this run's ['mid', 'neg', 'pos'])" in err and "--no-resume" in err
    assert cli.main([*argv, "--no-resume"]) == 0


# --- files as users have them --------------------------------------------------------------------------------

def test_a_header_line_read_as_a_row_is_flagged(tmp_path):
    train = write_rows(tmp_path / "train.csv", labelled(count=10))
    with pytest.raises(ValueError, match=r"line 1: label 'label' appears in no other row; is this line a header"):
        file_task(train, None, Columns.parse("0", "1", no_header=True), 0)
    file_task(write_rows(tmp_path / "plain.csv", labelled(count=10), header=None), None,
              Columns.parse("0", "1", no_header=True), 0)


def test_predict_and_evaluate_follow_the_models_header_choice_unless_told(tmp_path, capsys):
    rows = labelled(count=24)
    finetune(tmp_path / "out", write_rows(tmp_path / "train.csv", rows, header=None), "--no-header",
             "--text-columns", "0", "--label-column", "1")
    model = str(tmp_path / "out" / "model")
    capsys.readouterr()
    plain = write_rows(tmp_path / "plain.csv", rows[:3], header=None)
    assert cli.main(["predict", "--model", model, "--file", plain, "--output", str(tmp_path / "p.csv")]) == 0
    assert "without a header line (as the model's training file was" in capsys.readouterr().out
    assert len(read_table(str(tmp_path / "p.csv")).rows) == 3
    headed = write_rows(tmp_path / "headed.csv", [(t,) for t, _ in rows[:3]], header=("text",))
    assert cli.main(["predict", "--model", model, "--file", headed, "--output", str(tmp_path / "h.csv"),
                     "--header", "--text-columns", "text"]) == 0
    assert "with a header line (--header)" in capsys.readouterr().out
    assert [row[0] for row in read_table(str(tmp_path / "h.csv")).rows] == [t for t, _ in rows[:3]]  # no header row
    assert cli.main(["evaluate", "--model", model, "--test-file", plain, "--out", str(tmp_path / "ev")]) == 0
    assert "without a header line" in capsys.readouterr().out


def test_a_megabyte_quoted_cell_is_read_and_what_nlibert_writes_reads_back(tmp_path):
    big = "a \"quoted\", long\ntext " * 50_000  # 1.1 MB: over Python's default 128 KiB field limit
    rows = [{"text": big, "label": "x"}, {"text": "tab\there, é", "label": "y"}]
    for name in ("out.csv", "out.jsonl"):
        write_table(tmp_path / name, ["text", "label"], rows)
        columns, back = table_records(read_table(str(tmp_path / name)))
        assert columns == ["text", "label"] and back == rows
    assert read_texts(str(tmp_path / "out.csv"), Columns.parse("text", "label")).texts[0][0] == big


def test_smaller_cases_name_the_option(tmp_path, capsys):
    assert "is a folder; name a data file" in error_of(capsys, ["finetune", *TINY, "--train-file", str(tmp_path),
                                                                 "--text-columns", "t", "--label-column", "l",
                                                                 "--out", str(tmp_path / "o")])
    train = write_rows(tmp_path / "train.csv", labelled(count=40))
    err = error_of(capsys, ["finetune", *TINY, "--train-file", train, "--text-columns", "text", "--label-column",
                            "label", "--out", str(tmp_path / "o"), "--warmup-steps", "1000"])
    assert "--warmup-steps 1000: more than the run's 5 steps" in err
    assert "--warmup-steps 60: more than the run's 50 steps" in error_of(
        capsys, ["pretrain", "--corpus", str(tmp_path), "--out", str(tmp_path / "p"), "--warmup-steps", "60"])
