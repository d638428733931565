"""What the JAX fine-tuning step costs to compile, and what its steps cost after: MiniLM's shape, one run.

    python benchmarks/bench_jax_compile.py                    # widths 64 then 32: before and after
    python benchmarks/bench_jax_compile.py --widths 128,64,32 --steps 10 --repeat 2
    python benchmarks/bench_jax_compile.py --variants before,staged,options,after

Builds the classifier `nlibert finetune --pretrained minilm-l6` trains on the fast path (vocabulary
30,522, H 384, F 1,536, 12 heads, 6 layers, GELU, BERT's embedding LayerNorm; fused attention, the
last block at <cls> only) with random parameters and Adam, on one CPU device; then runs a first
step of `--rows` x each of `--widths` (each compiles what that shape needs: tracing, lowering and
XLA, as `FinetuneStep.compiles` counts them), evaluation at the first width, and `--steps` more
steps at the first width. Each variant runs in a process of its own, one after the other
(`--repeat` times over):

- before: the step as one program (`train._train_function`, as before issue 28), XLA's default options;
- staged: on one CPU device the step as staged programs (`_programs._staged_train_function`), default options;
- options: the step as one program, `_programs.CPU_COMPILER_OPTIONS`;
- after: staged and options (what the backend does on one CPU device).

Seconds are wall time and CPU time of the process (all its threads); on a CPU shared with other
work the CPU seconds move less. Step figures: the fastest step after the first, the median wall
time and the median CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO_PARENT = str(__import__("pathlib").Path(__file__).resolve().parents[2])
sys.path.insert(0, REPO_PARENT)

MINILM = dict(vocab_size=30522, num_hiddens=384, ffn_num_hiddens=1536, num_heads=12, num_layers=6, dropout=0.1,
              max_len=512, hidden_act="gelu", layer_norm_eps=1e-12, embedding_norm=True)
VARIANTS = {"before": (False, False), "staged": (True, False), "options": (False, True), "after": (True, True)}


def _batch(rows: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(width // 2, width + 1, rows)
    tokens = np.where(np.arange(width) < lens[:, None], rng.integers(5, MINILM["vocab_size"], (rows, width)), 0)
    segments = (np.arange(width) >= lens[:, None] // 2).astype(np.int64) * (tokens > 0)
    return (tokens, segments, lens.astype(np.float32)), rng.integers(0, 3, rows)


def measure(rows: int, widths: list[int], steps: int, staged: bool, options: bool) -> dict:
    import jax
    from nlibert.backends.jax import _programs, model, runtime, train

    from nlibert.core.config import BERTConfig

    if not options:
        _programs.CPU_COMPILER_OPTIONS = None  # XLA's defaults
    runtime.set_seed(0)
    bert = model.BERTModel.from_config(BERTConfig(**MINILM), fused_attention=True)
    net = model.BERTClassifier(bert, cls_only=True, num_classes=3)
    trainer = runtime.make_trainer(net, 5e-5)
    step = train.FinetuneStep(net, runtime.make_loss(), trainer, [jax.devices("cpu")[0]])
    if not staged:  # the whole step as one program, as on several devices
        step.train = train._train_function(net.module, runtime.make_loss(), trainer.tx, False)
    figures: dict = {}

    def timed(name, f):
        before, start, cpu = step.compiles, time.perf_counter(), time.process_time()
        result = f()
        figures[f"{name} s"] = time.perf_counter() - start
        figures[f"{name} cpu s"] = time.process_time() - cpu
        figures[f"{name} programs"] = step.compiles["compiles"] - before["compiles"]
        return result

    for width in widths:  # the first call of each shape compiles it
        timed(f"first step {width}", lambda: step.read(step(*_batch(rows, width))))
    timed("evaluation", lambda: step.evaluate([_batch(rows, widths[0])]))
    times, cpu_times = [], []
    for i in range(steps):
        start, cpu = time.perf_counter(), time.process_time()
        step.read(step(*_batch(rows, widths[0], i)))
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    if steps:
        figures.update({"step s (min)": min(times), "step s (median)": float(np.median(times)),
                        "step cpu s": float(np.median(cpu_times))})
    figures["compile s (all)"] = step.compiles["compile_seconds"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--widths", default="64,32", help="padded widths: each one's first step compiles it")
    parser.add_argument("--steps", type=int, default=6, help="training steps run after the compile")
    parser.add_argument("--variants", default="before,after", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--repeat", type=int, default=1, help="run the variants this many times over")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        widths = [int(w) for w in args.widths.split(",")]
        print(json.dumps(measure(args.rows, widths, args.steps, *VARIANTS[args.child])))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO_PARENT, os.environ.get("PYTHONPATH")) if p)}
    rows = []
    for _ in range(args.repeat):
        for variant in args.variants.split(","):
            if variant not in VARIANTS:
                raise SystemExit(f"--variants: unknown {variant!r}; use {', '.join(VARIANTS)}")
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--rows", str(args.rows),
                                  "--widths", args.widths, "--steps", str(args.steps)],
                                 env=env, check=True, capture_output=True, text=True).stdout
            rows.append((variant, json.loads(out.strip().splitlines()[-1])))
            print(f"{variant:8s} " + "  ".join(f"{k} {v}" for k, v in rows[-1][1].items()), flush=True)
    print(f"(rows {args.rows}, widths {args.widths}; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
