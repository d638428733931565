"""The command-line jobs, framework-neutral: each picks a backend by name and calls the same names in it."""
from __future__ import annotations

import importlib
import os
import platform
import sys
import time
from types import ModuleType

import numpy as np

from . import __version__
from .core.batching import BatchIterator, batch_indices, bucket_batch_indices
from .core.checkpoint import read_checkpoint_config
from .core.data_hub import download_extract
from .core.io import write_json
from .core.packing import SNLIBERTDataset, default_cache_dir, load_packed_snli, pack_pairs
from .core.progress import Progress
from .core.sample import write_sample_snli
from .core.snli import LABEL_NAMES, read_snli_file, split_dataset
from .core.vocab import Vocab, tokenize

BACKENDS = ("torch", "mxnet")
RESERVED_TOKENS = ["<pad>", "<mask>", "<cls>", "<sep>"]


def load_backend(name: str) -> ModuleType:
    """Import `nlibert.backends.<name>` (its module exports the same names in both backends)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: use one of {BACKENDS}")
    backend = importlib.import_module(f"nlibert.backends.{name}")
    restore_torch_threads()
    return backend


def restore_torch_threads() -> None:
    """`import mxnet` drops torch's thread count to 1; give torch every core back."""
    if "torch" in sys.modules and "mxnet" in sys.modules:
        sys.modules["torch"].set_num_threads(os.cpu_count() or 1)


def _subset(dataset, limit: int | None, seed: int):
    """A seeded random subset of `limit` examples (all when limit is None)."""
    if limit is None or limit >= len(dataset[2]):
        return dataset
    idx = np.random.default_rng(seed).permutation(len(dataset[2]))[:limit]
    return tuple([part[i] for i in idx] for part in dataset)


