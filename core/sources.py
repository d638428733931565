"""Where a job's data comes from: SNLI in its own layout (the embedded sample, a folder, or the data
hub), the other tasks (`core/tasks.py`: AG News, the user's files), seeded subsets, the packed-data
cache, and WikiText for pretraining.

A fine-tuning source (`finetune_source`) is an `SNLISource` or a `TaskSource`; both give a run's
examples two ways, `texts` for the book path (which packs them) and `packed` for the fast path
(arrays reloaded from the disk cache, `core/packed_cache.py`), the same examples in the same order:
the same seeded 90/10 split of a file without a test split and the same seeded subsets
(`subset_indices`). Validation data (`book_validation`, `packed_validation`) is a seeded share of
the training examples, disjoint from the rest, or a file. Each also says what its labels are called
and whether an example is a pair.
"""
from __future__ import annotations

import dataclasses
import os
from typing import ClassVar, Sequence, Union

import numpy as np

from .data_hub import download_extract
from .packed_cache import default_cache_dir, load_packed_examples, load_packed_snli
from .packing import SNLIBERTDataset
from .sample import write_sample_snli
from .settings import HUB_DATA, FinetuneSettings
from .tables import encode_labels, read_texts
from .snli import LABEL_NAMES, SPLIT_FRACTION, read_snli_file, split_dataset
from .tasks import Task, ag_news_task, download_ag_news, file_task
from .vocab import Vocab


def subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """The rows of a seeded random subset of `limit` of `n` examples (all of them, in order, when
    `limit` is None or not smaller than `n`)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)[:limit]


def take(dataset: Sequence[Sequence], indices: np.ndarray) -> tuple[list, ...]:
    """The rows `indices` of a dataset of columns, (premises, hypotheses, labels) or (texts, labels), same form."""
    return tuple([column[i] for i in indices] for column in dataset)


@dataclasses.dataclass(frozen=True)
class SNLISource:
    """The SNLI files of a run: a test file of None means the train file is SNLI's dev file, split
    90/10 with the run's seed."""

    train_file: str
    test_file: str | None
    description: str
    embedded: bool = False  # the embedded sample, written into the run's folder

    name: ClassVar[str] = "snli"
    label_names: ClassVar[tuple[str, ...]] = tuple(LABEL_NAMES)
    paired: ClassVar[bool] = True

    def texts(self, seed: int, train_limit: int | None = None, test_limit: int | None = None
              ) -> tuple[tuple[list, ...], tuple[list, ...]]:
        return snli_texts(self, seed, train_limit, test_limit)

    def packed(self, seed: int, vocab: Vocab, max_len: int, train_limit: int | None = None,
               test_limit: int | None = None, cache_dir: str | None = None
               ) -> tuple[SNLIBERTDataset, SNLIBERTDataset, bool]:
        return snli_packed(self, seed, vocab, max_len, train_limit, test_limit, cache_dir)


def snli_source(data: str | None, out_dir: str, seed: int) -> SNLISource:
    """The files for `--data`: a folder in SNLI's layout (train + test files, or the dev file alone),
    'SNLI' (downloaded from the data hub), or None: the embedded NLI sample, written into `out_dir`."""
    if data is None:
        folder = write_sample_snli(os.path.join(out_dir, "sample-snli"), seed=0)
        description = "embedded NLI sample (nlibert.core.sample)"
    elif data == HUB_DATA["snli"]:
        folder, description = download_extract("SNLI"), "SNLI 1.0 (data hub)"
    else:
        folder, description = data, f"SNLI-format folder {data}"
    if os.path.isdir(os.path.join(folder, "snli_1.0")):
        folder = os.path.join(folder, "snli_1.0")
    train_file, test_file = (os.path.join(folder, f"snli_1.0_{s}.txt") for s in ("train", "test"))
    dev_file = os.path.join(folder, "snli_1.0_dev.txt")
    if os.path.exists(train_file) and os.path.exists(test_file):
        return SNLISource(train_file, test_file, description, embedded=data is None)
    if os.path.exists(dev_file):
        return SNLISource(dev_file, None, description + f" (dev file split 90/10, seed {seed})", embedded=data is None)
    raise FileNotFoundError(f"{folder}: expected snli_1.0_train.txt and snli_1.0_test.txt, "
                            "or snli_1.0_dev.txt to split")


def snli_texts(source: SNLISource, seed: int, train_limit: int | None = None, test_limit: int | None = None
               ) -> tuple[tuple[list, ...], tuple[list, ...]]:
    """(train, test) as (premises, hypotheses, labels), split and subset with `seed`."""
    if source.test_file is None:
        train, test = split_dataset(read_snli_file(source.train_file, verbose=True), SPLIT_FRACTION, seed)
    else:
        train, test = (read_snli_file(f, verbose=True) for f in (source.train_file, source.test_file))
    return (take(train, subset_indices(len(train[2]), train_limit, seed)),
            take(test, subset_indices(len(test[2]), test_limit, seed)))


