"""What the JAX backend compiles, and how (a private helper of backends/jax/train.py).

- `_compiled` / `_counted`: the training and evaluation programs compiled in this process and the
  seconds spent on them, from `jax.monitoring`'s compile events (metrics.json's `fast_path`).
- `_PerShape`: a `jax.jit` function compiled once per argument shapes with `CPU_COMPILER_OPTIONS`.
- `_staged_train_function`: on one CPU device, the fine-tuning step as a few programs (embeddings,
  one encoder block for every block alike in shape, the last block with the head and the loss, the
  update), so that a new batch shape compiles one block and not the optimizer again. XLA's CPU
  backend spends most of a short run compiling otherwise (issue 28; benchmarks/bench_jax_compile.py).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import threading
from concurrent.futures import Future
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from packaging.version import Version

from .model import EncoderBlock, _Classifier, _Encoder, _Params, _Pooler
from ._layers import _Linear

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
# The programs compiled in this process inside `_counted` (a step's or evaluation's call, the staged
# step's parts, or compiling them ahead), and the seconds spent tracing, lowering and compiling them.
# Programs a persistent compilation cache gave (`use_compilation_cache`) count too, as `from_cache`.
_compiled = {"compiles": 0, "compile_seconds": 0.0, "from_cache": 0}
_counting = threading.local()  # per thread: a step's compiles and those made ahead on another thread
_count_lock = threading.Lock()


def _count_compile(event: str, seconds: float, **kwargs) -> None:
    if getattr(_counting, "on", False) and event in _COMPILE_EVENTS:
        with _count_lock:
            _compiled["compiles"] += event == _COMPILE_EVENTS[-1]
            _compiled["compile_seconds"] += seconds


@contextlib.contextmanager
def _counted() -> Iterator[None]:
    """Compiles inside (on this thread) count in `_compiled`."""
    _counting.on = True
    try:
        yield
    finally:
        _counting.on = False


def _count_cache_hit(event: str, **kwargs) -> None:
    if getattr(_counting, "on", False) and event == "/jax/compilation_cache/cache_hits":
        with _count_lock:
            _compiled["from_cache"] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)
jax.monitoring.register_event_listener(_count_cache_hit)

# jax 0.4.30 and later keep compiled CPU programs on disk (0.4.23, the one that installs beside
# MXNet's numpy, skips the CPU): a later run that needs a program this one compiled loads it.
PERSISTENT_CPU_CACHE = Version(jax.__version__) >= Version("0.4.30")
COMPILATION_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "nlibert", "jax")
_JAX_DEFAULT_THRESHOLD = 1.0  # seconds: jax_persistent_cache_min_compile_time_secs when nobody set it


def use_compilation_cache() -> None:
    """Where jax keeps CPU programs on disk, keep ours: in `COMPILATION_CACHE_DIR` unless the user
    chose a folder (`JAX_COMPILATION_CACHE_DIR`), and those compiling in 0.1 s or more unless the
    user chose a threshold (jax's own, 1 s, would keep none of a fine-tuning run's programs).
    Called as the backend is imported: jax reads the folder at its first compile, once."""
    if not PERSISTENT_CPU_CACHE:
        return
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE_DIR)
    threshold = "jax_persistent_cache_min_compile_time_secs"
    if threshold.upper() not in os.environ and getattr(jax.config, threshold) == _JAX_DEFAULT_THRESHOLD:
        jax.config.update(threshold, 0.1)


use_compilation_cache()

# Compiling ahead (`_compile_ahead`): the thread stops between programs at exit, and the exit waits
# for the one in progress (the process's teardown never runs under a compile). Where the steps run on
# the CPU, which they keep busy on every core, it compiles only while the steps' thread itself
# compiles, waits for a program or writes a checkpoint (`_step_thread_idle`): it takes a core no
# step is using.
_ahead_stop, _ahead_threads = threading.Event(), []
_step_thread_idle = threading.Event()
_ahead_thread = threading.local()  # `.gated` on a compile-ahead thread that waits for `_step_thread_idle`


class _Stopped(Exception):
    """The process is exiting: a compile-ahead thread gives up the program it waited to compile."""


@atexit.register
def _stop_compiling_ahead() -> None:
    _ahead_stop.set()
    for thread in _ahead_threads:
        thread.join()


def _compile_ahead(jobs: list[tuple[Callable, tuple]], gated: bool) -> None:
    """`ahead(*args)` for every (ahead, args) of `jobs` in turn, on a thread of its own (compiles
    counted), while the caller goes on: a program a step needs meanwhile is waited for, not compiled
    twice (`_PerShape`). `gated`: each program waits for the steps' thread to be compiling or
    waiting itself. A failure ends the thread quietly: the step that needs that program compiles it
    itself, and raises there."""
    def work() -> None:
        _ahead_thread.gated = gated
        with _counted():
            for ahead, args in jobs:
                if _ahead_stop.is_set():
                    return
                try:
                    ahead(*args)
                except Exception:  # noqa: BLE001 - see the docstring
                    return
    thread = threading.Thread(target=work, name="nlibert-compile-ahead", daemon=True)
    _ahead_threads.append(thread)
    thread.start()


@contextlib.contextmanager
def _steps_thread_on_the_host() -> Iterator[None]:
    """The steps' thread works on the host alone inside (writing a checkpoint, every step's results
    fetched first): a gated compile-ahead thread may take the other core meanwhile (evaluation's
    programs, mostly, which a run needs only at the epoch's end)."""
    _step_thread_idle.set()
    try:
        yield
    finally:
        _step_thread_idle.clear()


def _wait_for_a_free_core() -> None:
    if getattr(_ahead_thread, "gated", False):
        while not _step_thread_idle.wait(0.05):
            if _ahead_stop.is_set():
                raise _Stopped()


# What XLA's CPU backend compiles the training and evaluation programs with: LLVM at -O1, without its
# expensive passes. The matrix products are calls into Eigen that these leave as they are; what they
# make cheaper to compile is the element-wise fusions around them (measured on MiniLM's staged step:
# about a fifth less compile time, the same step time; benchmarks/bench_jax_compile.py).
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1, "xla_llvm_disable_expensive_passes": True}


