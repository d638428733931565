"""The user's own files: CSV, TSV and JSON Lines, by header name or index, and every fault named."""
import json

import pytest

from nlibert.core.tables import (Columns, DataFileError, FileTexts, encode_labels, file_format, read_table,
                                 read_texts)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_columns_parse_names_indices_and_refuses_the_rest():
    assert Columns.parse("text", "label") == Columns(("text",), "label")
    assert Columns.parse(" premise , hypothesis ", "gold") == Columns(("premise", "hypothesis"), "gold")
    assert Columns.parse("1,2", "0", no_header=True) == Columns((1, 2), 0, no_header=True)
    assert Columns.parse("text", None) == Columns(("text",), None)
    for bad in ("", "a,", "a,b,c"):
        with pytest.raises(ValueError, match="--text-columns"):
            Columns.parse(bad, "label")
    with pytest.raises(ValueError, match="0-based indices.*'title'"):
        Columns.parse("title", "0", no_header=True)
    with pytest.raises(ValueError, match="--label-column is empty"):
        Columns.parse("text", " ")


def test_format_by_extension():
    assert [file_format(f"x.{e}") for e in ("csv", "TSV", "jsonl", "json")] == ["csv", "tsv", "jsonl", "jsonl"]
    with pytest.raises(DataFileError, match=r"x\.txt.*'\.txt'.*\.csv, \.tsv, \.jsonl or \.json"):
        file_format("x.txt")


def test_csv_with_header_quoting_and_a_field_over_two_lines(tmp_path):
    path = write(tmp_path / "train.csv", 'id,text,label\n'
                 '1,"Hello, world",pos\n'
                 '\n'  # a blank line is skipped
                 '2,"She said ""hi""",neg\n'
                 '3,"two\nlines", pos \n'
                 '4,plain,neg\n')
    data = read_texts(path, Columns.parse("text", "label"))
    assert data.texts == (["Hello, world", 'She said "hi"', "two\nlines", "plain"],)
    assert data.labels == ["pos", "neg", "pos", "neg"]  # labels stripped, texts kept as written
    assert data.lines == [2, 4, 5, 7]  # the line each row starts on


def test_csv_without_header_by_index_and_a_pair(tmp_path):
    path = write(tmp_path / "pairs.csv", 'entailment,a man sleeps,a person rests\n'
                                         'neutral,"a dog, running",an animal\n')
    data = read_texts(path, Columns.parse("1,2", "0", no_header=True))
    assert data.texts == (["a man sleeps", "a dog, running"], ["a person rests", "an animal"])
    assert data.labels == ["entailment", "neutral"] and data.lines == [1, 2]


def test_tsv_has_no_quoting(tmp_path):
    path = write(tmp_path / "train.tsv", 'sentence\tlabel\n"quoted" words\t1\nit\'s, fine\t0\n')
    data = read_texts(path, Columns.parse("sentence", "label"))
    assert data.texts == (['"quoted" words', "it's, fine"],) and data.labels == ["1", "0"]


def test_json_lines_by_key(tmp_path):
    rows = [{"premise": "a", "hypothesis": "b", "label": "x"}, {"premise": "c", "hypothesis": "d", "label": 3}]
    path = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = read_texts(path, Columns.parse("premise,hypothesis", "label"))
    assert data.texts == (["a", "c"], ["b", "d"]) and data.labels == ["x", "3"] and data.lines == [1, 2]
    table = read_table(path)
    assert table.format == "jsonl" and table.header is None and table.rows == rows


def test_unlabelled_file_reads_texts_only(tmp_path):
    path = write(tmp_path / "new.csv", "text\nfirst\nsecond\n")
    data = read_texts(path, Columns.parse("text", None))
    assert data.texts == (["first", "second"],) and data.labels is None


def message(path, columns, no_header=False):
    with pytest.raises(DataFileError) as info:
        read_texts(path, Columns.parse(columns[0], columns[1], no_header))
    return str(info.value)


