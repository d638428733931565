"""Does our pretraining pay? Fine-tune on SNLI from a pretrained checkpoint and from a random one of
the same shape and vocabulary, with identical settings, and print both accuracies side by side.

    # fine-tune from a checkpoint `nlibert pretrain` wrote (either format; converted if need be)
    python benchmarks/pretraining_worth.py --pretrained /tmp/issue4/pretrain-torch --out /tmp/issue4/worth-torch
    # or pretrain here first (any `nlibert pretrain` setting), then compare
    python benchmarks/pretraining_worth.py --backend mxnet --pretrain-steps 600 --out /tmp/issue4/worth-mxnet

The random checkpoint is the pretraining's own starting point in kind: `BERTModel.from_config` of the
pretrained config.json, `initialize_bert`, seeded, saved with the pretrained vocab.json
(`save_pretrained`). Both are fine-tuned by `nlibert.jobs.run_finetune` on the SNLI dev file split 90/10
with each seed (train on the 90%, test on the 10%). Printed: the pretraining's MLM and NSP loss (means
over the last 10% of its steps), its sentence pairs/sec, and per seed both test accuracies and their
difference; everything also goes to OUT/worth.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import dev_file, seed_interval  # noqa: E402
from nlibert.backends import BACKENDS  # noqa: E402  (the registry: imports no framework)


def pretraining_figures(folder: str) -> dict | None:
    """MLM / NSP loss over the last 10% of steps, pairs/sec over all steps, from `metrics.json`."""
    from nlibert.core.io import read_json
    path = os.path.join(folder, "metrics.json")
    if not os.path.exists(path):
        return None
    metrics = read_json(path)
    history = metrics["history"]
    tail = history[-max(1, len(history) // 10):]
    return {"backend": metrics["backend"], "steps": len(history), "hyperparameters": metrics["hyperparameters"],
            "mlm_loss_last_10pct": float(np.mean([h["mlm_loss"] for h in tail])),
            "nsp_loss_last_10pct": float(np.mean([h["nsp_loss"] for h in tail])),
            "first_step": {"mlm_loss": history[0]["mlm_loss"], "nsp_loss": history[0]["nsp_loss"]},
            "sentence_pairs_per_sec": metrics["all_steps"]["sentence_pairs_per_sec"],
            "timed_seconds": float(sum(h["seconds"] for h in history)), "vocab_size": metrics["vocab_size"],
            "num_pairs": metrics["num_pairs"]}


def build_random_checkpoint(backend_name: str, pretrained: str, folder: str, seed: int, init: str = "book") -> str:
    """A seeded, randomly initialised checkpoint with the config and vocabulary of `pretrained`,
    initialised by `initialize_bert(..., init)`: the scheme the pretraining started from."""
    from nlibert.backends import load_backend
    from nlibert.core.config import BERTConfig
    from nlibert.core.folders import read_checkpoint_config
    from nlibert.core.vocab import load_vocab
    config = read_checkpoint_config(pretrained)
    if config is None:
        raise SystemExit(f"{pretrained}: no config.json (write the checkpoint with `nlibert pretrain`)")
    backend = load_backend(backend_name)
    devices = backend.parse_devices("cpu")
    backend.set_seed(seed)
    bert = backend.BERTModel.from_config(BERTConfig.from_dict(config))
    backend.initialize_bert(bert, devices, init)
    backend.save_pretrained(bert, load_vocab(os.path.join(pretrained, "vocab.json")), folder)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="the fine-tuning backend")
    parser.add_argument("--pretrained", default=None,
                        help="a folder `nlibert pretrain` wrote (default: pretrain here with the --pretrain-* settings)")
    parser.add_argument("--out", required=True, help="folder for the checkpoints, fine-tuned models and worth.json")
    parser.add_argument("--snli-dev", default=None, help="snli_1.0_dev.txt (default: the shared data's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (each: split and init)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--train-limit", type=int, default=None, help="default: the whole 90%% training part")
    group = parser.add_argument_group("pretraining here (without --pretrained)")
    group.add_argument("--corpus", default=None, help="default: the shared data's wikitext-2 folder")
    group.add_argument("--pretrain-steps", type=int, default=600)
    group.add_argument("--pretrain-batch-size", type=int, default=128)
    group.add_argument("--pretrain-max-len", type=int, default=64)
    group.add_argument("--pretrain-lr", type=float, default=1e-3)
    group.add_argument("--warmup-steps", type=int, default=60)
    group.add_argument("--lr-schedule", choices=("constant", "linear"), default="linear")
    group.add_argument("--init", choices=("book", "xavier"), default="xavier",
                       help="the pretraining's (and so the random baseline's) init; default xavier (MXNet's, in both)")
    args = parser.parse_args(argv)

    from nlibert import jobs
    from nlibert.core.folders import describe_checkpoint
    from nlibert.core.settings import FinetuneSettings, PretrainSettings
    os.makedirs(args.out, exist_ok=True)
    report = {"fine_tune_backend": args.backend, "pretraining_wall_seconds": None}
    pretrained = args.pretrained
    if pretrained is None:
        corpus = args.corpus or str(dev_file().parents[1] / "wikitext-2")
        pretrained = os.path.join(args.out, "pretrained")
        start = time.perf_counter()
        jobs.run_pretrain(PretrainSettings(
            backend=args.backend, corpus=corpus, steps=args.pretrain_steps, batch_size=args.pretrain_batch_size,
            max_len=args.pretrain_max_len, num_hiddens=256, ffn_num_hiddens=512, num_heads=4, num_layers=2,
            dropout=0.1, lr=args.pretrain_lr, device="cpu", out=pretrained, warmup_steps=args.warmup_steps,
            lr_schedule=args.lr_schedule, mode="fast", remask=True, checkpoint_every=200, init=args.init))
        report["pretraining_wall_seconds"] = time.perf_counter() - start
    report["pretraining"] = pretraining_figures(pretrained)
    # the random baseline starts where the pretraining started (torch's defaults and Xavier differ by
    # points of SNLI accuracy on their own); checkpoints from before --init existed used the book's
    init = (report["pretraining"] or {}).get("hyperparameters", {}).get("init", "book")
    report["pretrained_source"] = pretrained
    source_format = describe_checkpoint(pretrained).format
    if source_format != args.backend:  # e.g. a torch pretraining fine-tuned in MXNet
        pretrained = jobs.run_convert(pretrained, os.path.join(args.out, f"pretrained-{args.backend}"), args.backend)
    report["pretrained_checkpoint"] = pretrained
    report["converted_from"] = source_format if source_format != args.backend else None

    snli = os.path.join(args.out, "snli-dev")  # a folder with only the dev file: run_finetune splits it 90/10
    os.makedirs(snli, exist_ok=True)
    shutil.copyfile(args.snli_dev or dev_file(), os.path.join(snli, "snli_1.0_dev.txt"))

    report["fine_tune"] = {"epochs": args.epochs, "batch_size": args.batch_size, "max_len": args.max_len,
                           "lr": args.lr, "dropout": args.dropout, "train_limit": args.train_limit, "mode": "fast"}
    report["runs"] = []
    for seed in args.seeds:
        random_init = build_random_checkpoint(args.backend, pretrained,
                                              os.path.join(args.out, f"random-init-{seed}"), seed, init)
        row = {"seed": seed}
        for name, checkpoint in (("pretrained", pretrained), ("random_init", random_init)):
            print(f"--- fine-tune {args.backend} from {name} ({checkpoint}), seed {seed}")
            start = time.perf_counter()
            metrics = jobs.run_finetune(FinetuneSettings(
                backend=args.backend, pretrained=checkpoint, data=snli, max_len=args.max_len,
                batch_size=args.batch_size, lr=args.lr, epochs=args.epochs, train_limit=args.train_limit,
                seed=seed, device="cpu", out=os.path.join(args.out, f"finetune-{name}-{seed}"),
                dropout=args.dropout, mode="fast", cache_dir=os.path.join(args.out, "packed")))
            row[name] = {"test_acc": metrics["test_acc"], "train_acc": metrics["epochs"][-1]["train_acc"],
                         "loss": metrics["epochs"][-1]["loss"], "num_train": metrics["num_train"],
                         "num_test": metrics["num_test"], "wall_seconds": time.perf_counter() - start,
                         "test_acc_per_epoch": [e["test_acc"] for e in metrics["epochs"]]}
        row["difference"] = row["pretrained"]["test_acc"] - row["random_init"]["test_acc"]
        report["runs"].append(row)

    print()
    p = report["pretraining"]
    if p is not None:
        h = p["hyperparameters"]
        print(f"pretraining ({p['backend']}): {p['steps']} steps, batch {h['batch_size']}, max_len {h['max_len']}, "
              f"lr {h['lr']}, warm-up {h.get('warmup_steps', 0)}, schedule {h.get('lr_schedule', h.get('lr_decay', 'constant'))}, "
              f"mode {h.get('mode', 'book')}, remask {h.get('remask', False)}, {p['num_pairs']} pairs, "
              f"vocab {p['vocab_size']}")
        print(f"  MLM loss {p['mlm_loss_last_10pct']:.3f}, NSP loss {p['nsp_loss_last_10pct']:.3f} "
              f"(last 10% of steps; step 1: {p['first_step']['mlm_loss']:.3f}, {p['first_step']['nsp_loss']:.3f}), "
              f"{p['sentence_pairs_per_sec']:.1f} sentence pairs/sec, {p['timed_seconds'] / 60:.1f} min timed")
    if report["converted_from"]:
        print(f"  checkpoint converted from {report['converted_from']} to {args.backend}")
    first = report["runs"][0]["pretrained"]
    print(f"fine-tune ({args.backend}, fast mode): SNLI dev split 90/10, {first['num_train']} train / "
          f"{first['num_test']} test pairs, {args.epochs} epochs, batch {args.batch_size}, max_len {args.max_len}, "
          f"lr {args.lr}")
    print(f"{'seed':>4s} {'pretrained':>10s} {'random init':>11s} {'difference':>10s}")
    for row in report["runs"]:
        print(f"{row['seed']:4d} {row['pretrained']['test_acc']:10.3f} {row['random_init']['test_acc']:11.3f} "
              f"{row['difference']:+10.3f}")
    if len(report["runs"]) > 1:
        mean = {k: np.mean([r[k]["test_acc"] for r in report["runs"]]) for k in ("pretrained", "random_init")}
        print(f"{'mean':>4s} {mean['pretrained']:10.3f} {mean['random_init']:11.3f} "
              f"{mean['pretrained'] - mean['random_init']:+10.3f}")
        low, high = seed_interval([100 * row["difference"] for row in report["runs"]])
        report["difference_95pct_t_interval_pts"] = [low, high]
        verdict = "pretraining pays" if low > 0 else "not shown" if high > 0 else "pretraining hurts"
        print(f"95% t-interval of the mean difference over seeds: [{low:+.1f}, {high:+.1f}] points ({verdict})")
    from nlibert.core.io import write_json
    write_json(os.path.join(args.out, "worth.json"), report)
    print(f"wrote {os.path.join(args.out, 'worth.json')}")


if __name__ == "__main__":
    main()