class _PerShape:
    """A `jax.jit` function compiled once per shape of its arguments, as `jit` itself does, but with
    `CPU_COMPILER_OPTIONS` where the arguments live on the CPU (`jit` takes no compiler options in
    jax 0.4.23; `.lower(...).compile(options)` does). The programs are kept by the shapes, dtypes and
    (`by_placement`) placements of the arguments; each call runs through the compiled program's own
    fast dispatch. `ahead` compiles without running, on any thread: a call that needs a program
    another thread is compiling waits for it instead of compiling it again."""

    def __init__(self, jitted: Callable, by_placement: bool = True) -> None:
        self.jitted, self.by_placement, self.programs, self.lock = jitted, by_placement, {}, threading.Lock()

    def _program(self, args: tuple) -> Callable:
        leaves = jax.tree_util.tree_leaves(args)
        key = (jax.tree_util.tree_structure(args),  # a Python number is traced as a scalar: its type counts
               tuple((np.shape(a), a.dtype if hasattr(a, "dtype") else np.result_type(a),
                      getattr(a, "sharding", None) if self.by_placement else None) for a in leaves))
        with self.lock:
            program, mine = self.programs.get(key), False
            if program is None:
                program, mine = self.programs.setdefault(key, Future()), True
        if program.done():
            return program.result()
        step_thread = not hasattr(_ahead_thread, "gated")
        if step_thread:
            _step_thread_idle.set()  # compiling or waiting: a core for the compile-ahead thread
        try:
            if mine:
                try:  # (abstract arguments, `jax.ShapeDtypeStruct`s, may carry a sharding too)
                    _wait_for_a_free_core()
                    on_cpu = all(d.platform == "cpu" for a in leaves if getattr(a, "sharding", None) is not None
                                 for d in a.sharding.device_set)
                    program.set_result(self.jitted.lower(*args).compile(CPU_COMPILER_OPTIONS if on_cpu else None))
                except BaseException as error:  # the waiting callers see it; the next call compiles afresh
                    with self.lock:
                        del self.programs[key]
                    program.set_exception(error)
                    raise
            return program.result()
        finally:
            if step_thread:
                _step_thread_idle.clear()

    def __call__(self, *args):
        return self._program(args)(*args)

    def ahead(self, *args):
        """Compile for arguments like `args` (arrays or `jax.ShapeDtypeStruct`s) without running;
        returns the shapes of what a call would return (`jax.eval_shape`)."""
        self._program(args)
        return jax.eval_shape(self.jitted, *args)