def snli_packed(source: SNLISource, seed: int, vocab: Vocab, max_len: int, train_limit: int | None = None,
                test_limit: int | None = None, cache_dir: str | None = None
                ) -> tuple[SNLIBERTDataset, SNLIBERTDataset, bool]:
    """`(train_set, test_set, cache_hit)`: exactly the examples, in the same order, that `snli_texts`
    + `SNLIBERTDataset` give, but packed once per file and vocabulary and then reloaded from the
    disk cache (`core.packed_cache.load_packed_snli`; `cache_dir` None: its default)."""
    full_train = load_packed_snli(source.train_file, vocab, max_len, cache_dir=cache_dir, verbose=True)
    if source.test_file is None:
        (first,), (second,) = split_dataset((np.arange(len(full_train)),), SPLIT_FRACTION, seed)
        train_set, test_set, hit = full_train.subset(first), full_train.subset(second), full_train.cache_hit
    else:
        test_set = load_packed_snli(source.test_file, vocab, max_len, cache_dir=cache_dir, verbose=True)
        train_set = full_train
        hit = full_train.cache_hit and test_set.cache_hit
    return _subsets(train_set, test_set, seed, train_limit, test_limit) + (bool(hit),)


def _subsets(train_set: SNLIBERTDataset, test_set: SNLIBERTDataset, seed: int, train_limit: int | None,
             test_limit: int | None) -> tuple[SNLIBERTDataset, SNLIBERTDataset]:
    """The seeded subsets of `--train-limit` / `--test-limit` rows (`subset_indices`), as the texts get them."""
    if train_limit is not None:
        train_set = train_set.subset(subset_indices(len(train_set), train_limit, seed))
    if test_limit is not None:
        test_set = test_set.subset(subset_indices(len(test_set), test_limit, seed))
    return train_set, test_set


@dataclasses.dataclass(frozen=True)
class TaskSource:
    """A task read by `core/tasks.py` (AG News, the user's files) as a fine-tuning source: its
    examples are in memory, already split; the fast path caches them packed, keyed by their content."""

    task: Task

    embedded: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.task.label_names

    @property
    def paired(self) -> bool:
        return self.task.paired

    @property
    def description(self) -> str:
        return self.task.description

    def texts(self, seed: int, train_limit: int | None = None, test_limit: int | None = None
              ) -> tuple[tuple[list, ...], tuple[list, ...]]:
        """(train, test) as column tuples, each a seeded subset of `--train-limit` / `--test-limit` rows."""
        train, test = self.task.train, self.task.test
        return (take(train, subset_indices(len(train[-1]), train_limit, seed)),
                take(test, subset_indices(len(test[-1]), test_limit, seed)))

    def packed(self, seed: int, vocab: Vocab, max_len: int, train_limit: int | None = None,
               test_limit: int | None = None, cache_dir: str | None = None
               ) -> tuple[SNLIBERTDataset, SNLIBERTDataset, bool]:
        """`(train_set, test_set, cache_hit)`: what `texts` + `SNLIBERTDataset` give, through the cache."""
        train_set, test_set = (load_packed_examples(examples, f"{self.name}-{split}", vocab, max_len,
                                                    cache_dir=cache_dir, verbose=True)
                               for split, examples in (("train", self.task.train), ("test", self.task.test)))
        hit = train_set.cache_hit and test_set.cache_hit
        return _subsets(train_set, test_set, seed, train_limit, test_limit) + (bool(hit),)


FinetuneSource = Union[SNLISource, TaskSource]


# --- validation data -----------------------------------------------------------------------------

