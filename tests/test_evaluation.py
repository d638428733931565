"""Evaluation figures checked by hand on a tiny case; the report, evaluation.json and the PNGs."""
import json

import numpy as np
import pytest

from nlibert.core.evaluation import evaluate, plot_confusion_matrix, write_evaluation
from nlibert.core.plot import plot_training
from nlibert.core.training import EpochRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ("World", "Sports", "Sci/Tech")
# Six examples, three classes:   true  0  0  1  1  2  2
#                           predicted  0  1  1  1  0  2
LABELS, PREDICTIONS = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2]


def test_figures_by_hand():
    ev = evaluate(LABELS, PREDICTIONS, NAMES)
    # Rows true, columns predicted: true 0 -> predicted 0 once and 1 once; true 1 -> 1 twice;
    # true 2 -> 0 once and 2 once.
    assert ev.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert ev.accuracy == pytest.approx(4 / 6)  # the diagonal, 1 + 2 + 1
    # Precision = diagonal / column sums (predicted 2, 3, 1 times): 1/2, 2/3, 1/1.
    np.testing.assert_allclose(ev.precision, [1 / 2, 2 / 3, 1])
    # Recall = diagonal / row sums (2 of each class): 1/2, 2/2, 1/2.
    np.testing.assert_allclose(ev.recall, [1 / 2, 1, 1 / 2])
    # F1 = 2PR / (P + R): 2(.5)(.5)/1 = .5; 2(2/3)(1)/(5/3) = .8; 2(1)(.5)/1.5 = 2/3.
    np.testing.assert_allclose(ev.f1, [0.5, 0.8, 2 / 3])
    assert ev.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # 0.6556
    assert ev.support.tolist() == [2, 2, 2] and ev.num_examples == 6


def test_undefined_figures_are_zero_and_count_in_macro_f1():
    # A fourth class that is never true and never predicted: precision 0/0, recall 0/0 -> 0, F1 0.
    ev = evaluate(LABELS, PREDICTIONS, NAMES + ("Business",))
    assert (ev.precision[3], ev.recall[3], ev.f1[3]) == (0.0, 0.0, 0.0)
    assert ev.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 4)
    # A class predicted but always wrong: precision 0/1 = 0, recall 0/1 = 0, F1 (0 + 0 denominator) 0.
    ev = evaluate([0, 1], [1, 0], ("a", "b"))
    assert ev.f1.tolist() == [0.0, 0.0] and ev.accuracy == 0.0


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="same length"):
        evaluate([0, 1], [0], NAMES)
    with pytest.raises(ValueError, match="no test examples"):
        evaluate([], [], NAMES)
    with pytest.raises(ValueError, match="predictions must be indices 0..2 of the 3 label names, found 3"):
        evaluate([0], [3], NAMES)
    with pytest.raises(ValueError, match="labels must be indices.*found -1"):
        evaluate([-1], [0], NAMES)


def test_table_lists_every_class_and_the_matrix():
    table = evaluate(LABELS, PREDICTIONS, NAMES).table()
    assert table.splitlines()[:4] == ["class     precision  recall     f1  support",
                                      "World         0.500   0.500  0.500        2",
                                      "Sports        0.667   1.000  0.800        2",
                                      "Sci/Tech      1.000   0.500  0.667        2"]
    assert "accuracy 0.667 (4 of 6), macro-F1 0.656" in table
    assert table.splitlines()[-5:] == ["confusion matrix (rows: true label, columns: predicted label)",
                                       "             World    Sports  Sci/Tech",
                                       "World            1         1         0",
                                       "Sports           0         2         0",
                                       "Sci/Tech         1         0         1"]


def test_evaluation_json(tmp_path):
    ev = evaluate(LABELS, PREDICTIONS, NAMES)
    write_evaluation(ev, tmp_path / "evaluation.json")
    written = json.loads((tmp_path / "evaluation.json").read_text())
    assert written["accuracy"] == pytest.approx(4 / 6) and written["macro_f1"] == pytest.approx(ev.macro_f1)
    assert written["per_class"]["Sports"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": 0.8,
                                              "support": 2}
    assert written["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert written["label_names"] == list(NAMES) and written["num_examples"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.json"]  # no temp file left


def test_confusion_matrix_png(tmp_path):
    plot_confusion_matrix(evaluate(LABELS, PREDICTIONS, NAMES), tmp_path / "confusion_matrix.png")
    data = (tmp_path / "confusion_matrix.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png"]


@pytest.mark.parametrize("num_epochs", [1, 3])
def test_training_plot_png(tmp_path, num_epochs):
    records = [EpochRecord(epoch=e, loss=1.2 / e, train_acc=0.5 + 0.1 * e, test_acc=0.45 + 0.1 * e,
                           examples_per_sec=100.0) for e in range(1, num_epochs + 1)]
    plot_training(records, tmp_path / "training.png", num_epochs=5)
    assert (tmp_path / "training.png").read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="no finished epochs"):
        plot_training([], tmp_path / "empty.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training.png"]
