"""`nlibert predict` (a text, a pair, a whole file) and `nlibert evaluate` with fine-tuned model
folders of a single-text task and of SNLI pairs; their errors."""
import csv
import json

import numpy as np
import pytest
from topic_data import topic_rows, write_csv

from nlibert import cli, inference
from nlibert.core.evaluation import evaluate
from nlibert.core.sample import write_sample_snli
from nlibert.core.inference_settings import EvaluateSettings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LABELS = ["money", "science", "sport"]


@pytest.fixture(scope="module")
def topics_run(tmp_path_factory):
    """A tiny single-text model fine-tuned on a topic file split 90/10 (torch, 2 epochs): its OUT."""
    folder = tmp_path_factory.mktemp("topics")
    train = write_csv(folder / "topics.csv", topic_rows(200, seed=0))
    out = folder / "out"
    assert cli.main(["finetune", "--pretrained", "random", "--train-file", train, "--text-columns", "text",
                     "--label-column", "topic", "--epochs", "2", "--batch-size", "32", "--lr", "5e-4",
                     "--max-len", "16", "--device", "cpu", "--out", str(out), "--cache-dir", str(folder / "c")]) == 0
    return out


@pytest.fixture(scope="module")
def snli_run(tmp_path_factory):
    """A tiny SNLI model (pairs) fine-tuned on the embedded sample: its OUT."""
    out = tmp_path_factory.mktemp("snli") / "out"
    assert cli.main(["finetune", "--pretrained", "random", "--train-limit", "64", "--test-limit", "32",
                     "--epochs", "1", "--batch-size", "32", "--max-len", "24", "--device", "cpu",
                     "--out", str(out)]) == 0
    return out


def _read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _check_predictions(rows_in: list[dict], rows_out: list[dict]) -> np.ndarray:
    """The output keeps every input row and column as it was, and adds a label that is the argmax
    of probabilities that sum to 1; returns the probabilities."""
    assert len(rows_out) == len(rows_in)
    probs = np.array([[float(row[f"prob_{label}"]) for label in LABELS] for row in rows_out])
    for row_in, row_out, p in zip(rows_in, rows_out, probs):
        assert {k: row_out[k] for k in row_in} == row_in
        assert row_out["predicted_label"] == LABELS[int(np.argmax(p))]
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    return probs


