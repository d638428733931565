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
from .core.batching import BatchIterator
from .core.checkpoint import read_checkpoint_config
from .core.data_hub import download_extract
from .core.io import write_json
from .core.packing import SNLIBERTDataset, pack_pairs
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


def resolve_snli(data: str | None, out_dir: str, seed: int) -> tuple[tuple, tuple, str]:
    """(train, test, description) from a folder with train/test files, a folder with only the dev file
    (split 90/10 with `seed`), the data-hub name 'SNLI', or the embedded sample when `data` is None."""
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
        return read_snli_file(train_file), read_snli_file(test_file), description
    if os.path.exists(dev_file):
        train, test = split_dataset(read_snli_file(dev_file), 0.9, seed)
        return train, test, description + f" (dev file split 90/10, seed {seed})"
    raise FileNotFoundError(f"{folder}: expected snli_1.0_train.txt and snli_1.0_test.txt, "
                            "or snli_1.0_dev.txt to split")


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
                 num_workers_note: str = "") -> dict:
    """Fine-tune BERT for SNLI as the chapter does; write metrics.json and the model into `out_dir`."""
    backend = load_backend(backend_name)
    devices = backend.parse_devices(device)
    backend.set_seed(seed)
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
    metrics = {
        "backend": backend_name, "pretrained": str(pretrained), "data": data_description,
        "num_train": len(train_data[2]), "num_test": len(test_data[2]),
        "hyperparameters": {"max_len": max_len, "batch_size": batch_size, "lr": lr, "epochs": epochs,
                            "dropout": dropout, "seed": seed},
        "epochs": [r.to_dict() for r in records],
        "test_acc": records[-1].test_acc, "packing_seconds": packing_seconds,
        "devices": [str(d) for d in devices], "model_dir": model_dir,
        "versions": {"nlibert": __version__, "python": platform.python_version(), "numpy": np.__version__,
                     "platform": platform.platform(), **backend.framework_versions()},
    }
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
    num_tokens = len(premise.split()) + len(hypothesis.split()) + 3
    ids, segments, valid_lens = pack_pairs([premise], [hypothesis], vocab, min(cfg.max_len, num_tokens))
    probs = backend.predict_proba(net, ids, segments, valid_lens, devices)[0]
    return {"label": LABEL_NAMES[int(np.argmax(probs))],
            "probabilities": {name: float(p) for name, p in zip(LABEL_NAMES, probs)}}


def run_convert(src: str, dst: str, to: str) -> str:
    """Convert a checkpoint folder (pretrained `BERTModel` or fine-tuned classifier) to the other
    framework's format. Tensors are copied bit for bit; only names change (core.checkpoint)."""
    import shutil

    from .core.checkpoint import convert_params, describe_checkpoint
    src_format, kind, params_path = describe_checkpoint(src)
    if to not in BACKENDS:
        raise ValueError(f"unknown target format {to!r}: use one of {BACKENDS}")
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
    and report the largest absolute differences of every output."""
    import tempfile

    from .core.checkpoint import describe_checkpoint
    src_format, kind, _ = describe_checkpoint(checkpoint)
    other = "mxnet" if src_format == "torch" else "torch"
    backends = {name: load_backend(name) for name in BACKENDS}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {src_format: checkpoint, other: run_convert(checkpoint, os.path.join(tmp, other), other)}
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
