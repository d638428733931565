"""The child processes of `bench_finetune.py`: one (backend, path) timed in a fresh process, or a
matmul peak, or (with `--nproc`) one rank of a job of several processes. The parent's docstring
says what is measured and how."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BERT_SMALL, PeakRSS, loadavg, tiled_dev, training_flops  # noqa: E402

VARIANTS = {
    # name: (padding, fused attention, loop, precision, graph, last block at <cls> only)
    "book": ("max_len", False, "book", "float32", False, False),
    "fast": ("bucket", True, "fast", "float32", False, True),
    # --ablation: the levers one by one
    "trim only": ("trim", False, "fast", "float32", False, False),
    "bucketing": ("bucket", False, "fast", "float32", False, False),
    "bucketing + fused attn": ("bucket", True, "fast", "float32", False, False),
    "fast + bfloat16": ("bucket", True, "fast", "bfloat16", False, True),
    "fast + graph (x8 widths)": ("bucket8", True, "fast", "float32", True, True),
    "fast + graph": ("bucket", True, "fast", "float32", True, True),
}

# --- the child processes -----------------------------------------------------------------------

def _iterator(arrays, labels, batch_size, padding, seed, warmup, steps):
    """The warm-up batches (the last ones of a seeded pass), then the timed ones (its first `steps`):
    every variant with the same sampler times exactly the same batches, however long its warm-up."""
    from nlibert.core.batching import BatchIterator, batch_indices, bucket_batch_indices
    multiple = 8 if padding == "bucket8" else 1
    sampler = bucket_batch_indices(arrays[2], multiple) if padding.startswith("bucket") else batch_indices
    order = sampler(len(labels), batch_size, True, np.random.default_rng(seed))
    if warmup + steps > len(order):
        raise SystemExit(f"{warmup} warm-up + {steps} timed steps need more than the {len(order)} batches of a pass")
    chosen = order[len(order) - warmup:] + order[:steps] if warmup else order[:steps]
    return BatchIterator(arrays, labels, batch_size, sampler=lambda *_: chosen, trim=padding != "max_len",
                         pad_multiple=multiple)


def _timed_steps(step, finish, sync, batches, warmup, steps, cfg, cls_only, cuda_peak=None, before=None):
    """Run `warmup` untimed then `steps` timed steps; return throughput, FLOPs and memory figures.
    Memory is watched from before the first warm-up step: the steps' working set (activations,
    gradients, optimizer state) is allocated there, and reused rather than grown in the timed steps.
    `before()`, run first (watched too), does untimed work such as compiling and returns a figure."""
    sync()
    rss = PeakRSS().start()
    if cuda_peak is not None:
        cuda_peak("reset")
    warming = time.perf_counter()  # compiling (JAX, torch.compile) or hybridizing happens here
    before_figure = before() if before is not None else None
    for _ in range(warmup):
        step(*next(batches))
    finish()
    sync()
    warmup_seconds = time.perf_counter() - warming
    lengths, widths, start = [], [], time.perf_counter()
    for _ in range(steps):
        features, labels = next(batches)
        lengths.append(np.asarray(features[2]))
        widths.append(np.shape(features[0])[1])
        step(features, labels)
    finish()  # the fast loop's one read-back; a no-op for the book's (it read every step)
    sync()
    seconds = time.perf_counter() - start
    mem = rss.stop()
    H, F, layers = cfg["num_hiddens"], cfg["ffn_num_hiddens"], cfg["num_layers"]
    useful = sum(training_flops(l, None, H, F, layers) for l in lengths)
    executed = sum(training_flops(l, w, H, F, layers, cls_only) for l, w in zip(lengths, widths))
    n = sum(len(l) for l in lengths)
    return {"examples": n, "seconds": seconds, "examples_per_sec": n / seconds,
            "mean_width": float(np.mean(widths)), "mean_valid_len": float(np.mean(np.concatenate(lengths))),
            "useful_flops": useful, "executed_flops": executed, "peak_mem_bytes": mem,
            "cuda_peak_bytes": cuda_peak("read") if cuda_peak is not None else None, "before": before_figure,
            "warmup_seconds": warmup_seconds}


def _step_and_finish(finetune_step, loop):
    """The timed calls of a loop: the book's reads the sums after every step (train_ch13), the fast
    one keeps them on the device and reads their total once (train_fast)."""
    sums = []

    def step(X, y):
        if loop == "book":
            finetune_step.read(finetune_step(X, y))
        else:
            sums.append(finetune_step(X, y))

    def finish():
        if sums:
            finetune_step.read((sum(l for l, _ in sums), sum(c for _, c in sums)))
            sums.clear()

    return step, finish


def _data_and_bert(backend, spec, fused, world=None):
    """What every backend's child trains: SNLI's length distribution tiled, and a seeded
    bert.small-shaped model on the spec's devices (this rank's one, in a job of several processes)."""
    devices = backend.parse_devices(spec["device"])
    if world is not None:
        devices = world.local_devices(devices)
    arrays, labels, vocab = tiled_dev(spec["max_len"], spec["tile"])
    backend.set_seed(spec["seed"])
    bert = backend.BERTModel(len(vocab), BERT_SMALL["num_hiddens"], BERT_SMALL["ffn_num_hiddens"],
                             BERT_SMALL["num_heads"], BERT_SMALL["num_layers"], BERT_SMALL["dropout"],
                             BERT_SMALL["max_len"], fused_attention=fused)
    return devices, arrays, labels, vocab, bert


def child_torch(spec):
    import torch
    torch.set_num_threads(spec["threads"])

    from nlibert.backends import torch as backend
    world = backend.init_distributed()  # --nproc: one rank of a DistributedDataParallel job
    padding, fused, loop, precision, graph, cls_only = VARIANTS[spec["variant"]]
    devices, arrays, labels, vocab, bert = _data_and_bert(backend, spec, fused, world)
    cuda = devices[0].type == "cuda"
    net = backend.BERTClassifier(bert, cls_only=cls_only)
    backend.initialize_classifier_head(net, devices)
    loss, trainer = backend.make_loss(), backend.make_trainer(net, 1e-4, fused=loop == "fast")
    # DataParallel across several GPUs, torch.compile with `graph`: what train_ch13 / train_fast run.
    finetune_step = backend.FinetuneStep(net, loss, trainer, devices, precision=precision, graph=graph,
                                         world=world)
    warmup = spec["warmup"] + (4 if graph else 0)  # compilation happens in the first calls
    batches = iter(_iterator(arrays, labels, spec["batch_size"], padding, spec["seed"], warmup, spec["steps"]))
    step, finish = _step_and_finish(finetune_step, loop)

    def sync():
        for d in devices:  # every GPU: with DataParallel, replicas run on the others' streams
            if d.type == "cuda":
                torch.cuda.synchronize(d)

    def cuda_peak(what):
        if what == "reset":
            for d in devices:
                torch.cuda.reset_peak_memory_stats(d)
            return None
        return int(sum(torch.cuda.max_memory_allocated(d) for d in devices))

    result = _timed_steps(step, finish, sync, batches, warmup, spec["steps"], BERT_SMALL, cls_only,
                          cuda_peak if cuda else None)
    result["devices"] = str(devices)
    result["num_devices"] = len(devices) if cuda else 1  # CPU devices share the same cores
    result["threads"] = torch.get_num_threads()
    return _from_main(result, world)


def child_mxnet(spec):
    os.environ.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    import warnings
    warnings.filterwarnings("ignore")
    import mxnet as mx
    from mxnet import init

    from nlibert.backends import mxnet as backend
    world = backend.init_distributed()  # --nproc: one worker of a dist_sync kvstore job
    padding, fused, loop, precision, graph, cls_only = VARIANTS[spec["variant"]]
    if precision != "float32":
        return {"skipped": "MXNet 1.9 trains these operators in float32 only"}
    devices, arrays, labels, vocab, bert = _data_and_bert(backend, spec, fused, world)
    bert.initialize(init.Xavier(), ctx=devices)
    net = backend.BERTClassifier(bert, cls_only=cls_only)
    backend.initialize_classifier_head(net, devices)
    loss, trainer = backend.make_loss(), backend.make_trainer(net, 1e-4)
    finetune_step = backend.FinetuneStep(net, loss, trainer, devices, graph=graph, world=world)  # graph: hybridized
    warmup = spec["warmup"] + (2 if graph else 0)
    batches = iter(_iterator(arrays, labels, spec["batch_size"], padding, spec["seed"], warmup, spec["steps"]))
    step, finish = _step_and_finish(finetune_step, loop)

    gpu = [d for d in devices if d.device_type == "gpu"]

    def gpu_used(what):  # MXNet has no peak counter: device memory in use (its pool) after the steps
        if what == "read":
            return int(sum(total - free for free, total in (mx.context.gpu_memory_info(d.device_id) for d in gpu)))
        return None

    result = _timed_steps(step, finish, mx.nd.waitall, batches, warmup, spec["steps"], BERT_SMALL, cls_only,
                          gpu_used if gpu else None)
    result["devices"] = str(devices)
    result["num_devices"] = len(gpu) or 1  # CPU contexts share the same cores
    result["threads"] = int(os.environ.get("OMP_NUM_THREADS", "0"))
    return _from_main(result, world)


def _from_main(result, world):
    """A job's figures come from rank 0 (every rank timed the same global batches: the step's reads
    sum over the ranks, so they finish together); the other ranks report nothing."""
    result["processes"] = world.size
    return result if world.main else None


def _split_host_for_jax(spec):
    """'cpu:0,cpu:1' for JAX: XLA must be told, before it starts, to show the host as that many devices."""
    if spec.get("backend") == "jax" and spec["device"].startswith("cpu:"):
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={len(spec['device'].split(','))}"


def child_jax(spec):
    import jax

    from nlibert.backends import jax as backend
    from nlibert.backends.jax.train import _MIN_ROWS, _prepare  # pads a batch to the shape the step compiles for
    world = backend.init_distributed()  # --nproc: one rank of a jax.distributed job (before any JAX work)
    padding, fused, loop, precision, graph, cls_only = VARIANTS[spec["variant"]]
    if precision != "float32":
        return {"skipped": "the JAX backend trains in float32 only"}
    devices, arrays, labels, vocab, bert = _data_and_bert(backend, spec, fused, world)
    net = backend.BERTClassifier(bert, cls_only=cls_only)
    backend.initialize_classifier_head(net, devices)
    loss, trainer = backend.make_loss(), backend.make_trainer(net, 1e-4)
    finetune_step = backend.FinetuneStep(net, loss, trainer, devices, world=world)
    batch_list = list(_iterator(arrays, labels, spec["batch_size"], padding, spec["seed"], spec["warmup"],
                                spec["steps"]))
    step, finish = _step_and_finish(finetune_step, loop)

    def compile_every_shape():
        """XLA compiles the step once per padded shape: one untimed step on a batch of each shape the
        timed steps will see, so that the figure is the steady state; returns the seconds it took."""
        start, seen = time.perf_counter(), set()
        for features, y in batch_list:
            shape = _prepare(features, y, finetune_step.mesh_devices, BERT_SMALL["max_len"], None, world,
                             _MIN_ROWS)[0].shape
            if shape not in seen:
                seen.add(shape)
                finetune_step.read(finetune_step(features, y))
        return {"compile_seconds": time.perf_counter() - start, "shapes": len(seen)}

    def sync():
        jax.block_until_ready(net.params)

    def device_peak(what):
        if what == "read":
            return int(sum(d.memory_stats().get("peak_bytes_in_use", 0) for d in devices))
        return None

    gpu = devices[0].platform == "gpu"
    result = _timed_steps(step, finish, sync, iter(batch_list), spec["warmup"], spec["steps"], BERT_SMALL,
                          cls_only, device_peak if gpu else None, before=compile_every_shape)
    result["devices"] = str(devices)
    result["num_devices"] = len(devices) if gpu else 1  # CPU devices share the same cores
    result["threads"] = os.cpu_count()
    return _from_main(result, world)


def child_peak(spec):
    """GFLOP/s of a large dense layer in the framework and precision the model uses, on the first device."""
    gpu = spec["device"] not in (None, "cpu")
    n = spec.get("peak_size") or (8192 if gpu else 4096)
    repeats = 20 if gpu else 5
    if spec["backend"] == "torch":
        import torch
        torch.set_num_threads(spec["threads"])
        from torch.nn import functional as F

        from nlibert.backends.torch import parse_devices
        device = parse_devices(spec["device"])[0]
        dtype = getattr(torch, spec["precision"])
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)

        def run():
            F.linear(a, b)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()
        what = f"torch F.linear {n}x{n}x{n} {spec['precision']}"
    elif spec["backend"] == "jax":
        import jax

        from nlibert.backends.jax import parse_devices
        device = parse_devices(spec["device"])[0]
        a, b = (jax.device_put(jax.random.normal(jax.random.PRNGKey(i), (n, n)), device) for i in (0, 1))
        matmul = jax.jit(lambda x, y: x @ y.T)

        def run():
            run.out = matmul(a, b)

        def sync():
            jax.block_until_ready(run.out)
        what = f"jax x @ y.T {n}x{n}x{n} float32"
    else:
        os.environ.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
        import mxnet as mx
        from mxnet import np, npx
        npx.set_np()
        from nlibert.backends.mxnet import parse_devices
        ctx = parse_devices(spec["device"])[0]
        a = np.random.normal(size=(n, n), ctx=ctx)
        b = np.random.normal(size=(n, n), ctx=ctx)

        def run():
            npx.fully_connected(a, b, no_bias=True, num_hidden=n)

        sync = mx.nd.waitall
        what = f"mxnet FullyConnected {n}x{n}x{n} float32"
    run()
    sync()
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        sync()
        best = max(best, 2.0 * n ** 3 * repeats / (time.perf_counter() - start))
    return {"flops_per_sec": best, "what": what}


def child_main(spec):
    _split_host_for_jax(spec)
    if spec["kind"] == "peak":
        result = child_peak(spec)
    else:
        result = {"torch": child_torch, "mxnet": child_mxnet, "jax": child_jax}[spec["backend"]](spec)
    if result is None:  # a rank other than 0 of a job
        return
    result["loadavg_after"] = loadavg()
    print("RESULT " + json.dumps(result), flush=True)