def _classifier_stages(module: _Classifier) -> tuple[Callable, Callable, Callable]:
    """`module`'s forward pass as three pure functions of parts of its parameter tree, which applied
    in turn give its logits: `embed(encoder params but "blks", tokens, segments, training, key)` -> X
    (B, T, H); `block(one block's params, X, valid_lens, queries, training, key)` -> X, once per block
    (`queries` X[:, :1] for a `cls_only` last block, else None); `head({"hidden", "output"} params,
    X)` -> logits. Each `key` is that part's dropout key. `_staged_train_function` compiles each part alone."""
    cfg = dict(module.config)
    embedder = _Encoder(tuple(sorted({**cfg, "num_layers": 0}.items())), module.detach_pos_embedding,
                        module.fused_attention)  # the embeddings alone
    block_module = EncoderBlock(cfg["num_hiddens"], cfg["ffn_num_hiddens"], cfg["num_heads"], cfg["dropout"],
                                module.fused_attention, cfg["hidden_act"], cfg["layer_norm_eps"],
                                cfg["attention_dropout"])
    pooler, output = _Pooler(cfg["num_hiddens"]), _Linear(module.num_classes)

    def embed(params: _Params, tokens: jax.Array, segments: jax.Array, training: bool, key: jax.Array) -> jax.Array:
        return embedder.apply({"params": params}, tokens, segments, None, training=training, rngs={"dropout": key})

    def block(params: _Params, X: jax.Array, valid_lens: jax.Array, queries: jax.Array | None, training: bool,
              key: jax.Array) -> jax.Array:
        return block_module.apply({"params": params}, X, valid_lens, queries, training, rngs={"dropout": key})

    def head(params: _Params, X: jax.Array) -> jax.Array:
        pooled = pooler.apply({"params": params["hidden"]}, X[:, 0, :])
        return output.apply({"params": params["output"]}, pooled)  # (B, num_classes)

    return embed, block, head


