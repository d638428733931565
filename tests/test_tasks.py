"""Tasks: AG News in its original layout, the user's own files, the seeded 90/10 split."""
import collections
import json

import pytest

from nlibert.core.snli import split_dataset
from nlibert.core.tables import Columns, DataFileError
from nlibert.core.tasks import (AG_NEWS_INDICES, ag_news_label_names, ag_news_task, file_task,
                                read_ag_news_file, undo_ag_news_escapes)

# Rows as AG News writes them: every field quoted, inner quotes doubled, a line break as a backslash.
AG_ROWS = ('"3","Stocks \\$5 higher","Shares rose\\on Monday.\\\\""We are glad,"" he said."\n'
           '"1","World news","Talks resume (Reuters)"\n'
           '"4","Title only",""\n'
           '"2","Sports","Match\nreport"\n')


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_undo_ag_news_escapes():
    assert undo_ag_news_escapes("gave\\no indication") == "gave\nno indication"  # not a "\n" escape
    assert undo_ag_news_escapes("over \\$1 billion, A\\$378m") == "over $1 billion, A$378m"
    assert undo_ag_news_escapes('Netscape?\\\\To draw') == "Netscape?\n\nTo draw"
    assert undo_ag_news_escapes("plain #39;text") == "plain #39;text"  # HTML residue is left as it is


def test_read_ag_news_file_joins_title_and_description(tmp_path):
    path = write(tmp_path / "test.csv", AG_ROWS)
    texts, labels = read_ag_news_file(path, AG_NEWS_INDICES)
    assert texts == ['Stocks $5 higher Shares rose\non Monday.\n\n"We are glad," he said.',
                     "World news Talks resume (Reuters)", "Title only ", "Sports Match\nreport"]
    assert labels == [2, 0, 3, 1]


def test_label_names_from_classes_txt_else_indices(tmp_path):
    assert ag_news_label_names(tmp_path) == ("1", "2", "3", "4")
    write(tmp_path / "classes.txt", "World\nSports\nBusiness\nSci/Tech\n")
    assert ag_news_label_names(tmp_path) == ("World", "Sports", "Business", "Sci/Tech")
    write(tmp_path / "classes.txt", "World\nWorld\n")
    with pytest.raises(DataFileError, match="classes.txt: expected one distinct class name per line"):
        ag_news_label_names(tmp_path)


@pytest.mark.parametrize("row,problem", [
    ('"5","t","d"\n', "line 2, column 0: class index '5' is not one of 1..4 (1, 2, 3, 4)"),
    ('"x","t","d"\n', "line 2, column 0: class index 'x' is not one of 1..4"),
    ('"1","",""\n', "line 2: empty title and description; remove the row"),
    ('"1","t"\n', "line 2: 2 fields where the first row (line 1) has 3"),
])
def test_bad_ag_news_rows_name_file_and_line(tmp_path, row, problem):
    path = write(tmp_path / "train.csv", '"1","t","d"\n' + row)
    with pytest.raises(DataFileError) as info:
        read_ag_news_file(path, AG_NEWS_INDICES)
    assert f"{path}, {problem}" in str(info.value)


def test_an_ag_news_file_needs_three_fields(tmp_path):
    with pytest.raises(DataFileError, match='3 .*"class index","title","description"'):
        read_ag_news_file(write(tmp_path / "train.csv", "text,label\nhi,1\n"), AG_NEWS_INDICES)


def test_ag_news_folder_with_train_and_test(tmp_path):
    folder = tmp_path / "ag_news_csv"
    folder.mkdir()
    write(folder / "train.csv", AG_ROWS)
    write(folder / "test.csv", '"2","Goal","A late goal"\n')
    write(folder / "classes.txt", "World\nSports\nBusiness\nSci/Tech\n")
    task = ag_news_task(tmp_path, seed=0)  # the parent of ag_news_csv/ works too
    assert task.name == "ag_news" and task.label_names == ("World", "Sports", "Business", "Sci/Tech")
    assert task.train[1] == [2, 0, 3, 1] and task.test == (["Goal A late goal"], [1])
    assert not task.paired and task.to_dict() == {"name": "ag_news", "paired": False,
                                                  "label_names": ["World", "Sports", "Business", "Sci/Tech"]}