def test_predict_file_round_trip_csv_in_csv_and_json_lines_out(topics_run, tmp_path, capsys):
    rows = topic_rows(40, seed=7)
    data = write_csv(tmp_path / "new.csv", rows)
    model = str(topics_run / "model")
    # No --text-columns: the model was fine-tuned on this layout and records its columns.
    assert cli.main(["predict", "--model", model, "--file", data, "--output", str(tmp_path / "p.csv")]) == 0
    printed = capsys.readouterr().out
    assert f"labelled 40 rows of {data} in " in printed and " rows/sec on " in printed
    from_csv = _check_predictions(rows, _read_csv(tmp_path / "p.csv"))
    assert cli.main(["predict", "--model", model, "--file", data, "--output", str(tmp_path / "p.jsonl"),
                     "--batch-size", "7"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(_check_predictions(rows, lines), from_csv, atol=1e-6)  # any batch size
    one = inference.run_predict(model, rows[3]["text"])
    np.testing.assert_allclose(list(one["probabilities"].values()), from_csv[3], atol=1e-6)


def test_predict_file_reads_json_lines_and_headerless_tsv(topics_run, tmp_path):
    rows = topic_rows(12, seed=8)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    model = str(topics_run / "model")
    assert cli.main(["predict", "--model", model, "--file", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "out.csv")]) == 0
    from_jsonl = _check_predictions(rows, _read_csv(tmp_path / "out.csv"))
    (tmp_path / "in.tsv").write_text("".join(f"{r['id']}\t{r['text']}\n" for r in rows))
    assert cli.main(["predict", "--model", model, "--file", str(tmp_path / "in.tsv"), "--no-header",
                     "--text-columns", "1", "--output", str(tmp_path / "out.tsv")]) == 0
    header, *lines = (tmp_path / "out.tsv").read_text().splitlines()
    assert header.split("\t") == ["0", "1", "predicted_label"] + [f"prob_{label}" for label in LABELS]
    assert [line.split("\t")[:2] for line in lines] == [[r["id"], r["text"]] for r in rows]
    np.testing.assert_allclose([[float(v) for v in line.split("\t")[3:]] for line in lines], from_jsonl, atol=1e-6)


def test_evaluate_reports_what_core_evaluation_computes_from_the_predictions(topics_run, tmp_path, capsys):
    rows = topic_rows(45, seed=9)
    data = write_csv(tmp_path / "test.csv", rows)
    model = str(topics_run / "model")
    assert cli.main(["predict", "--model", model, "--file", data, "--output", str(tmp_path / "p.csv")]) == 0
    predicted = [LABELS.index(row["predicted_label"]) for row in _read_csv(tmp_path / "p.csv")]
    expected = evaluate([LABELS.index(row["topic"]) for row in rows], predicted, LABELS)

    assert cli.main(["evaluate", "--model", model, "--test-file", data, "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    assert expected.table() in printed
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert {k: report[k] for k in expected.to_dict()} == expected.to_dict() and report["data"] == data
    assert (tmp_path / "ev" / "confusion.png").read_bytes()[:8] == PNG_SIGNATURE


def test_evaluate_by_default_measures_the_runs_own_test_split_into_its_out(topics_run, capsys):
    metrics = json.loads((topics_run / "metrics.json").read_text())
    assert cli.main(["evaluate", "--model", str(topics_run / "model")]) == 0
    assert "(split 90/10, seed 0)" in capsys.readouterr().out
    report = json.loads((topics_run / "evaluation.json").read_text())
    assert report["num_examples"] == metrics["num_test"] == 20
    assert abs(report["accuracy"] - metrics["test_acc"]) <= 1 / 20  # the same examples; a near tie may flip
    assert (topics_run / "confusion.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (topics_run / "training.png").read_bytes()[:8] == PNG_SIGNATURE


def test_an_snli_model_predicts_pairs_from_a_file_and_evaluates_on_its_task(snli_run, tmp_path, capsys):
    model = str(snli_run / "model")
    (tmp_path / "pairs.jsonl").write_text('{"premise": "a man sleeps", "hypothesis": "a man is awake"}\n'
                                          '{"premise": "a dog runs", "hypothesis": "an animal moves"}\n')
    assert cli.main(["predict", "--model", model, "--file", str(tmp_path / "pairs.jsonl"), "--text-columns",
                     "premise,hypothesis", "--output", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["premise"] for row in out] == ["a man sleeps", "a dog runs"]
    assert all(row["predicted_label"] in ("entailment", "contradiction", "neutral") for row in out)
    assert cli.main(["evaluate", "--model", model, "--out", str(tmp_path / "ev")]) == 0
    assert "embedded NLI sample" in capsys.readouterr().out
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["label_names"] == [
        "entailment", "contradiction", "neutral"]
    folder = write_sample_snli(tmp_path / "snli", num_train=10, num_test=30, seed=4)
    assert cli.main(["evaluate", "--model", model, "--data", str(folder), "--out", str(tmp_path / "ev")]) == 0
    assert f"SNLI-format folder {folder}" in capsys.readouterr().out
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["num_examples"] == 30


@pytest.mark.parametrize("which, args, named", [
    ("topics", ["a", "b"], "labels single texts: TEXT TEXT_B gives 2 texts per example where it needs 1"),
    ("snli", ["a man sleeps"], "labels pairs of texts: TEXT alone gives 1 text per example where it needs 2"),
    ("snli", ["--file", "x.csv"], "--file needs --output"),
    ("snli", ["--file", "x.csv", "--output", "p.txt"], "--output p.txt: name it .csv"),
    ("snli", ["--output", "p.csv", "a", "b"], "--output: only with --file"),
    ("snli", ["--file", "x.csv", "--output", "p.csv", "a"], "--file labels a whole file"),
    ("snli", [], "give TEXT (and TEXT_B"),
])
def test_predict_errors_name_what_to_change(topics_run, snli_run, tmp_path, capsys, which, args, named):
    model = str((topics_run if which == "topics" else snli_run) / "model")
    assert cli.main(["predict", "--model", model, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nlibert: error: ") and named in err


def test_predict_file_errors_name_the_option_or_column(topics_run, snli_run, tmp_path, capsys):
    data = write_csv(tmp_path / "new.csv", topic_rows(3, seed=1))
    assert cli.main(["predict", "--model", str(snli_run / "model"), "--file", data, "--output", "o.csv"]) == 2
    assert "--text-columns: name the columns of" in capsys.readouterr().err  # SNLI models record no columns
    assert cli.main(["predict", "--model", str(topics_run / "model"), "--file", data, "--text-columns", "body",
                     "--output", str(tmp_path / "o.csv")]) == 2
    assert "column 'body' is not in the header" in capsys.readouterr().err
    assert cli.main(["predict", "--model", str(topics_run / "model"), "--file", data, "--text-columns", "id,text",
                     "--output", str(tmp_path / "o.csv")]) == 2
    assert "--text-columns id,text gives 2 texts" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_evaluate_errors_name_the_option(topics_run, capsys):
    model = str(topics_run / "model")
    assert cli.main(["evaluate", "--model", model, "--label-column", "topic"]) == 2
    assert "--label-column: only with --test-file" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", model, "--data", "d", "--test-file", "t.csv"]) == 2
    assert "--data and --test-file" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", model, "--data", "somewhere"]) == 2
    assert "give --test-file FILE" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--batch-size must be a positive integer"):
        EvaluateSettings(model, batch_size=0)