def validation_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(training rows, validation rows)` of `n` training examples: a seeded share `fraction` held
    out (at least one example, never all), the rest kept in their order. The generator is seeded
    apart from `subset_indices`' so that the two draws are independent."""
    held = max(1, round(n * fraction))
    if held >= n:
        raise ValueError(f"--validation-split {fraction:g}: {n} training examples leave none to train on; "
                         "use a smaller share or more data (--train-limit)")
    order = np.random.default_rng([seed, 1]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def validation_file_examples(settings: FinetuneSettings, source: FinetuneSource) -> tuple[list, ...]:
    """The examples of `--validation-file`: an SNLI-format file for SNLI, else a file in
    `--train-file`'s layout whose labels must be the training file's. It may not be a file the run
    trains or tests on."""
    _check_validation_file(settings, source)
    if source.name == "snli":
        return read_snli_file(settings.validation_file, verbose=True)
    data = read_texts(settings.validation_file, settings.columns())
    return (*data.texts, encode_labels(data, source.label_names))


def _check_validation_file(settings: FinetuneSettings, source: FinetuneSource) -> None:
    path = settings.validation_file
    used = (source.train_file, source.test_file) if source.name == "snli" else (settings.train_file, settings.test_file)
    for file in used:
        if file is not None and os.path.exists(path) and os.path.exists(file) and os.path.samefile(path, file):
            role = "trains" if file == used[0] else "tests"
            raise ValueError(f"--validation-file {path}: is the file this run {role} on; validate on other data "
                             "(or hold out a share of the training data with --validation-split F)")


def book_validation(settings: FinetuneSettings, source: FinetuneSource, train: tuple[list, ...]
                    ) -> tuple[tuple[list, ...], tuple[list, ...] | None]:
    """`(train, validation)` column tuples for the book path: `train` less its held-out share
    (`--validation-split`), or `train` and the validation file's examples; None without either."""
    if settings.validation_split is not None:
        keep, held = validation_indices(len(train[-1]), settings.validation_split, settings.seed)
        return take(train, keep), take(train, held)
    if settings.validation_file is not None:
        return train, tuple(validation_file_examples(settings, source))
    return train, None


def packed_validation(settings: FinetuneSettings, source: FinetuneSource, train_set: SNLIBERTDataset,
                      vocab: Vocab, cache_dir: str | None) -> tuple[SNLIBERTDataset, SNLIBERTDataset | None]:
    """What `book_validation` gives, packed: the same examples in the same order (a validation file
    through the disk cache, as the training data)."""
    if settings.validation_split is not None:
        keep, held = validation_indices(len(train_set), settings.validation_split, settings.seed)
        return train_set.subset(keep), train_set.subset(held)
    if settings.validation_file is None:
        return train_set, None
    if source.name == "snli":
        _check_validation_file(settings, source)
        return train_set, load_packed_snli(settings.validation_file, vocab, settings.max_len, cache_dir=cache_dir,
                                           verbose=True)
    return train_set, load_packed_examples(validation_file_examples(settings, source), f"{source.name}-validation",
                                           vocab, settings.max_len, cache_dir=cache_dir, verbose=True)


def validation_description(settings: FinetuneSettings) -> str | None:
    """Where the validation data comes from, for the printed line and metrics.json."""
    if settings.validation_split is not None:
        return f"{settings.validation_split:g} of the training examples held out (seed {settings.seed})"
    if settings.validation_file is not None:
        return os.path.abspath(settings.validation_file)
    return None


def finetune_source(settings: FinetuneSettings) -> FinetuneSource:
    """The data of a fine-tuning run, by its options: the user's files (`--train-file` ...), AG News
    (`--task ag_news --data DIR|AG_NEWS`) or SNLI (`--data DIR|SNLI`, or the embedded sample)."""
    if settings.train_file is not None:
        return TaskSource(file_task(settings.train_file, settings.test_file, settings.columns(), settings.seed))
    if settings.task == "ag_news":
        folder = download_ag_news() if settings.data == HUB_DATA["ag_news"] else settings.data
        return TaskSource(ag_news_task(folder, settings.seed))
    return snli_source(settings.data, settings.out, settings.seed)


def packed_cache_dir(cache_dir: str | None, embedded: bool, out_dir: str) -> str:
    """Where the fast path caches packed data: `cache_dir` if given; for the embedded sample
    `out_dir/packed` (it lives there too); else `$NLIBERT_CACHE` or ~/.cache/nlibert/packed."""
    if cache_dir is not None:
        if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
            raise ValueError(f"--cache-dir {cache_dir}: is a file, not a folder; choose another --cache-dir")
        return cache_dir
    return os.path.join(out_dir, "packed") if embedded else default_cache_dir()


def wiki_source(corpus: str) -> tuple[list[str], str]:
    """(corpus files, description) for `--corpus`: a folder (its wiki.train.tokens, else every
    wiki.*.tokens there) or the data-hub name 'wikitext-2' (downloaded as the book does)."""
    from .wiki import wiki_files
    if os.path.isdir(corpus):
        folder, description = corpus, f"WikiText folder {corpus}"
    elif corpus == "wikitext-2":
        folder, description = download_extract("wikitext-2", "wikitext-2"), "WikiText-2 (data hub)"
    else:
        raise FileNotFoundError(f"--corpus {corpus!r}: neither a folder nor 'wikitext-2'")
    files = wiki_files(folder)
    return files, description + " [" + ", ".join(os.path.basename(f) for f in files) + "]"