@functools.lru_cache(maxsize=None)
def _staged_train_function(module, loss: Callable, tx: optax.GradientTransformation,
                           max_grad_norm: float | None = None) -> Callable:
    """`_train_function`'s step (one device, one process, the same arguments, math and results) as a
    few programs driven in turn: the embeddings, one encoder block, and the last block with the head
    and the loss, each compiled forward (keeping what its backward needs, `jax.vjp`) and backward;
    then the update (clip, `tx`), compiled once per run since its shapes are the parameters'. The
    blocks but the last are alike in shape, so one block's programs serve them all: a new batch
    shape compiles one block, not all of them, and not the optimizer again. (XLA's CPU backend
    compiles a 6-layer step in ~10 s; run as a `lax.scan` loop the blocks would compile once too,
    but XLA's CPU runtime runs a loop's body on one thread, and slower.) Each part's dropout key is
    the step's with the chunk's and the part's index folded in, inside the programs: no program of
    its own."""
    embed, block, head = _classifier_stages(module)
    cfg, cls_only = dict(module.config), module.cls_only
    clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm is not None else None
    last = str(cfg["num_layers"] - 1)

    def part_key(key, c, part):  # chunk c's key for part 0 (embeddings), i + 1 (block i) or num_layers (top)
        return jax.random.fold_in(jax.random.fold_in(key, c), part)

    def embed_forward(params, tokens, segments, c, key):
        return jax.vjp(lambda p: embed(p, tokens[c], segments[c], True, part_key(key, c, 0)), params)

    def block_forward(params, X, valid_lens, c, key, i):
        return jax.vjp(lambda p, X: block(p, X, valid_lens[c], None, True, part_key(key, c, i + 1)), params, X)

    def top_forward(params, X, valid_lens, labels, weights, c, key):
        """The last block, the head and the loss: (loss sum, its backward, number correct)."""
        def summed_loss(p, X):
            X = block(p["block"], X, valid_lens[c], X[:, :1, :] if cls_only else None, True,
                      part_key(key, c, cfg["num_layers"]))
            logits = head(p["head"], X)
            losses = loss(logits, labels[c]) * weights[c]
            return losses.sum(), ((logits.argmax(axis=-1) == labels[c]) * weights[c]).sum()
        return jax.vjp(summed_loss, params, X, has_aux=True)

    def update(params, opt_state, grads, count):
        grads = jax.tree_util.tree_map(lambda g: g / count, grads)
        if clip is not None:
            grads, _ = clip.update(grads, clip.init(params))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    programs = [_PerShape(jax.jit(f), by_placement=False) for f in (embed_forward, block_forward, top_forward, update)]
    embed_forward, block_forward, top_forward, update = programs
    backward = _PerShape(jax.jit(lambda pullback, g: pullback(g)), by_placement=False)
    add = _PerShape(jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)), by_placement=False)

    def drive(call, params, opt_state, key, tokens, segments, valid_lens, labels, weights, count):
        """The step's programs in turn, each run by `call(program, *args)`; `count`: the real rows."""
        encoder = params["encoder"]
        embedding = {k: v for k, v in encoder.items() if k != "blks"}
        top = {"block": encoder["blks"][last], "head": {"hidden": params["hidden"], "output": params["output"]}}
        grads, loss_sum, correct = None, [], []
        for c in range(tokens.shape[0]):
            X, embed_backward = call(embed_forward, embedding, tokens, segments, c, key)
            pullbacks = []
            for i in range(cfg["num_layers"] - 1):
                X, pullback = call(block_forward, encoder["blks"][str(i)], X, valid_lens, c, key, i)
                pullbacks.append(pullback)
            chunk_loss, top_backward, chunk_correct = call(top_forward, top, X, valid_lens, labels, weights, c, key)
            g_top, g_X = call(backward, top_backward, np.float32(1.0))
            g_blocks = {last: g_top["block"]}
            for i in reversed(range(cfg["num_layers"] - 1)):
                g_blocks[str(i)], g_X = call(backward, pullbacks[i], g_X)
            (g_embedding,) = call(backward, embed_backward, g_X)
            chunk_grads = {"encoder": {**g_embedding, "blks": g_blocks}, **g_top["head"]}
            grads = chunk_grads if grads is None else call(add, grads, chunk_grads)
            loss_sum.append(chunk_loss)
            correct.append(chunk_correct)
        params, opt_state = call(update, params, opt_state, grads, count)
        sums = [functools.reduce(lambda a, b: call(add, a, b), parts) for parts in (loss_sum, correct)]
        return params, opt_state, *sums

    def step(params, opt_state, key, tokens, segments, valid_lens, labels, weights):
        return drive(lambda program, *args: program(*args), params, opt_state, key, tokens, segments, valid_lens,
                     labels, weights, float(np.asarray(weights).sum()))  # the real rows

    def ahead(params, opt_state, key, tokens, segments, valid_lens, labels, weights) -> None:
        """Compile every program a step on such a batch runs, running none (`_PerShape.ahead`)."""
        drive(lambda program, *args: program.ahead(*args), params, opt_state, key, tokens, segments, valid_lens,
              labels, weights, 1.0)

    step.ahead = ahead
    # The update's shapes are the parameters': it can compile before any batch's programs.
    step.ahead_update = lambda params, opt_state: update.ahead(params, opt_state, params, 1.0)
    return step