def test_missing_column_names_the_header_and_the_way_out(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\nhi,1\n")
    m = message(path, ("txt", "label"))
    assert f"{path}, line 1: column 'txt' is not in the header (text, label)" in m and "--no-header" in m
    path = write(tmp_path / "dup.csv", "text,text,label\nhi,ho,1\n")
    assert "column 'text' appears more than once" in message(path, ("text", "label"))
    path = write(tmp_path / "nohead.csv", "1,hi\n0,ho\n")
    assert f"{path}, line 1: no column 2: the rows have 2 columns, numbered 0 to 1" in message(
        path, ("2", "0"), no_header=True)
    path = write(tmp_path / "x.jsonl", '{"text": "a", "label": "p"}\n{"txt": "b", "label": "q"}\n')
    assert f"{path}, line 2: no key 'text' in this row (it has: txt, label)" in message(path, ("text", "label"))


def test_empty_text_and_label_name_file_line_and_column(tmp_path):
    path = write(tmp_path / "train.csv", 'text,label\nok,1\n"  ",0\n')
    assert message(path, ("text", "label")) == (f"{path}, line 3, column 'text': empty text; "
                                                "fill it in or remove the row")
    path = write(tmp_path / "train.tsv", "a\t1\nb\t\n")
    assert f"{path}, line 2, column 1: empty label" in message(path, ("0", "1"), no_header=True)


def test_bad_rows_are_errors(tmp_path):
    path = write(tmp_path / "train.csv", "text,label\nok,1\nan, unquoted comma,0\n")
    assert f"{path}, line 3: 3 fields where the header has 2; a comma inside a text must be quoted" in message(
        path, ("text", "label"))
    path = write(tmp_path / "train.tsv", "a\t1\nb\t0\textra\n")
    assert f"{path}, line 2: 3 fields where the first row (line 1) has 2; a tab" in message(
        path, ("0", "1"), no_header=True)
    path = write(tmp_path / "quotes.csv", 'text,label\nok,1\n"closed" then more,0\n')
    assert f"{path}, line 3: not valid CSV" in message(path, ("text", "label"))
    path = write(tmp_path / "x.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 2}\n')
    assert f"{path}, line 2: not valid JSON" in message(path, ("text", "label"))
    path = write(tmp_path / "x.jsonl", '["a", 1]\n')
    assert f"{path}, line 1: expected a JSON object" in message(path, ("text", "label"))
    path = write(tmp_path / "x.jsonl", '{"text": 5, "label": 1}\n')
    assert f"{path}, line 1, column 'text': expected a string, found 5" in message(path, ("text", "label"))
    path = write(tmp_path / "x.jsonl", '{"text": "a", "label": true}\n')
    assert "column 'label': expected a string or an integer, found true" in message(path, ("text", "label"))


def test_files_that_cannot_be_read_as_asked(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nok,1\ncaf\u00e9,0\n".encode("latin-1"))
    assert f"{path}, line 3: not UTF-8 text" in message(path, ("text", "label"))
    path = write(tmp_path / "empty.csv", "text,label\n")
    assert f"{path}: no rows below the header" in message(path, ("text", "label"))
    with pytest.raises(DataFileError, match="leave out --no-header"):
        read_table(write(tmp_path / "x.jsonl", '{"a": 1}\n'), no_header=True)
    with pytest.raises(FileNotFoundError, match="data file not found: .*absent.csv"):
        read_table(tmp_path / "absent.csv")


def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nhi,1\n".encode("utf-8"))
    assert read_table(path).header == ["text", "label"]


def test_encode_labels_names_an_unseen_label():
    data = FileTexts("test.csv", (["a", "b", "c"],), ["neg", "pos", "meh"], "label", [2, 3, 4])
    with pytest.raises(DataFileError) as info:
        encode_labels(data, ("neg", "pos"))
    assert str(info.value) == ("test.csv, line 4, column 'label': label 'meh' is not among the training "
                               "labels (neg, pos); fix the label or remove the row")
    assert encode_labels(FileTexts("t.csv", (["a", "b"],), ["pos", "neg"], "label", [2, 3]),
                         ("neg", "pos")) == [1, 0]
