"""The templated NLI sample: SNLI's layout, balanced labels, deterministic, readable, not trivial."""
import collections
import os
import subprocess
import sys

import numpy as np
import pytest

from nlibert.core.sample import HEADER, write_sample_snli
from nlibert.core.snli import LABEL_NAMES, read_snli, read_snli_file


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_snli(tmp_path_factory.mktemp("sample"), num_train=900, num_test=301, seed=0)


def lines(folder, split):
    with open(f"{folder}/snli_1.0_{split}.txt", encoding="utf-8") as f:
        return f.read().split("\n")


def test_layout_is_snlis(sample, shared_data):
    real_header = open(shared_data / "snli_1.0" / "snli_1.0_dev.txt", encoding="utf-8").readline()
    for split in ("train", "test"):
        header, *rows, last = lines(sample, split)
        assert header + "\n" == real_header and header.split("\t") == list(HEADER)
        assert last == ""  # every line ends in '\n'
        for r in rows:
            fields = r.split("\t")
            assert len(fields) == 14
            gold, parse1, parse2, _, _, sentence1, sentence2, caption, pair = fields[:9]
            assert gold in LABEL_NAMES + ["-"]
            assert parse1.startswith("( ") and parse1.count("(") == parse1.count(")")
            assert sentence1.endswith(".") and sentence1[0].isupper()
            assert pair.startswith(caption)
            votes = [v for v in fields[9:] if v]
            if gold != "-":
                assert collections.Counter(votes)[gold] >= (1 if split == "train" else 3)
            else:
                assert max(collections.Counter(votes).values()) < 3
        assert len({r.split("\t")[8] for r in rows}) == len(rows)  # pair ids are unique


def test_read_back_balanced_with_dropped_rows(sample):
    for is_train, n in ((True, 900), (False, 301)):
        premises, hypotheses, labels = read_snli(sample, is_train)
        assert len(labels) == n
        counts = collections.Counter(labels)
        assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 3
        # The binary parse reads back as the plain sentence, '.' as its own token.
        assert premises[0].endswith(" .") and "(" not in premises[0]
    split = "train"
    assert sum(r.startswith("-\t") for r in lines(sample, split)) >= 1


def test_deterministic_for_a_seed(sample, tmp_path):
    again = write_sample_snli(tmp_path / "again", num_train=900, num_test=301, seed=0)
    other = write_sample_snli(tmp_path / "other", num_train=900, num_test=301, seed=1)
    for split in ("train", "test"):
        assert lines(again, split) == lines(sample, split)
        assert lines(other, split) != lines(sample, split)
    # Writing again over existing files works (atomic replace).
    assert write_sample_snli(tmp_path / "again", num_train=900, num_test=301, seed=0) == again
    assert lines(again, "train") == lines(sample, "train")


def test_test_premises_are_not_train_premises(sample):
    train = set(read_snli(sample, True)[0])
    test = set(read_snli(sample, False)[0])
    assert not train & test


def test_hypothesis_length_does_not_give_the_label_away(sample):
    premises, hypotheses, labels = read_snli(sample, True)
    by_length = collections.defaultdict(collections.Counter)
    for h, y in zip(hypotheses, labels):
        by_length[len(h.split())][y] += 1
    # Best possible accuracy from the hypothesis length alone (chance is 1/3).
    accuracy = sum(max(c.values()) for c in by_length.values()) / len(labels)
    assert accuracy < 0.45
    means = [np.mean([len(h.split()) for h, y in zip(hypotheses, labels) if y == k]) for k in range(3)]
    assert max(means) - min(means) < 1.5


def test_relations_follow_the_templates(sample):
    """Entailed hypotheses reuse premise words; contradictions and neutrals bring in new ones."""
    premises, hypotheses, labels = read_snli(sample, True)
    generalizations = {"person", "people", "animal", "animals", "child", "children", "dog", "dogs", "cat",
                       "cats", "some", "inside", "indoors", "outside", "outdoors", "building", "in", "the", "open", "air",
                       "during", "day", "at", "night", "with", "someone", "something", "food", "a", "an",
                       "drink", "meal", "instrument", "song", "sleeping", "running", "walking"}
    for p, h, y in zip(premises, hypotheses, labels):
        new = set(h.lower().split()) - set(p.lower().split())
        if LABEL_NAMES[y] == "entailment":
            assert new <= generalizations, (p, h)
        else:
            assert new, (p, h)


def test_empty_sample_is_just_headers(tmp_path):
    write_sample_snli(tmp_path, num_train=0, num_test=0)
    assert read_snli_file(tmp_path / "snli_1.0_train.txt") == ([], [], [])


def test_same_bytes_across_processes(tmp_path):
    """No dependence on the per-process string hash (set iteration order)."""
    for hash_seed in ("1", "2"):
        code = ("from nlibert.core.sample import write_sample_snli; "
                f"write_sample_snli({str(tmp_path / hash_seed)!r}, 90, 30, 4)")
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    for name in ("snli_1.0_train.txt", "snli_1.0_test.txt"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()
