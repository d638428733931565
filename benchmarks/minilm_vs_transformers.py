"""Fine-tune the real MiniLM checkpoint three ways on the SNLI dev split, side by side in one run:
nlibert (torch), nlibert (MXNet), and transformers' `BertForSequenceClassification`.

    python benchmarks/minilm_vs_transformers.py                       # ~30 minutes on 2 CPU cores
    python benchmarks/minilm_vs_transformers.py --train-limit 500 --test-limit 200   # a quick look

The data is the SNLI dev file split 90/10 with the seed (8,858 training and 984 test pairs), packed
once by nlibert's core (WordPiece ids identical to transformers' tokenizer: tests/test_wordpiece.py).
All three see the same examples in the same length-bucketed, trimmed batches (nlibert's fast-mode
batches), with the same optimizer (Adam, no weight decay, constant lr, as the chapter), loss, epochs
and seed, and the same OpenMP setting (`OMP_WAIT_POLICY=PASSIVE`, as the `nlibert` command sets).
nlibert runs its `finetune` job (`nlibert.jobs.run_finetune`, fast mode); transformers runs a
plain loop over the same batches. Examples/sec count training time only, for all three.

The one model difference is the one between the chapter's classifier and transformers': transformers
applies dropout to the pooled <cls> vector before its output layer; the chapter does not.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import dev_file, loadavg  # noqa: E402

SYSTEMS = ("nlibert-torch", "nlibert-mxnet", "transformers")


def run_nlibert(backend_name: str, args, out: str) -> dict:
    from nlibert import jobs
    from nlibert.core.settings import FinetuneSettings
    m = jobs.run_finetune(FinetuneSettings(
        backend=backend_name, pretrained="minilm-l6", data=args.data, max_len=args.max_len,
        batch_size=args.batch_size, lr=args.lr, epochs=args.epochs, train_limit=args.train_limit,
        test_limit=args.test_limit, seed=args.seed, device=args.device, out=os.path.join(out, backend_name),
        cache_dir=os.path.join(out, "packed")))
    seconds = sum(e["seconds"] for e in m["epochs"])
    examples = sum(e["num_examples"] for e in m["epochs"])
    return {"test_acc": m["test_acc"], "train_acc": m["epochs"][-1]["train_acc"], "loss": m["epochs"][-1]["loss"],
            "examples_per_sec": examples / seconds, "num_train": m["num_train"], "num_test": m["num_test"]}


def run_transformers(args, out: str) -> dict:
    import torch
    import transformers

    from nlibert.core.batching import BatchIterator, bucket_batch_indices
    from nlibert.core.hf import resolve_packaged_checkpoint
    from nlibert.core.sources import snli_packed, snli_source
    from nlibert.core.wordpiece import load_wordpiece_vocab

    folder = resolve_packaged_checkpoint("minilm-l6")
    vocab = load_wordpiece_vocab(folder)
    train_set, test_set, _ = snli_packed(snli_source(args.data, out, args.seed), args.seed, vocab, args.max_len,
                                         args.train_limit, args.test_limit, os.path.join(out, "packed"))
    torch.manual_seed(args.seed)
    model = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()

    def batches(dataset, shuffle):
        return BatchIterator.from_dataset(dataset, args.batch_size, shuffle=shuffle, seed=args.seed, trim=True,
                                          sampler=bucket_batch_indices(dataset.valid_lens))

    def inputs(X):
        ids, segments, valid_lens = (torch.as_tensor(np.asarray(a, dtype=np.int64)) for a in X)
        mask = (torch.arange(ids.shape[1])[None, :] < valid_lens[:, None]).long()
        return {"input_ids": ids, "token_type_ids": segments, "attention_mask": mask}

    train_iter, seconds, examples = batches(train_set, True), 0.0, 0
    for epoch in range(args.epochs):
        model.train()
        loss_sum = correct = count = 0.0
        start = time.perf_counter()
        for X, y in train_iter:
            y = torch.as_tensor(np.asarray(y, dtype=np.int64))
            logits = model(**inputs(X)).logits
            loss = loss_fn(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += float((logits.argmax(1) == y).sum())
            count += len(y)
        seconds += time.perf_counter() - start
        examples += int(count)
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for X, y in batches(test_set, False):
            hits += int((model(**inputs(X)).logits.argmax(1).numpy() == np.asarray(y)).sum())
            total += len(y)
    return {"test_acc": hits / total, "train_acc": correct / count, "loss": loss_sum / count,
            "examples_per_sec": examples / seconds, "num_train": len(train_set), "num_test": len(test_set)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(dev_file().parent),
                        help="an SNLI-format folder (default: the shared one, dev file only, split 90/10)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="keep the runs' folders here (default: a temporary folder)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="nlibert-minilm-")
    # As the `nlibert` command does (cli.py), before torch loads OpenMP: the same setting for all three.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    results = {}
    for system in args.systems:
        print(f"== {system} (load average {loadavg()})", flush=True)
        start = time.perf_counter()
        results[system] = (run_transformers(args, out) if system == "transformers"
                           else run_nlibert(system.split("-")[1], args, out))
        results[system]["wall_seconds"] = time.perf_counter() - start

    first = next(iter(results.values()))
    print(f"\nMiniLM-L6 (all-MiniLM-L6-v2) fine-tuned on SNLI dev split 90/10 (seed {args.seed}): "
          f"{first['num_train']} train / {first['num_test']} test pairs; epochs {args.epochs}, batch "
          f"{args.batch_size}, lr {args.lr}, max_len {args.max_len}, Adam, device {args.device}")
    print(f"{'system':15s} {'test acc':>9s} {'train acc':>9s} {'loss':>7s} {'examples/s':>11s} {'wall s':>8s}")
    for system, r in results.items():
        print(f"{system:15s} {r['test_acc']:9.4f} {r['train_acc']:9.4f} {r['loss']:7.3f} "
              f"{r['examples_per_sec']:11.1f} {r['wall_seconds']:8.1f}")
    print(f"(folders under {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