def _subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """The rows `_subset` keeps, in its order."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)[:limit]


def snli_sources(data: str | None, out_dir: str, seed: int) -> tuple[str, str | None, str]:
    """(train file, test file, description) for `data` as `resolve_snli` takes it; the test file is
    None when the folder has only the dev file, which is then split 90/10 with `seed`."""
    if data is None:
        folder = write_sample_snli(os.path.join(out_dir, "sample-snli"), seed=0)
        description = "embedded NLI sample (nlibert.core.sample)"
    elif data == "SNLI":
        folder, description = download_extract("SNLI"), "SNLI 1.0 (data hub)"
    else:
        folder, description = data, f"SNLI-format folder {data}"
    if os.path.isdir(os.path.join(folder, "snli_1.0")):
        folder = os.path.join(folder, "snli_1.0")
    train_file, test_file = (os.path.join(folder, f"snli_1.0_{s}.txt") for s in ("train", "test"))
    dev_file = os.path.join(folder, "snli_1.0_dev.txt")
    if os.path.exists(train_file) and os.path.exists(test_file):
        return train_file, test_file, description
    if os.path.exists(dev_file):
        return dev_file, None, description + f" (dev file split 90/10, seed {seed})"
    raise FileNotFoundError(f"{folder}: expected snli_1.0_train.txt and snli_1.0_test.txt, "
                            "or snli_1.0_dev.txt to split")


def resolve_snli(data: str | None, out_dir: str, seed: int) -> tuple[tuple, tuple, str]:
    """(train, test, description) from a folder with train/test files, a folder with only the dev file
    (split 90/10 with `seed`), the data-hub name 'SNLI', or the embedded sample when `data` is None."""
    train_file, test_file, description = snli_sources(data, out_dir, seed)
    if test_file is not None:
        return read_snli_file(train_file), read_snli_file(test_file), description
    train, test = split_dataset(read_snli_file(train_file), 0.9, seed)
    return train, test, description


def packed_snli(data: str | None, out_dir: str, seed: int, vocab: Vocab, max_len: int,
                train_limit: int | None = None, test_limit: int | None = None,
                cache_dir: str | None = None) -> tuple[SNLIBERTDataset, SNLIBERTDataset, str, bool]:
    """The fast path's data: `(train_set, test_set, description, cache_hit)` holding exactly the examples,
    in the same order, that `resolve_snli` + `_subset` + `SNLIBERTDataset` give, but packed once per
    file and vocabulary and then reloaded from the disk cache (`core.packing.load_packed_snli`)."""
    train_file, test_file, description = snli_sources(data, out_dir, seed)
    full_train = load_packed_snli(train_file, vocab, max_len, cache_dir=cache_dir)
    if test_file is None:
        (first,), (second,) = split_dataset((np.arange(len(full_train)),), 0.9, seed)
        train_set, test_set, hit = full_train.subset(first), full_train.subset(second), full_train.cache_hit
    else:
        train_set, test_set = full_train, load_packed_snli(test_file, vocab, max_len, cache_dir=cache_dir)
        hit = full_train.cache_hit and test_set.cache_hit
    if train_limit is not None and train_limit < len(train_set):
        train_set = train_set.subset(_subset_indices(len(train_set), train_limit, seed))
    if test_limit is not None and test_limit < len(test_set):
        test_set = test_set.subset(_subset_indices(len(test_set), test_limit, seed))
    return train_set, test_set, description, bool(hit)


def build_seeded_checkpoint(backend: ModuleType, folder: str, premises_and_hypotheses: list[str],
                            seed: int) -> str:
    """A randomly initialised, seeded `bert.small`-shaped checkpoint in the book's format, with a vocabulary
    from the training text: what the main job uses until a real pretrained checkpoint is given."""
    if os.path.exists(os.path.join(folder, "pretrained.params")):
        return folder
    vocab = Vocab(tokenize([s.lower() for s in premises_and_hypotheses]), min_freq=1,
                  reserved_tokens=RESERVED_TOKENS)
    backend.set_seed(seed)
    bert = backend.BERTModel(len(vocab), num_hiddens=256, ffn_num_hiddens=512, num_heads=4,
                             num_layers=2, dropout=0.1, max_len=512)
    backend.save_pretrained(bert, vocab, folder)
    return folder


def run_finetune(backend_name: str = "torch", pretrained: str | None = None, data: str | None = None,
                 max_len: int = 128, batch_size: int = 512, lr: float = 1e-4, epochs: int = 5,
                 train_limit: int | None = None, test_limit: int | None = None, seed: int = 0,
                 device: str | None = None, out_dir: str = "nlibert-out", dropout: float = 0.1,
                 num_workers_note: str = "", mode: str = "fast", precision: str = "float32",
                 graph: bool = False, cache_dir: str | None = None, bucketing: bool = True) -> dict:
    """Fine-tune BERT for SNLI as the chapter does; write metrics.json and the model into `out_dir`.

    `mode='fast'` (the default) trains the same model on the same examples with the same optimizer,
    faster: length-bucketed batches trimmed to their longest pair, fused attention, the last encoder
    block computed at <cls> only (all the classifier reads), fused Adam (torch), device-side sums
    read once per epoch, and packed data cached on disk (`cache_dir`; default `$NLIBERT_CACHE`,
    else ~/.cache/nlibert/packed, or `out_dir/packed` for the embedded sample). `precision` and
    `graph` are the fast path's opt-ins (bfloat16 autocast; torch.compile / hybridize).
    `bucketing=False` keeps the fast path's kernels but trains on the book path's batches (the same
    seeded shuffle, each batch trimmed to its longest pair): with dropout 0 the two modes then differ by
    rounding only, which isolates what bucketing's different batch composition does to accuracy.
    `mode='book'` is the chapter's path: every batch padded to `max_len`, the book's attention and
    loop, one host sync per batch."""
    if mode not in FINETUNE_MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {FINETUNE_MODES}")
    backend = load_backend(backend_name)
    devices = backend.parse_devices(device)
    backend.set_seed(seed)
    if mode == "fast":
        return _run_finetune_fast(backend, backend_name, devices, pretrained, data, max_len, batch_size, lr,
                                  epochs, train_limit, test_limit, seed, out_dir, dropout, precision, graph,
                                  cache_dir, bucketing)
    train_data, test_data, data_description = resolve_snli(data, out_dir, seed)
    train_data, test_data = _subset(train_data, train_limit, seed), _subset(test_data, test_limit, seed)
    print(f"read {len(train_data[2])} training and {len(test_data[2])} test examples: {data_description}")

    if pretrained is None:
        pretrained = build_seeded_checkpoint(backend, os.path.join(out_dir, f"seeded-bert-{backend_name}"),
                                             train_data[0] + train_data[1], seed)
    bert, vocab = backend.load_pretrained_model(pretrained, num_hiddens=None, ffn_num_hiddens=None,
                                                num_heads=None, num_layers=None, dropout=dropout,
                                                max_len=None, devices=devices)
    start = time.perf_counter()
    train_set, test_set = SNLIBERTDataset(train_data, max_len, vocab), SNLIBERTDataset(test_data, max_len, vocab)
    packing_seconds = time.perf_counter() - start
    train_iter = BatchIterator.from_dataset(train_set, batch_size, shuffle=True, seed=seed)
    test_iter = BatchIterator.from_dataset(test_set, batch_size, shuffle=False)

    net = backend.BERTClassifier(bert)
    backend.initialize_classifier_head(net, devices)
    records = backend.train_ch13(net, Progress(train_iter, "train"), test_iter, backend.make_loss(),
                                 backend.make_trainer(net, lr), epochs, devices)
    model_dir = os.path.join(out_dir, "model")
    backend.save_classifier(net, vocab, bert.config, model_dir)
    metrics = _finetune_metrics(backend, backend_name, mode, pretrained, data_description, len(train_data[2]),
                                len(test_data[2]), {"max_len": max_len, "batch_size": batch_size, "lr": lr,
                                                    "epochs": epochs, "dropout": dropout, "seed": seed},
                                records, packing_seconds, devices, model_dir)
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics


FINETUNE_MODES = ("fast", "book")


def _versions(backend: ModuleType) -> dict:
    return {"nlibert": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), **backend.framework_versions()}


def _finetune_metrics(backend: ModuleType, backend_name: str, mode: str, pretrained: str, data_description: str,
                      num_train: int, num_test: int, hyperparameters: dict, records: list, packing_seconds: float,
                      devices: list, model_dir: str, **extra) -> dict:
    """metrics.json of a fine-tuning run, the same keys in both modes (`extra`: the fast path's settings)."""
    return {"backend": backend_name, "mode": mode, "pretrained": str(pretrained), "data": data_description,
            "num_train": num_train, "num_test": num_test, "hyperparameters": hyperparameters, **extra,
            "epochs": [r.to_dict() for r in records], "test_acc": records[-1].test_acc,
            "packing_seconds": packing_seconds, "devices": [str(d) for d in devices], "model_dir": model_dir,
            "versions": _versions(backend)}


def _run_finetune_fast(backend: ModuleType, backend_name: str, devices: list, pretrained: str | None,
                       data: str | None, max_len: int, batch_size: int, lr: float, epochs: int,
                       train_limit: int | None, test_limit: int | None, seed: int, out_dir: str,
                       dropout: float, precision: str, graph: bool, cache_dir: str | None,
                       bucketing: bool = True) -> dict:
    """`run_finetune(mode='fast')`: the same examples, model and optimizer as the book path."""
    if pretrained is None:
        folder = os.path.join(out_dir, f"seeded-bert-{backend_name}")
        if not os.path.exists(os.path.join(folder, "pretrained.params")):
            # The seeded checkpoint's vocabulary comes from the training text, as in the book path.
            train_text = _subset(resolve_snli(data, out_dir, seed)[0], train_limit, seed)
            build_seeded_checkpoint(backend, folder, train_text[0] + train_text[1], seed)
        pretrained = folder
    bert, vocab = backend.load_pretrained_model(pretrained, num_hiddens=None, ffn_num_hiddens=None,
                                                num_heads=None, num_layers=None, dropout=dropout,
                                                max_len=None, devices=devices)
    if cache_dir is None:
        cache_dir = os.path.join(out_dir, "packed") if data is None else default_cache_dir()
    start = time.perf_counter()
    train_set, test_set, data_description, cache_hit = packed_snli(
        data, out_dir, seed, vocab, max_len, train_limit, test_limit, cache_dir)
    packing_seconds = time.perf_counter() - start
    print(f"read {len(train_set)} training and {len(test_set)} test examples: {data_description}")

    # Widths rounded to a multiple of 8 when a graph is compiled, so it sees only a few shapes.
    multiple = 8 if graph else 1
    train_sampler = bucket_batch_indices(train_set.valid_lens, multiple) if bucketing else batch_indices
    train_iter = BatchIterator.from_dataset(train_set, batch_size, shuffle=True, seed=seed, trim=True,
                                            sampler=train_sampler, pad_multiple=multiple)
    test_iter = BatchIterator.from_dataset(test_set, batch_size, shuffle=False, trim=True,
                                           sampler=bucket_batch_indices(test_set.valid_lens, multiple),
                                           pad_multiple=multiple)
    backend.set_fused_attention(bert, True)
    net = backend.BERTClassifier(bert, cls_only=True)
    backend.initialize_classifier_head(net, devices)
    records = backend.train_fast(net, Progress(train_iter, "train"), test_iter, backend.make_loss(),
                                 backend.make_trainer(net, lr, fused=True), epochs, devices, precision=precision,
                                 graph=graph)
    model_dir = os.path.join(out_dir, "model")
    backend.save_classifier(net, vocab, bert.config, model_dir)
    fast_path = {"precision": precision, "graph": graph, "fused_attention": True,
                 "last_block_cls_only": True, "fused_adam": backend_name == "torch",
                 "bucketing": {"sampler": "bucket_batch_indices" if bucketing else "batch_indices",
                               "pad_multiple": multiple},
                 "packed_cache": {"dir": cache_dir, "hit": cache_hit}}
    metrics = _finetune_metrics(backend, backend_name, "fast", pretrained, data_description, len(train_set),
                                len(test_set), {"max_len": max_len, "batch_size": batch_size, "lr": lr,
                                                "epochs": epochs, "dropout": dropout, "seed": seed},
                                records, packing_seconds, devices, model_dir, fast_path=fast_path)
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics


def run_predict(model_dir: str, premise: str, hypothesis: str, device: str | None = None) -> dict:
    """Label one premise/hypothesis pair with a fine-tuned model folder."""
    config = read_checkpoint_config(model_dir)
    if config is None or config.get("kind") != "classifier":
        raise ValueError(f"{model_dir}: not a fine-tuned model folder (no config.json of kind 'classifier')")
    backend = load_backend(config["format"])
    devices = backend.parse_devices(device)
    net, vocab, cfg = backend.load_classifier(model_dir, devices)
    ids, segments, valid_lens = pack_pairs([premise], [hypothesis], vocab, cfg.max_len)
    width = int(valid_lens.max())  # no padding: one pair
    ids, segments = ids[:, :width], segments[:, :width]
    probs = backend.predict_proba(net, ids, segments, valid_lens, devices)[0]
    return {"label": LABEL_NAMES[int(np.argmax(probs))],
            "probabilities": {name: float(p) for name, p in zip(LABEL_NAMES, probs)}}


def run_convert(src: str, dst: str, to: str) -> str:
    """Convert a checkpoint folder (pretrained `BERTModel` or fine-tuned classifier) to the other
    framework's format. Tensors are copied bit for bit; only names change (core.checkpoint). A
    Hugging Face BERT folder (or 'minilm-l6') is written in the book's format of `to`."""
    import shutil

    from .core.checkpoint import convert_params, describe_checkpoint
    from .core.hf import PACKAGED_CHECKPOINTS, is_hf_folder
    if to not in BACKENDS:
        raise ValueError(f"unknown target format {to!r}: use one of {BACKENDS}")
    if src in PACKAGED_CHECKPOINTS or is_hf_folder(src):
        # A Hugging Face folder: load it as the target backend does and save the book's format
        # (heads the file lacks are saved as that backend initialised them).
        backend = load_backend(to)
        bert, vocab = backend.load_pretrained_model(src, None, None, None, None, None, None,
                                                    backend.parse_devices("cpu"))
        backend.save_pretrained(bert, vocab, dst)
        return dst
    src_format, kind, params_path = describe_checkpoint(src)
    params = load_backend(src_format).read_params(params_path)
    if src_format != to:
        params = convert_params(params, to, source=params_path)
    os.makedirs(dst, exist_ok=True)
    load_backend(to).write_params(params, os.path.join(dst, os.path.basename(params_path)))
    shutil.copyfile(os.path.join(src, "vocab.json"), os.path.join(dst, "vocab.json"))
    config = read_checkpoint_config(src)
    if config is not None:
        write_json(os.path.join(dst, "config.json"), dict(config, format=to))
    return dst


def _parity_inputs(vocab, data_file: str | None, num_pairs: int, max_len: int, seed: int, out_dir: str):
    if data_file is None:
        data_file = os.path.join(write_sample_snli(os.path.join(out_dir, "sample-snli"), seed=0),
                                 "snli_1.0_test.txt")
    premises, hypotheses, _ = _subset(read_snli_file(data_file), num_pairs, seed)
    ids, segments, valid_lens = pack_pairs(premises, hypotheses, vocab, max_len)
    rng = np.random.default_rng(seed)
    # three MLM prediction positions per pair, inside its valid length
    pred_positions = (rng.random((len(valid_lens), 3)) * valid_lens[:, None]).astype(np.int32)
    return ids, segments, valid_lens, pred_positions


def run_parity(checkpoint: str, data_file: str | None = None, tolerance: float = 1e-5, num_pairs: int = 256,
               max_len: int = 128, seed: int = 0) -> dict:
    """Load one checkpoint into both backends, run the same packed batch through both in evaluation mode
    and report the largest absolute differences of every output. A Hugging Face folder (or 'minilm-l6')
    is read by both backends directly and compared on the encoder output, since the heads it lacks are
    initialised by each backend its own way."""
    import tempfile

    from .core.checkpoint import describe_checkpoint
    from .core.hf import PACKAGED_CHECKPOINTS, is_hf_folder, resolve_packaged_checkpoint
    folder = resolve_packaged_checkpoint(checkpoint) if checkpoint in PACKAGED_CHECKPOINTS else checkpoint
    hugging_face = is_hf_folder(folder)
    if hugging_face:  # both backends read the folder itself
        src_format, kind = "huggingface", "pretrained"
    else:
        src_format, kind, _ = describe_checkpoint(folder)
    backends = {name: load_backend(name) for name in BACKENDS}
    with tempfile.TemporaryDirectory() as tmp:
        if hugging_face:
            folders = {name: folder for name in BACKENDS}
        else:
            other = "mxnet" if src_format == "torch" else "torch"
            folders = {src_format: folder, other: run_convert(folder, os.path.join(tmp, other), other)}
        outputs, vocab = {}, None
        for name, backend in backends.items():
            device = backend.parse_devices("cpu")[0]
            if kind == "pretrained":
                model, vocab = backend.load_pretrained_model(folders[name], None, None, None, None, 0.0, None, [device])
            else:
                model, vocab, _ = backend.load_classifier(folders[name], [device])
            if name == "torch":  # inputs once, from the first backend's vocabulary
                inputs = _parity_inputs(vocab, data_file, num_pairs, max_len, seed, tmp)
            ids, segments, valid_lens, pred_positions = inputs
            if kind == "pretrained":
                outputs[name] = dict(zip(("encoded_X", "mlm_Y_hat", "nsp_Y_hat"),
                                         backend.bert_outputs(model, ids, segments, valid_lens, pred_positions, device)))
                if hugging_face:  # its heads may be missing from the file, hence freshly (differently) initialised
                    outputs[name] = {"encoded_X": outputs[name]["encoded_X"]}
            else:
                outputs[name] = {"logits": backend.classifier_logits(model, ids, segments, valid_lens, device)}
    valid = np.arange(inputs[0].shape[1])[None, :] < inputs[2][:, None]
    report = {"checkpoint": checkpoint, "format": src_format, "kind": kind, "num_pairs": int(len(inputs[2])),
              "max_len": max_len, "tolerance": tolerance, "max_abs_diff": {}}
    for key in outputs["torch"]:
        diff = np.abs(outputs["torch"][key] - outputs["mxnet"][key])
        report["max_abs_diff"][key] = float(diff.max())
        if key == "encoded_X":
            report["max_abs_diff"]["encoded_X (valid positions)"] = float(diff[valid].max())
    if kind == "classifier":
        report["label_agreement"] = float(np.mean(outputs["torch"]["logits"].argmax(1)
                                                  == outputs["mxnet"]["logits"].argmax(1)))
    report["passed"] = all(v <= tolerance for v in report["max_abs_diff"].values())
    return report


def resolve_wiki(corpus: str) -> tuple[list[str], str]:
    """(corpus files, description) for `--corpus`: a folder (its wiki.train.tokens, else every
    wiki.*.tokens there) or the data-hub name 'wikitext-2' (downloaded as the book does)."""
    from .core.wiki import wiki_files
    if os.path.isdir(corpus):
        folder, description = corpus, f"WikiText folder {corpus}"
    elif corpus == "wikitext-2":
        folder, description = download_extract("wikitext-2", "wikitext-2"), "WikiText-2 (data hub)"
    else:
        raise FileNotFoundError(f"--corpus {corpus!r}: neither a folder nor 'wikitext-2'")
    files = wiki_files(folder)
    return files, description + " [" + ", ".join(os.path.basename(f) for f in files) + "]"


def run_pretrain(backend_name: str = "torch", corpus: str = "wikitext-2", steps: int = 50,
                 batch_size: int = 512, max_len: int = 64, num_hiddens: int = 128, ffn_num_hiddens: int = 256,
                 num_heads: int = 2, num_layers: int = 2, dropout: float = 0.2, lr: float = 0.01,
                 seed: int = 0, device: str | None = None, out_dir: str = "nlibert-pretrain",
                 checkpoint_every: int | None = 100, resume: bool | None = None, mlm_loss: str = "masked",
                 stop_after: int | None = None, on_step=None, warmup_steps: int = 0, lr_decay: str = "none",
                 mode: str = "book", remask: bool = False, init: str = "book") -> dict:
    """Pretrain BERT on WikiText as the book does (MLM + NSP); write the checkpoint into `out_dir`.

    `out_dir` gets `vocab.json` + `pretrained.params` + `config.json` (`save_pretrained`, the
    backend's book format, which `finetune --pretrained out_dir` loads) and `metrics.json`.
    Every `checkpoint_every` steps, and when the run ends or stops, the model, optimizer state,
    step and data position go to `out_dir/resume/` (core.pretraining). `resume` None resumes when
    that folder holds a checkpoint, True insists on one, False starts over. `stop_after` ends this
    run after that many steps, as if interrupted (re-run to continue). `on_step(record)` is called
    after each step, once its checkpoint (if any) is written.

    `warmup_steps` and `lr_decay` schedule the rate (`core.pretraining.learning_rate_at`; the
    defaults keep the book's constant lr). `mode='fast'` computes attention with the fused kernels
    of the fine-tuning fast path (`set_fused_attention`) and, in torch, fused Adam: the same model
    and update up to rounding. `mode='book'` (default) is the book's code. `remask=True` draws new
    MLM masks every pass over the data (`WikiBatchIterator`; the book masks once). `init='xavier'`
    starts torch from MXNet's book init (`initialize_bert`; core.pretraining.INIT_SCHEMES). All of these are
    part of the resume signature, as is `steps` when the rate decays (the schedule depends on it).
    """
    import shutil

    from .core.pretraining import (PRETRAIN_MODES, StepRecord, check_init, check_lr_schedule, check_mlm_loss,
                                   commit_resume_state, read_resume_state, summarize)
    from .core.vocab import load_vocab, save_vocab
    from .core.wiki import WikiBatchIterator, WikiTextDataset, read_wiki_files

    check_mlm_loss(mlm_loss)
    check_lr_schedule(warmup_steps, lr_decay)
    check_init(init)
    if mode not in PRETRAIN_MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {PRETRAIN_MODES}")
    if steps < 1 or batch_size < 1 or max_len < 4:
        raise ValueError(f"need steps >= 1, batch_size >= 1, max_len >= 4 (got {steps}, {batch_size}, {max_len})")
    if checkpoint_every is not None and checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0: only when the run ends), got {checkpoint_every}")
    backend = load_backend(backend_name)
    devices = backend.parse_devices(device)
    files, description = resolve_wiki(corpus)
    resume_dir = os.path.join(out_dir, "resume")
    signature = {"backend": backend_name, "corpus": [[os.path.basename(f), os.path.getsize(f)] for f in files],
                 "batch_size": batch_size, "max_len": max_len, "num_hiddens": num_hiddens,
                 "ffn_num_hiddens": ffn_num_hiddens, "num_heads": num_heads, "num_layers": num_layers,
                 "dropout": dropout, "lr": lr, "seed": seed, "mlm_loss": mlm_loss, "mode": mode,
                 "warmup_steps": warmup_steps, "lr_decay": lr_decay, "remask": remask, "init": init,
                 "decay_steps": steps if lr_decay != "none" else None}
    state = None
    if resume is not False:
        state = read_resume_state(resume_dir)
        if state is None and resume:
            raise FileNotFoundError(f"{resume_dir}: no checkpoint to resume from")
        if state is not None and state.get("signature") != signature:
            differ = sorted(k for k in signature if state.get("signature", {}).get(k) != signature[k])
            raise ValueError(f"{resume_dir}: written by a run with other settings ({', '.join(differ)}); "
                             "re-run with those settings, or pass --no-resume to start over")
    elif os.path.isdir(resume_dir):
        shutil.rmtree(resume_dir)

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    dataset = WikiTextDataset(read_wiki_files(files, rng), max_len, rng=rng)
    vocab = dataset.vocab
    train_iter = WikiBatchIterator(dataset, batch_size, shuffle=True, seed=seed, remask=remask)
    data_seconds = time.perf_counter() - start
    print(f"read {len(dataset)} sentence pairs, vocab size {len(vocab)} "
          f"({data_seconds:.1f} s): {description}")

    backend.set_seed(seed)
    bert = backend.BERTModel(len(vocab), num_hiddens, ffn_num_hiddens, num_heads, num_layers, dropout)
    backend.initialize_bert(bert, devices, init)
    if mode == "fast":
        backend.set_fused_attention(bert, True)
    trainer = backend.make_trainer(bert, lr, fused=mode == "fast")
    history: list = []
    start_step = 0
    if state is not None:
        if load_vocab(os.path.join(resume_dir, "vocab.json")).idx_to_token != vocab.idx_to_token:
            raise ValueError(f"{resume_dir}: its vocabulary differs from the corpus's; pass --no-resume")
        backend.load_training_state(resume_dir, state["files"], bert, trainer, devices)
        train_iter.load_state_dict(state["data"])
        start_step = int(state["step"])
        history = [StepRecord(**r) for r in state["history"]]
        print(f"resuming from {resume_dir} at step {start_step + 1}")

    def checkpoint(step: int) -> None:
        os.makedirs(resume_dir, exist_ok=True)
        if not os.path.exists(os.path.join(resume_dir, "vocab.json")):
            save_vocab(vocab, os.path.join(resume_dir, "vocab.json"))
        written = backend.save_training_state(resume_dir, bert, trainer, step)
        commit_resume_state(resume_dir, {
            "step": step, "files": written, "data": train_iter.state_dict(), "signature": signature,
            "rng": {"seed": seed, "rule": "framework RNG re-seeded per step from (seed, step)"},
            "history": [r.to_dict() for r in history]})

    stopped = []

    def after_step(record) -> bool:
        history.append(record)
        if checkpoint_every and record.step % checkpoint_every == 0 and record.step < steps:
            checkpoint(record.step)
        if on_step is not None:
            on_step(record)
        if stop_after is not None and record.step - start_step >= stop_after and record.step < steps:
            stopped.append(record.step)
            return True
        return False

    records = backend.train_bert(train_iter, bert, backend.make_loss(), len(vocab), devices, steps,
                                 trainer=trainer, lr=lr, mlm_loss=mlm_loss, start_step=start_step,
                                 seed=seed, on_step=after_step, warmup_steps=warmup_steps, lr_decay=lr_decay)
    last_step = history[-1].step if history else start_step
    if records:
        checkpoint(last_step)  # always resumable from where this run ended
    metrics = {
        "backend": backend_name, "corpus": description, "num_pairs": len(dataset), "vocab_size": len(vocab),
        "hyperparameters": {k: v for k, v in signature.items() if k not in ("backend", "corpus")},
        "steps": steps, "last_step": last_step, "completed": last_step >= steps,
        "resumed_from_step": start_step if state is not None else None,
        "this_run": summarize(records), "all_steps": summarize(history),
        "history": [r.to_dict() for r in history], "data_seconds": data_seconds,
        "devices": [str(d) for d in devices], "out_dir": out_dir,
        "versions": _versions(backend),
    }
    if stopped:
        print(f"stopped after step {last_step} of {steps}; run the same command again to resume")
    else:
        backend.save_pretrained(bert, vocab, out_dir)
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics
