"""Fine-tuning throughput: the book-faithful path against the fast path, side by side, in one run.

    python benchmarks/bench_finetune.py                       # every backend, CPU, ~10 minutes here
    python benchmarks/bench_finetune.py --rounds 2            # alternate the paths twice: fairer on a shared CPU
    python benchmarks/bench_finetune.py --backend torch --device cuda --steps 200 --book-steps 50
    python benchmarks/bench_finetune.py --ablation            # every lever on its own
    python benchmarks/bench_finetune.py --nproc 2             # also: each path as a job of 2 processes
    python benchmarks/bench_finetune.py --nproc 8 --device cuda:0,cuda:1,...,cuda:7   # 1 GPU vs 8, both ways
    python benchmarks/bench_finetune.py --e2e 2000            # also: `nlibert finetune` on MiniLM, wall time
    python benchmarks/bench_finetune.py --e2e-only --backend jax   # only that, JAX beside torch (~3 min here)

Both paths train bert.small's shape (vocabulary 20,256, 256 hidden, 4 heads, 2 layers) on batches
of 512 with max_len 128, drawn from SNLI's length distribution (the dev file tiled to the size of
SNLI's training split), with Adam at the chapter's lr:

- book: every batch padded to max_len, the book's attention (masked softmax with -1e6), and the
  book's `train_batch_ch13`, which reads the loss and accuracy back after every batch;
- fast: length-bucketed batches trimmed to their longest pair (`bucket_batch_indices`, `trim`),
  fused attention (`set_fused_attention`), the last block computed at <cls> only (`cls_only`), fused
  Adam (torch), `FinetuneStep` with the sums kept on the device and read once (as `train_fast`).

Each (backend, path) runs in its own process, so memory is measured cleanly and MXNet's import does
not change torch's threads. After a warm-up, a fixed number of steps is timed from the first batch
fetch to the last result on the host (every device synchronised); examples/sec = examples / seconds,
and "x book" is the fast path's examples/sec over the book path's, PASS at 10x or more.

`--nproc N` then times each path (book and fast, same global batch) on one process and one device,
as a job of N processes with one device each (torch's DistributedDataParallel, MXNet's dist_sync
kvstore, jax.distributed; started as `nlibert --nproc` starts them, on 127.0.0.1), and, when
--device lists several GPUs, as the book's one process driving them all (DataParallel /
split_and_load; JAX's one process shards over them). Scaling
efficiency = examples/sec / (devices x the one-device examples/sec). On a CPU the processes share
the same cores: the figure is a smoke test of the path, not a result.

Model-FLOP utilisation (MFU) = useful FLOPs per second / peak FLOPs per second of the precision used.
Useful FLOPs count each example's valid tokens only (`_common.training_flops`: per example of valid
length L, 6 * (layers * (4 L H^2 + 2 L^2 H + 2 L H F) + H^2 + 3 H)), the same for both paths. The peak
is a large matmul timed in the same run, framework and precision (times the number of GPUs used);
on the CPU the issue's stated peaks (150 GFLOP/s float32, 410 bfloat16) give a second MFU column.
"executed" counts what a path computes: padded positions included, and the last block at <cls> only
for `cls_only` (so it can fall below the useful FLOPs).

"warm-up s" is the untimed time before the timer: the warm-up steps, and for JAX compiling the
step for every padded shape the timed steps see. `--e2e N` also times the whole `nlibert finetune
--pretrained minilm-l6` command on N training and N/4 test pairs of the dev file, each backend
beside torch's wall time, with the programs JAX compiled and their seconds (metrics.json's fast_path).

Peak memory is how far the process's resident set grew above its size before the first training
step (model, optimizer and data already built), over the warm-up and timed steps (CPU); on CUDA the
peak allocated device memory over those steps (torch, summed over devices), or the device memory in
use after them (MXNet, which keeps no peak counter).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BERT_SMALL, SNLI_TRAIN_PAIRS, cpu_model, dev_file, loadavg  # noqa: E402
from _finetune_children import VARIANTS, child_main  # noqa: E402
from nlibert.backends import BACKENDS  # noqa: E402  (the registry: imports no framework)

DEFAULT_VARIANTS = ["book", "fast"]
TARGET_RATIO = 10.0  # issue 6: the fast path at least 10x the book path's examples/sec
# The issue's measured matmul peaks of its 2-core CPU, printed beside the peaks measured in the run.
ISSUE_CPU_PEAKS = {"float32": 150e9, "bfloat16": 410e9}
ABLATION_VARIANTS = ["book", "trim only", "bucketing", "bucketing + fused attn", "fast", "fast + bfloat16",
                     "fast + graph (x8 widths)", "fast + graph"]


# --- the parent ---------------------------------------------------------------------------------

def run_child(spec, timeout=3600):
    env = dict(os.environ)
    if spec.get("omp_wait_policy", "default") != "default":
        env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"]
    mode = "--launch" if spec.get("nproc", 1) > 1 else "--child"  # a job of several processes, or one
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), mode, json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child {spec} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def launch_job(spec) -> int:
    """`--launch`: the spec's child as a job of `spec['nproc']` processes, started as `nlibert
    --nproc` starts them (the backend's engine, on 127.0.0.1); rank 0 prints the result."""
    from nlibert.backends import load_backend
    from nlibert.core.distributed import free_port, launch
    processes = load_backend(spec["backend"]).launch_processes(spec["nproc"], free_port())
    return launch([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], processes)


def run_scaling(args, base: dict, backends: list[str], paths: list[str]) -> dict:
    """`--nproc N`: each path on one process (one device) and as a job of N processes (one device
    each: torch's DistributedDataParallel, MXNet's dist_sync kvstore, jax.distributed), plus the
    book's own way to use several GPUs, one process driving them all (DataParallel, split_and_load), when --device
    lists several; examples/sec and the scaling efficiency, rate / (devices x one-device rate).
    `paths`: those of book and fast that --variants names."""
    devices = [d.strip() for d in args.device.split(",")]
    gpus = [d for d in devices if not d.startswith("cpu")]
    threads = args.threads if gpus else max(1, args.threads // args.nproc)  # CPU processes share the cores
    report = {}
    print(f"\n== scaling: {args.nproc} processes, device {args.device}, batch {args.batch_size} (global) ==")
    if not gpus:
        print(f"(on a CPU the {args.nproc} processes share {os.cpu_count()} cores, {threads} thread(s) each: "
              "a smoke test of the distributed path, not a scaling result)")
    header = f"{'backend':8s} {'path':5s} {'configuration':28s} {'examples/s':>10s} {'efficiency':>10s}"
    print(header)
    print("-" * len(header))
    for backend in backends:
        report[backend] = {}
        for variant in paths:
            steps = args.book_steps if variant == "book" else args.steps
            spec = dict(base, kind="train", backend=backend, variant=variant, steps=steps,
                        warmup=1 if variant == "book" else args.warmup)
            one = run_child(dict(spec, device=devices[0], nproc=1))
            runs = [("1 process, 1 device", one, 1),
                    (f"{args.nproc} processes", run_child(dict(spec, nproc=args.nproc, threads=threads)), args.nproc)]
            if len(gpus) > 1:
                runs.append((f"1 process, {len(gpus)} GPUs (book's way)", run_child(dict(spec, nproc=1)), len(gpus)))
            rows = report[backend][variant] = []
            for name, run, scale in runs:
                efficiency = run["examples_per_sec"] / (scale * one["examples_per_sec"])
                rows.append({"configuration": name, "examples_per_sec": run["examples_per_sec"],
                             "efficiency": efficiency, "devices": run["devices"], "processes": run["processes"]})
                print(f"{backend:8s} {variant:5s} {name:28s} {run['examples_per_sec']:10.1f} {efficiency:10.1%}")
    return report


def run_end_to_end(backends: list[str], pairs: int, tmp: str) -> dict:
    """`--e2e N`: the same `nlibert finetune` MiniLM command in every backend, one after the other;
    wall seconds, the ratio to torch's, and what the run compiled (JAX's metrics.json records it)."""
    report, command = {}, ["--pretrained", "minilm-l6", "--data", str(dev_file().parent), "--train-limit",
                           str(pairs), "--test-limit", str(max(1, pairs // 4)), "--max-len", "128",
                           "--batch-size", "32", "--lr", "5e-5", "--epochs", "1", "--seed", "0"]
    print(f"\n== end to end: nlibert finetune {' '.join(command)} (load average {loadavg()}) ==")
    print(f"{'backend':8s} {'wall s':>8s} {'x torch':>8s} {'examples/s':>10s} {'compiles':>8s} {'compile s':>9s}")
    for backend in sorted(backends, key=lambda b: b != "torch"):  # torch first: the others' yardstick
        out = os.path.join(tmp, f"e2e-{backend}")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "nlibert.cli", "finetune", "--backend", backend, "--out", out,
                               *command], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"{backend:8s} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
            continue
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
        fast = metrics.get("fast_path", {})
        ratio = wall / report["torch"]["wall_seconds"] if "torch" in report else None
        report[backend] = {"wall_seconds": wall, "ratio_to_torch": ratio,
                           "examples_per_sec": metrics["epochs"][-1]["examples_per_sec"],
                           "compiles": fast.get("compiles"), "compile_seconds": fast.get("compile_seconds")}
        r = report[backend]
        print(f"{backend:8s} {wall:8.1f} {f'{ratio:.2f}x' if ratio else 'n/a':>8s} {r['examples_per_sec']:10.1f} "
              f"{r['compiles'] if r['compiles'] is not None else '-':>8} "
              f"{r['compile_seconds'] if r['compile_seconds'] is not None else '-':>9}")
    print(f"(load average now {loadavg()})")
    return report


def fmt_bytes(n):
    if n is None:
        return "n/a"
    return f"{n / 2**20:,.0f} MiB"


def print_overview(backends: dict, args) -> None:
    """One line per backend: both paths side by side, the ratio and the verdict against 10x."""
    rows = [(name, b["variants"]) for name, b in backends.items()
            if "book" in b.get("variants", {}) and "fast" in b.get("variants", {})]
    if not rows:
        return
    print()
    print(f"== summary: batch {args.batch_size}, max_len {args.max_len}, device {args.device} ==")
    header = (f"{'backend':8s} {'book ex/s':>10s} {'fast ex/s':>10s} {'fast/book':>10s} {'verdict':>7s} "
              f"{'MFU book':>9s} {'MFU fast':>9s} {'mem book':>10s} {'mem fast':>10s} {'warm-up fast':>12s}")
    print(header)
    print("-" * len(header))
    for name, v in rows:
        book, fast = v["book"], v["fast"]
        verdict = "PASS" if fast["ratio_to_book"] >= TARGET_RATIO else "FAIL"
        print(f"{name:8s} {book['examples_per_sec']:10.1f} {fast['examples_per_sec']:10.1f} "
              f"{fast['ratio_to_book']:9.2f}x {verdict:>7s} {book['mfu']:9.1%} {fast['mfu']:9.1%} "
              f"{fmt_bytes(book['peak_mem_bytes']):>10s} {fmt_bytes(fast['peak_mem_bytes']):>10s} "
              f"{fast['warmup_seconds']:11.1f}s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=(*BACKENDS, "all"), default="all")
    parser.add_argument("--device", default="cpu", help="cpu, cuda (every GPU) or a list like cuda:0,cuda:1")
    parser.add_argument("--steps", type=int, default=24, help="timed steps of the fast paths")
    parser.add_argument("--book-steps", type=int, default=3, help="timed steps of the book path (about 15x slower)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (more for --graph variants)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=SNLI_TRAIN_PAIRS,
                        help="tile the dev file to about this many pairs (default: SNLI's training split)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per framework")
    parser.add_argument("--omp-wait-policy", choices=("default", "PASSIVE", "ACTIVE"), default="PASSIVE",
                        help="OMP_WAIT_POLICY for every path's process (default PASSIVE: idle OpenMP threads "
                             "sleep instead of spinning, which keeps a CPU shared with other jobs usable; "
                             "'default' leaves the environment alone)")
    parser.add_argument("--ablation", action="store_true",
                        help="also time each lever alone: trim only, bucketing with the book's attention, "
                             "bfloat16 autocast, torch.compile / hybridize")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole set, alternating paths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-size", type=int, default=None,
                        help="n of the n x n x n matmul timed for the peak (default 4096 on a CPU, 8192 on a GPU)")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    parser.add_argument("--nproc", type=int, default=None,
                        help="also time each path as a job of N processes (torch DDP, MXNet's kvstore) against one "
                             "process, and print the scaling efficiency")
    parser.add_argument("--e2e", type=int, default=None, metavar="N",
                        help="also time `nlibert finetune --pretrained minilm-l6` on N training pairs in every backend")
    parser.add_argument("--e2e-only", action="store_true",
                        help="time only that command (N from --e2e, else 2,000), in --backend and torch; no throughput runs")
    args = parser.parse_args(argv)

    from nlibert.core.snli import read_snli_file
    num_dev = len(read_snli_file(dev_file())[2])
    tile = max(1, round(args.pairs / num_dev))
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    if args.e2e_only:  # torch as the yardstick, then the backend asked for
        with tempfile.TemporaryDirectory() as tmp:
            report = {"args": vars(args), "backends": {},
                      "end_to_end": run_end_to_end(sorted(set(backends) | {"torch"}), args.e2e or 2000, tmp)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return report
    variants = args.variants or (ABLATION_VARIANTS if args.ablation else DEFAULT_VARIANTS)
    base = dict(device=args.device, batch_size=args.batch_size, max_len=args.max_len, tile=tile,
                threads=args.threads, seed=args.seed, warmup=args.warmup, omp_wait_policy=args.omp_wait_policy,
                peak_size=args.peak_size)
    on_cpu = all(part.strip().startswith("cpu") for part in args.device.split(","))
    print(f"nlibert fine-tuning benchmark: bert.small shape (vocab {BERT_SMALL['vocab_size']:,}, "
          f"{BERT_SMALL['num_hiddens']} hidden, {BERT_SMALL['num_heads']} heads, {BERT_SMALL['num_layers']} layers), "
          f"batch {args.batch_size}, max_len {args.max_len}")
    print(f"data: SNLI dev x{tile} = {num_dev * tile:,} pairs; device {args.device}; {args.threads} threads on "
          f"{os.cpu_count()} cores ({cpu_model()}), OMP_WAIT_POLICY {args.omp_wait_policy}; "
          f"load average {loadavg()}")
    report = {"args": vars(args), "tile": tile, "backends": {}}
    for backend in backends:
        precisions = ["float32"] + (["bfloat16"] if backend == "torch" and "fast + bfloat16" in variants else [])
        try:
            peaks = {p: run_child(dict(base, kind="peak", backend=backend, precision=p)) for p in precisions}
            results = {v: [] for v in variants}
            for _ in range(args.rounds):
                for variant in variants:
                    steps = args.book_steps if VARIANTS[variant][2] == "book" else args.steps
                    warmup = 1 if VARIANTS[variant][2] == "book" else args.warmup
                    results[variant].append(run_child(dict(base, kind="train", backend=backend, variant=variant,
                                                           steps=steps, warmup=warmup)))
        except RuntimeError as error:  # e.g. --device cuda with a CPU-only MXNet: report, go on to the next backend
            print(f"\n== {backend} == failed: {error}")
            report["backends"][backend] = {"error": str(error)}
            continue
        print()
        stated = ", ".join(f"{peak / 1e9:.0f} GFLOP/s {precision}" for precision, peak in ISSUE_CPU_PEAKS.items())
        print(f"== {backend} ==  peak matmul measured now: " + ", ".join(
            f"{p['flops_per_sec'] / 1e9:,.0f} GFLOP/s ({p['what']})" for p in peaks.values())
            + (f"; the issue's stated peaks: {stated}" if on_cpu else ""))
        header = (f"{'path':24s} {'examples/s':>10s} {'x book':>7s} {'width':>6s} {'useful GFLOP/s':>14s} "
                  f"{'MFU':>6s} {'MFU@issue':>9s} {'executed GFLOP/s':>16s} {'peak mem':>10s} {'warm-up s':>9s}")
        print(header)
        print("-" * len(header))
        book_rate = None
        summary = {}
        for variant in variants:
            runs = [r for r in results[variant] if "skipped" not in r]
            if not runs:
                print(f"{variant:24s} skipped: {results[variant][0]['skipped']}")
                continue
            examples = sum(r["examples"] for r in runs)
            seconds = sum(r["seconds"] for r in runs)
            rate = examples / seconds
            if variant == "book":
                book_rate = rate
            precision = VARIANTS[variant][3]
            # The peak was timed on one device; the run uses num_devices of them.
            peak = peaks.get(precision, peaks["float32"])["flops_per_sec"] * runs[0].get("num_devices", 1)
            useful = sum(r["useful_flops"] for r in runs) / seconds
            executed = sum(r["executed_flops"] for r in runs) / seconds
            mfu_issue = useful / ISSUE_CPU_PEAKS[precision] if on_cpu else None
            width = np.mean([r["mean_width"] for r in runs])
            mem = max((r["cuda_peak_bytes"] if r["cuda_peak_bytes"] is not None else r["peak_mem_bytes"])
                      for r in runs)
            ratio = rate / book_rate if book_rate else None
            warmup = float(np.mean([r["warmup_seconds"] for r in runs]))
            print(f"{variant:24s} {rate:10.1f} {f'{ratio:6.2f}x' if ratio else 'n/a':>7s} {width:6.1f} "
                  f"{useful / 1e9:14.1f} {useful / peak:6.1%} "
                  f"{f'{mfu_issue:.1%}' if mfu_issue is not None else 'n/a':>9s} {executed / 1e9:16.1f} "
                  f"{fmt_bytes(mem):>10s} {warmup:9.1f}")
            summary[variant] = {"warmup_seconds": warmup, "examples_per_sec": rate, "ratio_to_book": ratio,
                                "mean_width": width,
                                "useful_flops_per_sec": useful, "mfu": useful / peak, "mfu_issue_peak": mfu_issue,
                                "executed_flops_per_sec": executed, "peak_mem_bytes": mem, "runs": runs}
        valid = np.mean([r["mean_valid_len"] for rs in results.values() for r in rs if "mean_valid_len" in r])
        print(f"(mean valid length {valid:.1f} tokens; examples/s over {args.book_steps} book and {args.steps} "
              f"other timed steps x {args.rounds} round(s); MFU = useful FLOP/s / measured peak of the same "
              f"precision, MFU@issue against the issue's stated peak; load average now {loadavg()})")
        if "book" in summary and "fast" in summary:
            ratio = summary["fast"]["ratio_to_book"]
            verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
            print(f"{backend}: fast / book = {ratio:.2f}x: {verdict} (target >= {TARGET_RATIO:.0f}x)")
        report["backends"][backend] = {"peaks": peaks, "variants": summary}
    print_overview(report["backends"], args)
    if args.nproc:
        report["scaling"] = run_scaling(args, base, backends, [v for v in ("book", "fast") if v in variants])
    if args.e2e:
        with tempfile.TemporaryDirectory() as tmp:
            report["end_to_end"] = run_end_to_end(backends, args.e2e, tmp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--launch":
        sys.exit(launch_job(json.loads(sys.argv[2])))
    else:
        report = main()
        sys.exit(1 if any("error" in b for b in report["backends"].values()) else 0)
