"""BERT pretraining data (core.wiki) and loop bookkeeping (core.pretraining): the book's semantics, seeded."""
import re

import numpy as np
import pytest

from nlibert.core.pretraining import StepRecord, format_pretrain_summary
from nlibert.core.schedule import LRSchedule, upgrade_signature
from nlibert.core.settings import PretrainSettings
from nlibert.core.training import step_seed
from nlibert.core.resume import commit_resume_state, read_resume_state
from nlibert.core.wiki import (RESERVED_TOKENS, WikiBatchIterator, WikiTextDataset, load_data_wiki,
                               read_wiki, read_wiki_files, wiki_files)


def write_wiki(path, num_paragraphs=400, seed=0):
    """A WikiText-like file: headers, blank lines, one-sentence lines and multi-sentence paragraphs."""
    rng = np.random.default_rng(seed)
    words = [f"W{i}" for i in range(40)]
    lines = [" = Title = \n", " \n"]
    for p in range(num_paragraphs):
        sentences = [" ".join(rng.choice(words, rng.integers(2, 12))) for _ in range(rng.integers(2, 7))]
        lines += [" " + " . ".join(sentences) + " . \n", " = = Section = = \n", " One single sentence . \n"]
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wiki")
    write_wiki(folder / "wiki.valid.tokens")
    return folder


@pytest.fixture(scope="module")
def dataset(corpus):
    rng = np.random.default_rng(0)
    return WikiTextDataset(read_wiki(corpus, rng), 32, rng=rng)


def test_reader_keeps_lines_with_two_sentences_lower_cased(tmp_path):
    (tmp_path / "wiki.valid.tokens").write_text(
        " = Title = \n \n A B . C D . \n Only one . \n X Y . Z \n", encoding="utf-8")
    # As the book, the test runs on the unstripped line: ' . \n' ends a one-sentence line with a
    # second (empty) part, so it is kept, as a paragraph of one sentence (no NSP pair of its own).
    expected = [["a b", "c d ."], ["only one ."], ["x y", "z"]]
    assert read_wiki_files([tmp_path / "wiki.valid.tokens"]) == expected
    shuffled = read_wiki(tmp_path, np.random.default_rng(3))
    assert sorted(shuffled) == expected and shuffled != expected


def test_corpus_files_prefer_train_else_every_split(tmp_path):
    for name in ("wiki.test.tokens", "wiki.valid.tokens", "notes.txt"):
        (tmp_path / name).write_text("a . b\n")
    assert [p.rsplit("/", 1)[1] for p in wiki_files(tmp_path)] == ["wiki.valid.tokens", "wiki.test.tokens"]
    (tmp_path / "wiki.train.tokens").write_text("a . b\n")
    assert [p.rsplit("/", 1)[1] for p in wiki_files(tmp_path)] == ["wiki.train.tokens"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no wiki"):
        wiki_files(tmp_path / "empty")


def test_vocab_has_reserved_tokens_and_min_freq_5(dataset):
    vocab = dataset.vocab
    assert vocab.idx_to_token[:5] == ["<unk>"] + RESERVED_TOKENS
    counts = {}
    for sentence in dataset.sentences:
        for t in sentence:
            counts[t] = counts.get(t, 0) + 1
    assert all(counts[t] >= 5 for t in vocab.idx_to_token[5:])
    assert "one" in vocab.token_to_idx and "title" not in vocab.token_to_idx  # only paragraphs count


def test_examples_are_packed_masked_and_padded_as_the_book(dataset):
    vocab, max_len, P = dataset.vocab, 32, round(32 * 0.15)
    cls, sep, pad, mask = (vocab[t] for t in ("<cls>", "<sep>", "<pad>", "<mask>"))
    ids, segs, lens, pos, weights, labels, nsp = dataset.arrays
    assert [a.dtype for a in dataset.arrays] == [np.int32, np.int32, np.float32, np.int32, np.float32,
                                                 np.int64, np.int64]
    assert ids.shape == segs.shape == (len(dataset), max_len) and pos.shape == weights.shape == (len(dataset), P)
    for i in range(0, len(dataset), 7):
        a, b = (dataset.sentences[s] for s in dataset.sentence_pairs[i])
        original = [cls] + vocab[a] + [sep] + vocab[b] + [sep]
        n = len(original)
        assert lens[i] == n <= max_len
        k = max(1, round(n * 0.15))
        assert weights[i].tolist() == [1.0] * k + [0.0] * (P - k)
        p = pos[i, :k]
        assert list(p) == sorted(set(p)) and pos[i, k:].tolist() == [0] * (P - k)
        assert labels[i, k:].tolist() == [0] * (P - k)
        assert not set(p) & {0, len(a) + 1, n - 1}  # never <cls> or <sep>
        assert labels[i, :k].tolist() == [original[j] for j in p]
        row = ids[i].tolist()
        assert [row[j] for j in range(n) if j not in set(p)] == [original[j] for j in range(n) if j not in set(p)]
        assert row[n:] == [pad] * (max_len - n)
        assert segs[i].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (max_len - n)
        if nsp[i]:
            assert dataset.sentence_pairs[i, 1] == dataset.sentence_pairs[i, 0] + 1


def test_masking_statistics(dataset):
    ids, _, lens, pos, weights, labels, _ = dataset.arrays
    real = weights > 0
    inputs = np.take_along_axis(ids, pos.astype(np.int64), axis=1)[real]
    originals = labels[real]
    mask = dataset.vocab["<mask>"]
    assert real.sum() > 2500
    assert real.sum() / lens.sum() == pytest.approx(0.15, abs=0.02)
    masked = np.mean(inputs == mask)
    kept = np.mean(inputs == originals)
    other = np.mean((inputs != mask) & (inputs != originals))
    assert masked == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1, abs=0.025)
    assert other == pytest.approx(0.1, abs=0.025)
    # special tokens are never predicted, but a random replacement may be any vocabulary entry
    assert not np.isin(originals, [dataset.vocab[t] for t in ("<cls>", "<sep>", "<pad>", "<mask>")]).any()


