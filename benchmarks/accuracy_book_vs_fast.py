"""Accuracy check: `nlibert finetune --mode book` and `--mode fast`, same data, seed and epochs, side by side.

    python benchmarks/accuracy_book_vs_fast.py                        # both backends, ~12 minutes here
    python benchmarks/accuracy_book_vs_fast.py --pretrained minilm-l6 --train-limit 8858 --epochs 1 \
        --batch-size 32 --lr 5e-5 --max-len 64 --seeds 0 1 2            # the README's figures
    python benchmarks/accuracy_book_vs_fast.py --pretrained minilm-l6 --dropout 0 --no-bucketing ...

Runs the `finetune` job itself (`nlibert.jobs.run_finetune`) in both modes on the SNLI dev file split
90/10 with the seed (train on a seeded subset of the 90%, test on all of the 10%), from `--pretrained`
(default: one seeded random bert.small-shaped checkpoint per backend), and prints both test
accuracies and their difference in points. `--dropout 0 --no-bucketing` leaves the two modes only
their kernels to differ by (the fast path on the book's batches): they should then agree pair for
pair. The fast path passes when it is within `--tolerance` points (0.5) of the book path.

It then reloads both fine-tuned models and predicts the same test pairs (the test split as the job packs
it, `core.sources.snli_packed`), checks that this reproduces each run's reported test accuracy, and prints a paired
comparison: how many pairs the two models label differently, and a 95% confidence interval of the paired
accuracy difference (from the discordant pairs). That interval is the resolution of the test: a |diff|
within tolerance whose interval is wider than +-tolerance says the paths agree to within the interval,
not to within the tolerance.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import dev_file, seed_interval  # noqa: E402
from nlibert.backends import BACKENDS  # noqa: E402  (the registry: imports no framework)


def paired_difference(labels, book_pred, fast_pred, z: float = 1.96) -> dict:
    """Paired comparison of two classifiers on the same examples (all in points where noted).

    b = book right & fast wrong, c = fast right & book wrong (the discordant pairs), n pairs:
    diff = (c - b) / n, se = sqrt(b + c - (c - b)^2 / n) / n, CI = diff +- z * se.
    `disagree` counts the pairs whose predicted labels differ (b + c plus those both get wrong differently)."""
    labels, book_pred, fast_pred = (np.asarray(a).ravel() for a in (labels, book_pred, fast_pred))
    if not (len(labels) == len(book_pred) == len(fast_pred)) or len(labels) == 0:
        raise ValueError(f"need equal, non-empty lengths: {len(labels)}, {len(book_pred)}, {len(fast_pred)}")
    n = len(labels)
    book_ok, fast_ok = book_pred == labels, fast_pred == labels
    b, c = int(np.sum(book_ok & ~fast_ok)), int(np.sum(fast_ok & ~book_ok))
    diff = (c - b) / n
    se = float(np.sqrt(max(b + c - (c - b) ** 2 / n, 0.0)) / n)
    return {"n": n, "book_acc": float(book_ok.mean()), "fast_acc": float(fast_ok.mean()),
            "diff_pts": 100 * diff, "disagree": int(np.sum(book_pred != fast_pred)), "b": b, "c": c,
            "se_pts": 100 * se, "ci_pts": (100 * (diff - z * se), 100 * (diff + z * se))}


def predict_labels(backend, model_dir: str, devices, test_set, chunk: int = 256) -> np.ndarray:
    """Reload a fine-tuned model folder and predict `test_set`'s pairs in order, `chunk` rows at a time,
    each chunk trimmed to its longest pair (the masked padding beyond it changes nothing)."""
    net, _, _ = backend.load_classifier(model_dir, devices)
    preds = []
    for i in range(0, len(test_set.valid_lens), chunk):
        lens = test_set.valid_lens[i:i + chunk]
        width = int(lens.max())
        probs = backend.predict_proba(net, test_set.all_token_ids[i:i + chunk, :width],
                                      test_set.all_segments[i:i + chunk, :width], lens, devices)
        preds.append(np.argmax(probs, axis=1))
    return np.concatenate(preds)


def paired_check(backend_name: str, seed: int, results: dict, args, out: str) -> dict:
    """Both fine-tuned models on the same test pairs: accuracies recomputed, checked against the runs'
    `test_acc`, and `paired_difference` of the two."""
    from nlibert.backends import load_backend
    from nlibert.core.sources import snli_packed, snli_source
    backend = load_backend(backend_name)
    devices = backend.parse_devices(args.device)
    preds, test_set = {}, None
    for mode in ("book", "fast"):
        _, vocab, cfg = backend.load_classifier(results[mode]["model_dir"], devices)
        if test_set is None:
            source = snli_source(args.data, os.path.join(out, f"{backend_name}-{mode}-{seed}"), seed)
            _, test_set, _ = snli_packed(source, seed, vocab, args.max_len, args.train_limit, args.test_limit,
                                         os.path.join(out, "packed"))
        preds[mode] = predict_labels(backend, results[mode]["model_dir"], devices, test_set)
    paired = paired_difference(test_set.labels, preds["book"], preds["fast"])
    for mode in ("book", "fast"):
        recomputed, reported = paired[f"{mode}_acc"], results[mode]["test_acc"]
        paired[f"{mode}_matches_run"] = abs(recomputed - reported) <= 1e-9
        if not paired[f"{mode}_matches_run"]:
            print(f"WARNING {backend_name} {mode}: reloaded model gives test acc {recomputed:.6f} on "
                  f"{paired['n']} pairs, the run reported {reported:.6f} on {results[mode]['num_test']}")
    return paired


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=(*BACKENDS, "both"), default="both")
    parser.add_argument("--data", default=str(dev_file().parent),
                        help="an SNLI-format folder (default: the shared one, dev file only, split 90/10)")
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128,
                        help="default 128: 16 steps an epoch on 2000 pairs, enough for a randomly initialised "
                             "model to learn something (the chapter's 512 leaves 4)")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--bucketing", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-bucketing: the fast path trains on the book path's batches (trimmed); with "
                             "--dropout 0 the two paths then differ by rounding only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pretrained", default=None, help="a checkpoint folder (default: a seeded random one)")
    parser.add_argument("--tolerance", type=float, default=0.5, help="allowed |fast - book| in accuracy points")
    parser.add_argument("--out", default=None, help="keep the runs' folders here (default: a temporary folder)")
    args = parser.parse_args(argv)

    from nlibert import jobs
    from nlibert.backends import load_backend
    from nlibert.core.settings import FinetuneSettings
    from nlibert.core.sources import snli_source, snli_texts
    backends = list(BACKENDS) if args.backend == "both" else [args.backend]
    out = args.out or tempfile.mkdtemp(prefix="nlibert-accuracy-")
    rows = []
    for backend_name in backends:
        for seed in args.seeds:
            pretrained = args.pretrained
            if pretrained is None:  # one seeded checkpoint for both modes
                backend = load_backend(backend_name)
                train, _ = snli_texts(snli_source(args.data, out, seed), seed, args.train_limit)
                pretrained = jobs.build_seeded_checkpoint(backend, os.path.join(out, f"seeded-{backend_name}-{seed}"),
                                                          jobs.seeded_vocab(train[0] + train[1]), seed)
            results = {}
            for mode in ("book", "fast"):
                print(f"--- {backend_name}, {mode} mode, seed {seed}")
                start = time.perf_counter()
                metrics = jobs.run_finetune(FinetuneSettings(
                    backend=backend_name, pretrained=pretrained, data=args.data, max_len=args.max_len,
                    batch_size=args.batch_size, lr=args.lr, epochs=args.epochs, train_limit=args.train_limit,
                    test_limit=args.test_limit, seed=seed, device=args.device, mode=mode,
                    dropout=args.dropout, bucketing=args.bucketing,
                    out=os.path.join(out, f"{backend_name}-{mode}-{seed}"),
                    cache_dir=os.path.join(out, "packed")))
                metrics["wall_seconds"] = time.perf_counter() - start
                results[mode] = metrics
            results["paired"] = paired_check(backend_name, seed, results, args, out)
            rows.append((backend_name, seed, results))

    print()
    print(f"SNLI dev split 90/10 (train limit {args.train_limit}, test {rows[0][2]['book']['num_test']} pairs), "
          f"{args.epochs} epochs, batch {args.batch_size}, max_len {args.max_len}, lr {args.lr}, "
          f"dropout {args.dropout}, fast path {'bucketed' if args.bucketing else 'on the book batches'}")
    header = (f"{'backend':8s} {'seed':>4s} {'mode':5s} {'test acc':>9s} {'train acc':>9s} {'loss':>7s} "
              f"{'train ex/s':>10s} {'wall s':>7s} {'fast - book':>12s}")
    print(header)
    print("-" * len(header))
    ok = True
    for backend_name, seed, results in rows:
        diff = 100 * (results["fast"]["test_acc"] - results["book"]["test_acc"])
        ok &= abs(diff) <= args.tolerance
        for mode in ("book", "fast"):
            m = results[mode]
            last = m["epochs"][-1]
            rate = sum(e["num_examples"] for e in m["epochs"]) / sum(e["seconds"] for e in m["epochs"])
            note = f"{diff:+.2f} pts" if mode == "fast" else ""
            print(f"{backend_name:8s} {seed:4d} {mode:5s} {m['test_acc']:9.4f} {last['train_acc']:9.4f} "
                  f"{last['loss']:7.3f} {rate:10.1f} {m['wall_seconds']:7.1f} {note:>12s}")
    print()
    print("Paired: both reloaded models on the same test pairs (b = book right & fast wrong, c = fast right "
          "& book wrong)")
    ci_ok = True
    for backend_name, seed, results in rows:
        p = results["paired"]
        inside = -args.tolerance <= p["ci_pts"][0] and p["ci_pts"][1] <= args.tolerance
        ci_ok &= inside
        match = ("matches" if p["book_matches_run"] and p["fast_matches_run"] else "DOES NOT match")
        print(f"{backend_name} seed {seed}: n {p['n']}, book {100 * p['book_acc']:.2f}%, "
              f"fast {100 * p['fast_acc']:.2f}% ({match} the runs' test_acc to 1e-9), "
              f"fast - book {p['diff_pts']:+.2f} points; disagree on {p['disagree']} pairs "
              f"(b {p['b']}, c {p['c']}); 95% CI of the difference [{p['ci_pts'][0]:+.2f}, "
              f"{p['ci_pts'][1]:+.2f}] points, {'inside' if inside else 'NOT inside'} +-{args.tolerance}")
    print(f"The confidence interval is the resolution of this test: "
          f"{'it lies within' if ci_ok else 'it does not lie within'} +-{args.tolerance} points, so "
          + ("the paths are shown equal to within the tolerance." if ci_ok else
             "the PASS/FAIL on |diff| below resolves nothing finer than the interval's width."))
    verdicts = []
    for backend_name in backends:
        runs = [results for name, _, results in rows if name == backend_name]
        book = np.array([r["book"]["test_acc"] for r in runs]) * 100
        fast = np.array([r["fast"]["test_acc"] for r in runs]) * 100
        diff = float(fast.mean() - book.mean())
        verdicts.append(abs(diff) <= args.tolerance)
        spread = ""
        if len(runs) > 1:  # the seeds' own spread: training noise, which the paired CI above leaves out
            low, high = seed_interval(fast - book)
            spread = (f", seed-to-seed std: book {book.std(ddof=1):.2f}, fast {fast.std(ddof=1):.2f}; "
                      f"95% t-interval of the mean difference over seeds [{low:+.2f}, {high:+.2f}]")
        print(f"{backend_name}: mean test acc over {len(runs)} seed(s): book {book.mean():.2f}%, "
              f"fast {fast.mean():.2f}%, fast - book {diff:+.2f} points{spread}")
    if len(args.seeds) > 1:
        ok = all(verdicts)
        print(f"{'PASS' if ok else 'FAIL'}: mean fast within {args.tolerance} points of mean book "
              f"(folders under {out})")
    else:
        print(f"{'PASS' if ok else 'FAIL'}: fast within {args.tolerance} points of book (folders under {out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
