"""A fine-tuning run's data as batches: the book's path (every example padded to max_len) and the fast
path (length buckets from the packed cache, trimmed; for a backend that compiles per shape, the
widths planned by cost), validation data, the fingerprint of a run's examples that resuming checks,
and which data each figure is from. jobs.py's `finetune` calls these; framework-neutral.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .backends import backend_info
from .core.batching import BatchIterator, batch_indices, batch_shapes, bucket_batch_indices, plan_widths
from .core.packing import SNLIBERTDataset
from .core.settings import FinetuneSettings
from .core.sources import (FinetuneSource, book_validation, packed_cache_dir, packed_validation,
                           validation_description)


def book_batches(source: FinetuneSource, settings: FinetuneSettings, vocab) -> tuple:
    """The chapter's data: every example packed here, padded to `max_len`, batches in seeded shuffle order;
    and the validation data's batches (None without)."""
    train_data, test_data = source.texts(settings.seed, settings.train_limit, settings.test_limit)
    train_data, valid_data = book_validation(settings, source, train_data)
    train_set, test_set = (SNLIBERTDataset(d, settings.max_len, vocab) for d in (train_data, test_data))
    valid_set = SNLIBERTDataset(valid_data, settings.max_len, vocab) if valid_data is not None else None
    return (BatchIterator.from_dataset(train_set, settings.batch_size, shuffle=True, seed=settings.seed),
            BatchIterator.from_dataset(test_set, settings.batch_size, shuffle=False), len(train_set),
            len(test_set), {}, eval_batches(valid_set, settings.batch_size))


def eval_batches(dataset, batch_size: int, multiple: int | None = None) -> BatchIterator | None:
    """Batches of evaluation data in order (`multiple`: the fast path's, in length buckets, trimmed)."""
    if dataset is None:
        return None
    if multiple is None:
        return BatchIterator.from_dataset(dataset, batch_size, shuffle=False)
    return BatchIterator.from_dataset(dataset, batch_size, shuffle=False, trim=True, pad_multiple=multiple,
                                      sampler=bucket_batch_indices(dataset.valid_lens, multiple))


def fast_batches(source: FinetuneSource, settings: FinetuneSettings, vocab) -> tuple:
    """The same examples from the packed cache, in length buckets, each batch trimmed to its longest example."""
    cache_dir = packed_cache_dir(settings.cache_dir, source.embedded, settings.out)
    train_set, test_set, cache_hit = source.packed(settings.seed, vocab, settings.max_len, settings.train_limit,
                                                   settings.test_limit, cache_dir)
    train_set, valid_set = packed_validation(settings, source, train_set, vocab, cache_dir)
    multiple = 8 if settings.graph else 1  # a compiled graph then sees only a few widths
    sampler = bucket_batch_indices(train_set.valid_lens, multiple) if settings.bucketing else batch_indices
    train_iter = BatchIterator.from_dataset(train_set, settings.batch_size, shuffle=True, seed=settings.seed,
                                            trim=True, sampler=sampler, pad_multiple=multiple)
    test_iter = eval_batches(test_set, settings.batch_size, multiple)
    valid_iter = eval_batches(valid_set, settings.batch_size, multiple)
    compile_cost = backend_info(settings.backend).compile_cost
    plans = {}
    if compile_cost:  # one program per width: the run's shapes, every epoch's, say which widths pay for a compile
        train_iter.widths = plans["train"] = plan_widths(batch_shapes(train_iter) * settings.epochs, compile_cost,
                                                         settings.max_len)
        evaluated = [batches for batches in (test_iter, valid_iter) if batches is not None]  # one program serves both
        plans["test"] = plan_widths([shape for batches in evaluated for shape in batch_shapes(batches)] * settings.epochs,
                                    compile_cost, settings.max_len)
        for batches in evaluated:
            batches.widths = plans["test"]
    fast_path = {"precision": settings.precision, "graph": settings.graph, "fused_attention": True,
                 "last_block_cls_only": True, "fused_adam": backend_info(settings.backend).fused_adam,
                 "bucketing": {"sampler": "bucket_batch_indices" if settings.bucketing else "batch_indices",
                               "pad_multiple": multiple, "widths": plans},
                 "packed_cache": {"dir": cache_dir, "hit": cache_hit}}
    return train_iter, test_iter, len(train_set), len(test_set), {"fast_path": fast_path}, valid_iter


def data_fingerprint(*iterators: BatchIterator) -> str:
    """A sha1 of the examples of a run (token ids, segments, lengths and labels of every split), so a
    resumed run is refused when the data changed, even with the same rows and size."""
    digest = hashlib.sha1()
    for it in iterators:
        for array in (it.token_ids, it.segments, it.valid_lens, it.labels):
            digest.update(np.ascontiguousarray(array).tobytes())
            digest.update(str(np.shape(array)).encode())
    return digest.hexdigest()


def splits_record(settings: FinetuneSettings, source: FinetuneSource, num_train: int, num_test: int, valid_iter) -> dict:
    """Which data each figure is from (metrics.json `splits`); prints the validation data's line."""
    validation = None
    if valid_iter is not None:
        num_valid = valid_iter.num_examples
        if not num_valid:
            raise ValueError(f"--validation-file {settings.validation_file}: holds no labelled examples")
        validation = {"examples": num_valid, "data": validation_description(settings)}
        print(f"validating on {num_valid} examples: {validation['data']}")
    return {"train": {"examples": num_train, "data": source.description}, "validation": validation,
            "test": {"examples": num_test, "data": f"the test split of {source.description}"}}