def test_next_sentence_balance_and_length_limit(corpus):
    rng = np.random.default_rng(1)
    paragraphs = read_wiki(corpus, rng)
    long_ds = WikiTextDataset(paragraphs, 64, rng=rng)
    assert long_ds.nsp_labels.mean() == pytest.approx(0.5, abs=0.04)
    num_adjacent = sum(len(p) - 1 for p in paragraphs)
    assert len(long_ds) == num_adjacent  # max_len 64 fits every pair of this corpus
    short_ds = WikiTextDataset(paragraphs, 16, seed=1)
    assert 0 < len(short_ds) < num_adjacent and short_ds.valid_lens.max() <= 16


def test_same_seed_same_data_other_seed_other_data(corpus):
    def build(seed):
        rng = np.random.default_rng(seed)
        return WikiTextDataset(read_wiki(corpus, rng), 32, rng=rng)
    first, again, other = build(5), build(5), build(6)
    for x, y in zip(first.arrays, again.arrays):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first.all_token_ids[:100], other.all_token_ids[:100])


def test_book_batch_shapes_on_wikitext2_valid(shared_data):
    train_iter, vocab = load_data_wiki(512, 64, data_dir=shared_data / "wikitext-2")
    batch = next(iter(train_iter))
    assert [x.shape for x in batch] == [(512, 64), (512, 64), (512,), (512, 10), (512, 10), (512, 10), (512,)]
    assert len(vocab) > 5000 and vocab.idx_to_token[1:5] == RESERVED_TOKENS
    assert batch[4].sum() / batch[2].sum() == pytest.approx(0.15, abs=0.01)


def test_iterator_passes_differ_cover_everything_and_resume_exactly(dataset):
    it = WikiBatchIterator(dataset, 64, seed=3)
    first = [b[0] for b in it]
    second = [b[0] for b in it]
    assert len(first) == len(it) == -(-len(dataset) // 64)
    assert len(first[-1]) == (len(dataset) % 64 or 64)  # the last batch keeps the remainder
    assert sum(len(b) for b in first) == len(dataset)
    assert not np.array_equal(first[0], second[0])
    # stop after 3 batches of pass 1, carry the state over, continue in a fresh iterator
    it = WikiBatchIterator(dataset, 64, seed=3)
    list(it)
    for i, _ in enumerate(it):
        if i == 2:
            break
    state = it.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 3)
    resumed = WikiBatchIterator(dataset, 64, seed=3)
    resumed.load_state_dict(state)
    rest = [b[0] for b in resumed]
    assert len(rest) == len(second) - 3
    for x, y in zip(rest, second[3:]):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="batch_size"):
        WikiBatchIterator(dataset, 32, seed=3).load_state_dict(state)


