"""The SNLI reader on the real dev file and on small files written here."""
import collections

import pytest

from nlibert.core.snli import (LABEL_NAMES, LABELS, SNLIFormatError, extract_text, read_snli,
                               read_snli_file, read_snli_split, split_dataset)

HEADER = ("gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
          "sentence1\tsentence2\tcaptionID\tpairID\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\n")


def row(label, premise, hypothesis):
    return "\t".join([label, premise, hypothesis, "(ROOT)", "(ROOT)", "s1", "s2", "c", "p",
                      label, "", "", "", ""]) + "\n"


def test_labels():
    assert LABELS == {"entailment": 0, "contradiction": 1, "neutral": 2}
    assert [LABELS[name] for name in LABEL_NAMES] == [0, 1, 2]


def test_extract_text():
    assert extract_text("( ( Two women ) ( ( are ( embracing ) ) . ) )") == "Two women are embracing ."
    assert extract_text("  (a)\t\t(b)  c ") == "a b c"
    assert extract_text("a\tb") == "a\tb"  # a single whitespace character is kept as it is


def test_dev_file_counts(shared_data):
    premises, hypotheses, labels = read_snli_split(shared_data / "snli_1.0", "dev")
    assert len(premises) == len(hypotheses) == len(labels) == 9842
    counts = collections.Counter(LABEL_NAMES[y] for y in labels)
    assert counts == {"entailment": 3329, "neutral": 3235, "contradiction": 3278}
    assert premises[0] == "Two women are embracing while holding to go packages ."
    assert hypotheses[0] == ("The sisters are hugging goodbye while holding to go packages "
                             "after just eating lunch .")
    assert labels[:3] == [LABELS["neutral"], LABELS["entailment"], LABELS["contradiction"]]


def test_read_snli_book_file_names(tmp_path, capsys):
    (tmp_path / "snli_1.0_train.txt").write_text(HEADER + row("entailment", "( a b )", "a") + row("-", "x", "y"))
    (tmp_path / "snli_1.0_test.txt").write_text(HEADER + row("neutral", "c", "( d ( e f ) )"))
    assert read_snli(tmp_path, True) == (["a b"], ["a"], [0])
    assert read_snli(tmp_path, False) == (["c"], ["d e f"], [2])
    assert capsys.readouterr().out == ""  # quiet unless asked
    read_snli(tmp_path, True, verbose=True)
    assert capsys.readouterr().out == "read 1 examples from snli_1.0_train.txt (skipped 1 rows without a gold label '-')\n"
    with pytest.raises(ValueError, match="validation"):
        read_snli_split(tmp_path, "validation")


def test_malformed_row_names_file_and_line(tmp_path):
    path = tmp_path / "snli_1.0_dev.txt"
    path.write_text(HEADER + row("entailment", "a", "b") + "\n" + "contradiction\tonly two\n")
    with pytest.raises(SNLIFormatError) as info:
        read_snli_file(path)
    assert str(path) in str(info.value) and "line 4" in str(info.value)


def test_missing_header_is_reported(tmp_path):
    path = tmp_path / "snli_1.0_dev.txt"
    path.write_text(row("entailment", "a", "b"))
    with pytest.raises(SNLIFormatError, match="line 1"):
        read_snli_file(path)


def test_missing_file_names_path_and_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        read_snli(tmp_path, True)
    message = str(info.value)
    assert str(tmp_path / "snli_1.0_train.txt") in message and "snli_1.0_test.txt" in message


def test_split_dataset_is_a_seeded_partition():
    data = ([f"p{i}" for i in range(101)], [f"h{i}" for i in range(101)], [i % 3 for i in range(101)])
    first, second = split_dataset(data, 0.9, seed=3)
    assert len(first[0]) == 91 and len(second[0]) == 10
    assert sorted(first[0] + second[0]) == sorted(data[0])  # a partition, nothing lost or repeated
    for p, h, y in zip(*first):  # columns stay aligned
        i = int(p[1:])
        assert h == f"h{i}" and y == i % 3
    assert split_dataset(data, 0.9, seed=3) == (first, second)
    assert split_dataset(data, 0.9, seed=4)[0] != first
    assert [len(part[0]) for part in split_dataset(data, 0.0, seed=0)] == [0, 101]
    with pytest.raises(ValueError):
        split_dataset(data, 1.5, seed=0)