def test_ag_news_dev_file_alone_is_split_90_10_with_the_seed(tmp_path):
    rows = "".join(f'"{i % 4 + 1}","title {i}","text {i}"\n' for i in range(50))
    write(tmp_path / "dev.csv", rows)
    task = ag_news_task(tmp_path, seed=3)
    assert (len(task.train[0]), len(task.test[0])) == (45, 5) and "dev.csv split 90/10, seed 3" in task.description
    # The same seeded permutation as SNLI's dev file (core.snli.split_dataset), and deterministic.
    expected = split_dataset(read_ag_news_file(tmp_path / "dev.csv", AG_NEWS_INDICES), 0.9, 3)
    assert (task.train, task.test) == expected
    assert ag_news_task(tmp_path, seed=3) == task and ag_news_task(tmp_path, seed=4).test != task.test
    assert sorted(task.train[0] + task.test[0]) == sorted(f"title {i} text {i}" for i in range(50))


def test_ag_news_folder_without_its_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected AG News's train.csv and test.csv, or dev.csv"):
        ag_news_task(tmp_path, seed=0)


def test_ag_news_shared_dev_file(ag_news_folder):
    texts, labels = read_ag_news_file(ag_news_folder / "dev.csv", ag_news_label_names(ag_news_folder))
    assert len(texts) == 3800 and collections.Counter(labels) == {0: 950, 1: 950, 2: 950, 3: 950}
    task = ag_news_task(ag_news_folder, seed=0)
    assert task.label_names == ("World", "Sports", "Business", "Sci/Tech")
    assert (len(task.train[0]), len(task.test[0])) == (3420, 380)
    assert not any("\\" in t for t in texts)  # every escape undone


def test_file_task_labels_are_the_training_files_sorted(tmp_path):
    write(tmp_path / "train.csv", "text,label\ngreat,pos\nawful,neg\nfine,meh\nsuperb,pos\n")
    write(tmp_path / "test.csv", "text,label\nbad,neg\ngood,pos\n")
    task = file_task(tmp_path / "train.csv", tmp_path / "test.csv", Columns.parse("text", "label"), seed=0)
    assert task.name == "files" and task.label_names == ("meh", "neg", "pos")
    assert task.train == (["great", "awful", "fine", "superb"], [2, 1, 0, 2])
    assert task.test == (["bad", "good"], [1, 2]) and not task.paired


def test_file_task_pairs_from_json_lines_split_with_the_seed(tmp_path):
    rows = [{"a": f"premise {i}", "b": f"hypothesis {i}", "y": "yes" if i % 2 else "no"} for i in range(20)]
    path = write(tmp_path / "all.jsonl", "\n".join(json.dumps(row) for row in rows))
    task = file_task(path, None, Columns.parse("a,b", "y"), seed=1)
    assert task.paired and task.label_names == ("no", "yes")
    assert [len(part[0]) for part in (task.train, task.test)] == [18, 2]
    assert task == file_task(path, None, Columns.parse("a,b", "y"), seed=1)
    assert (task.train, task.test) == split_dataset(
        ([f"premise {i}" for i in range(20)], [f"hypothesis {i}" for i in range(20)],
         [i % 2 for i in range(20)]), 0.9, 1)


def test_file_task_errors(tmp_path):
    write(tmp_path / "train.csv", "text,label\ngreat,pos\nawful,neg\n")
    write(tmp_path / "test.csv", "text,label\nbad,neg\nodd,surprise\n")
    columns = Columns.parse("text", "label")
    with pytest.raises(DataFileError) as info:
        file_task(tmp_path / "train.csv", tmp_path / "test.csv", columns, seed=0)
    assert str(info.value).startswith(f"{tmp_path / 'test.csv'}, line 3, column 'label': label 'surprise' is "
                                      "not among the training labels (neg, pos)")
    with pytest.raises(ValueError, match="--label-column"):
        file_task(tmp_path / "train.csv", None, Columns.parse("text", None), seed=0)
    write(tmp_path / "one.csv", "text,label\na,pos\nb,pos\n")
    with pytest.raises(DataFileError, match="every row has the label 'pos'"):
        file_task(tmp_path / "one.csv", None, columns, seed=0)