def test_remasking_draws_new_masks_each_pass_over_the_same_pairs(dataset):
    it = WikiBatchIterator(dataset, len(dataset), shuffle=False, seed=3, remask=True)  # one batch a pass
    passes = [next(iter(it)) for _ in range(3)]
    for x, y in zip(passes[0], dataset.arrays):  # pass 0: the dataset's own masks (the book)
        np.testing.assert_array_equal(x, y)
    book = WikiBatchIterator(dataset, len(dataset), shuffle=False, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip([next(iter(book)) for _ in range(2)][1], passes[0]))
    rows = np.arange(len(dataset))[:, None]
    packed = dataset.packed_token_ids
    for ids, segments, valid_lens, positions, weights, labels, nsp in passes[1:]:
        for x, y in ((segments, dataset.all_segments), (valid_lens, dataset.valid_lens), (nsp, dataset.nsp_labels),
                     (weights.sum(1), dataset.all_mlm_weights.sum(1))):  # the same pairs, as many predictions
            np.testing.assert_array_equal(x, y)
        real = weights == 1
        np.testing.assert_array_equal(labels[real], packed[rows, positions][real])
        untouched = np.ones(packed.shape, bool)
        untouched[np.broadcast_to(rows, positions.shape)[real], positions[real]] = False
        np.testing.assert_array_equal(ids[untouched], packed[untouched])
        assert np.mean(ids[rows, positions][real] == dataset.vocab["<mask>"]) == pytest.approx(0.8, abs=0.03)
        assert np.mean(positions[real] != dataset.all_pred_positions[real]) > 0.5  # new positions
    assert not np.array_equal(passes[1][3], passes[2][3])
    # the masks of a pass depend only on (seed, pass): a resumed iterator draws the same
    resumed = WikiBatchIterator(dataset, len(dataset), shuffle=False, seed=3, remask=True)
    resumed.load_state_dict({"epoch": 2, "batch": 0})
    for x, y in zip(next(iter(resumed)), passes[2]):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="remask"):
        book.load_state_dict(it.state_dict())


def test_learning_rate_warms_up_then_stays_or_decays_linearly():
    lr = 0.01
    assert [LRSchedule(lr, 4).at(s) for s in range(1, 5)] == [lr] * 4  # the book: constant
    assert [LRSchedule(lr, 10, 4).at(s) for s in range(1, 11)] == pytest.approx(
        [lr / 4, lr / 2, 3 * lr / 4] + [lr] * 7)
    assert [LRSchedule(lr, 10, 4, "linear").at(s) for s in range(1, 11)] == pytest.approx(
        [lr / 4, lr / 2, 3 * lr / 4, lr] + [lr * k / 6 for k in (5, 4, 3, 2, 1, 0)])
    assert [LRSchedule(lr, 4, 0, "linear").at(s) for s in range(1, 5)] == pytest.approx([0.0075, 0.005, 0.0025, 0])
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule(lr, 4, -1)
    with pytest.raises(ValueError, match="schedule 'cosine'"):
        LRSchedule(lr, 4, 0, "cosine")


def test_pretraining_and_fine_tuning_share_one_schedule_and_its_words():
    """`nlibert pretrain` schedules as finetune does (one LRSchedule, constant|linear): the same
    warm-up and decay give the same rates, and the words pretraining used before (`lr_decay`
    none|linear in a resume checkpoint's signature) read as today's."""
    pretrain = PretrainSettings(lr=0.5, steps=8, warmup_steps=2, lr_schedule="linear").schedule()
    from nlibert.core.settings import FinetuneSettings
    finetune = FinetuneSettings(lr=0.5, epochs=2, warmup_steps=2, lr_schedule="linear").schedule(4)
    assert pretrain == finetune and pretrain.lr_at() is not None
    assert PretrainSettings().schedule().lr_at() is None  # the book's constant rate, the optimizer's own
    old = {"lr": 0.01, "lr_decay": "none", "decay_steps": None}
    assert upgrade_signature(old) == {"lr": 0.01, "lr_schedule": "constant", "decay_steps": None}
    assert upgrade_signature({"lr_decay": "linear"}) == {"lr_schedule": "linear"}
    new = {"lr": 0.01, "lr_schedule": "constant"}
    assert upgrade_signature(new) is new


def test_resume_state_names_its_files_and_prunes_older_ones(tmp_path):
    assert read_resume_state(tmp_path) is None
    for step in (2, 4):
        files = {"params": f"step-{step:08d}.params", "trainer": f"step-{step:08d}.trainer"}
        for name in files.values():
            (tmp_path / name).write_bytes(b"x")
        commit_resume_state(tmp_path, {"step": step, "files": files})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "step-00000004.params",
                                                          "step-00000004.trainer"]
    assert read_resume_state(tmp_path)["step"] == 4
    (tmp_path / "step-00000004.trainer").unlink()
    with pytest.raises(FileNotFoundError, match="trainer"):
        read_resume_state(tmp_path)


def test_step_seeds_and_summary_lines():
    assert step_seed(0, 1) == step_seed(0, 1) != step_seed(0, 2) != step_seed(1, 2)
    records = [StepRecord(1, 6.0, 0.8, 512, 2.0), StepRecord(2, 5.0, 0.6, 512, 2.0)]
    lines = format_pretrain_summary(records, "[cpu(0)]").splitlines()
    assert lines == ["MLM loss 5.500, NSP loss 0.700", "256.0 sentence pairs/sec on [cpu(0)]"]
    assert re.fullmatch(r"MLM loss \d+\.\d{3}, NSP loss \d+\.\d{3}", lines[0])
