"""What the JAX backend compiles (issue 28): on one CPU device the fine-tuning step runs as staged
programs (embeddings, one block the blocks alike in shape share, the last block with the head and
the loss, the update), which must train exactly as the one-program step does, compile a new
width without compiling the optimizer again, and compile with the backend's CPU options."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from needs import require_backend

require_backend("jax")
import jax  # noqa: E402

from nlibert.backends.jax import BERTClassifier, BERTModel, FinetuneStep, make_loss, make_trainer, set_seed  # noqa: E402
from nlibert.backends.jax import _programs, train  # noqa: E402
from nlibert.backends.jax.checkpoint import _flatten  # noqa: E402

from test_backend_train import V, batches, task  # noqa: E402  the toy task every backend learns

CPU = [jax.devices("cpu")[0]]
BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _step(num_layers=3, cls_only=True, dropout=0.0, staged=True, seed=0, max_len=16, **options):
    set_seed(seed)
    net = BERTClassifier(BERTModel(V, 16, 32, 2, num_layers, dropout, max_len, fused_attention=True), cls_only=cls_only)
    step = FinetuneStep(net, make_loss(), make_trainer(net, 1e-2), CPU, **options)
    assert not isinstance(step.train, _programs._PerShape)  # one CPU device: the staged step, not one program
    if not staged:  # the whole step as one program (several devices, a job, a GPU)
        step.train = train._train_function(net.module, make_loss(), step.trainer.tx, False,
                                           options.get("max_grad_norm"))
    return net, step


def _params(net):
    return {k: np.asarray(v) for k, v in _flatten(net.params).items()}


@pytest.mark.parametrize("num_layers, cls_only, options", [
    (3, True, {}), (3, False, {}), (4, True, {"micro_batch": 3, "max_grad_norm": 0.05})])
def test_the_staged_step_trains_as_the_one_program_step(num_layers, cls_only, options):
    """Adam steps on batches of 8 and 7 rows (both padded to 8), twice over: the same losses, counts
    and parameters (dropout 0: the two draw their dropout keys differently)."""
    data = batches(task(15, seed=1), 8)
    results = []
    for staged in (True, False):
        net, step = _step(num_layers, cls_only, staged=staged, **options)
        sums = [step.read(step(X, y)) for X, y in data + data]
        results.append((sums, _params(net)))
    (staged_sums, staged), (whole_sums, whole) = results
    for (l1, c1), (l2, c2) in zip(staged_sums, whole_sums):
        assert l1 == pytest.approx(l2, rel=1e-5) and c1 == c2
    # The attention key biases aside: their true gradient is 0 (softmax ignores a shift shared by every
    # key), and Adam turns the rounding noise of any two summation orders into steps of up to lr.
    # Elsewhere that noise moves a parameter by ~1e-5 in four steps (Adam divides by the gradients'
    # own size); a wrong gradient would move it by a good part of lr (1e-2) in one.
    compared = [k for k in whole if not k.endswith("W_k.bias")]
    worst = max(compared, key=lambda k: np.abs(staged[k] - whole[k]).max())
    assert np.abs(staged[worst] - whole[worst]).max() < 1e-4, worst
    moved = _params(_step(num_layers, cls_only)[0])
    assert max(np.abs(staged[k] - moved[k]).max() for k in whole) > 1e-3  # they did train


def test_two_blocks_keep_the_one_program_step():
    """With two blocks no block's programs would be shared, so the step stays one program (which ran
    the book path's large batches faster)."""
    set_seed(0)
    net = BERTClassifier(BERTModel(V, 16, 32, 2, 2, 0.0, 16))
    assert isinstance(FinetuneStep(net, make_loss(), make_trainer(net, 1e-2), CPU).train, _programs._PerShape)


def test_staged_dropout_is_applied_and_the_same_for_the_same_seed():
    data = batches(task(16, seed=2), 8)
    runs = []
    for seed in (0, 0, 1):
        net, step = _step(dropout=0.3, seed=seed)
        runs.append([step.read(step(X, y))[0] for X, y in data])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    net, step = _step(dropout=0.0)
    assert step.read(step(*data[0]))[0] != pytest.approx(runs[0][0])  # dropout 0.3 was applied


def test_a_new_width_compiles_the_blocks_not_the_optimizer_and_the_blocks_share_programs():
    """The first step compiles the update; a second width only the staged forward and backward
    programs; a width seen before nothing. Five layers compile as many programs as three: the
    blocks but the last run one block's programs."""
    counts = {}
    for num_layers in (3, 5):
        net, step = _step(num_layers, max_len=32 + num_layers)  # modules no other test compiled
        narrow = batches(task(8, seed=3), 8)[0]
        wide = ((np.pad(narrow[0][0], ((0, 0), (0, 10))), np.pad(narrow[0][1], ((0, 0), (0, 10))), narrow[0][2]),
                narrow[1])  # width 6 -> 16, padded to 16: another program
        marks = []
        for X, y in (narrow, wide, narrow):
            step.read(step(X, y))
            marks.append(step.compiles["compiles"])
        counts[num_layers] = (marks[0], marks[1] - marks[0], marks[2] - marks[1])
    first, second, again = counts[3]
    assert counts[5] == counts[3]
    # forward and backward of the embeddings, a block and the top: 6; + 1, the update, once per run
    assert (first, second, again) == (7, 6, 0)


def test_programs_compile_once_per_shape_with_the_cpu_options(monkeypatch):
    programs = _programs._PerShape(jax.jit(lambda a, n: a * n))
    assert float(programs(np.float32(2), 3)) == 6.0 and float(programs(np.float32(2), 4)) == 8.0
    assert len(programs.programs) == 1  # a Python number is traced, not a new shape
    programs(np.ones(2, np.float32), 2)
    assert len(programs.programs) == 2
    monkeypatch.setattr(_programs, "CPU_COMPILER_OPTIONS", {"xla_no_such_option": True})
    with pytest.raises(Exception, match="xla_no_such_option"):  # the options reach XLA's compile
        programs(np.ones(3, np.float32), 2)


def _join_compiling_ahead():
    """Wait for the compile-ahead threads, the steps' thread idle meanwhile (as if it waited for a program)."""
    _programs._step_thread_idle.set()
    try:
        for thread in list(_programs._ahead_threads):
            thread.join(timeout=300)
            assert not thread.is_alive()
    finally:
        _programs._step_thread_idle.clear()


def _zeros_like(batch):
    (tokens, segments, valid_lens), labels = batch
    return (np.zeros_like(tokens), np.zeros_like(segments), np.ones_like(valid_lens)), np.zeros_like(labels)


@pytest.mark.parametrize("devices", [1, 2])
def test_compile_ahead_compiles_on_a_thread_what_the_steps_and_evaluation_then_run(devices):
    """`compile_ahead` on zero batches shaped as a run's (two widths) and its test batches: the
    programs compile on a thread of their own, counted in `compiles`, and the steps and evaluation
    then compile nothing, with the losses of a step that compiled as it went. On one device the
    staged step's (the update first, then each width's six); on two, the one program per width."""
    data = batches(task(16, seed=4), 8)
    narrow = data[0]
    wide = ((np.pad(narrow[0][0], ((0, 0), (0, 10))), np.pad(narrow[0][1], ((0, 0), (0, 10))), narrow[0][2]),
            narrow[1])  # width 6 -> 16: a second shape
    losses = []
    for ahead in (True, False):
        net, step = _step(max_len=50 + devices)  # a module no other test compiled
        if devices == 2:
            step = FinetuneStep(net, make_loss(), make_trainer(net, 1e-2), jax.devices("cpu")[:2])
        start = step.compiles["compiles"]
        if ahead:
            step.compile_ahead([_zeros_like(narrow), _zeros_like(wide)], [_zeros_like(data[1])])
            _join_compiling_ahead()
            compiled_ahead = step.compiles["compiles"] - start
            assert compiled_ahead == (1 + 6 + 6 + 1 if devices == 1 else 1 + 1 + 1)
        losses.append([step.read(step(X, y))[0] for X, y in (narrow, wide, data[1])])
        accuracy = step.evaluate(data[1:])
        if ahead:
            assert step.compiles["compiles"] - start == compiled_ahead  # nothing more on the way
            assert 0.0 <= accuracy <= 1.0
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_on_the_cpu_compiling_ahead_waits_for_the_steps_thread_to_compile_or_wait():
    """A step on the CPU keeps every core busy: the compile-ahead thread compiles only while the
    steps' thread compiles (or waits for a program) itself."""
    import time
    net, step = _step(max_len=70)  # a module no other test compiled
    X, y = batches(task(8, seed=6), 8)[0]
    wide = ((np.zeros((8, 16), X[0].dtype), np.zeros((8, 16), X[1].dtype), X[2]), y)
    start = step.compiles["compiles"]
    step.compile_ahead([_zeros_like((X, y)), wide], [])
    time.sleep(1.0)
    assert step.compiles["compiles"] == start  # the steps' thread is neither compiling nor waiting
    step.read(step(X, y))  # compiles the first width's 7; the thread meanwhile starts on the second width's
    _join_compiling_ahead()
    assert step.compiles["compiles"] - start == 7 + 6


def test_on_the_cpu_compiling_ahead_also_goes_on_while_a_checkpoint_is_written(tmp_path):
    """The steps' thread writing a checkpoint (every step's results fetched first) leaves a core free:
    a gated compile-ahead thread starts its next program then."""
    import time
    from nlibert.backends.jax import save_training_state
    net, step = _step(max_len=71)  # a module no other test compiled
    X, y = batches(task(8, seed=6), 8)[0]
    start = step.compiles["compiles"]
    step.compile_ahead([_zeros_like((X, y))], [])
    time.sleep(1.0)
    assert step.compiles["compiles"] == start  # gated: the steps' thread is neither compiling nor waiting
    assert sorted(save_training_state(tmp_path, net, step.trainer, 3).values()) == sorted(os.listdir(tmp_path))
    deadline = time.monotonic() + 60
    while step.compiles["compiles"] == start and time.monotonic() < deadline:
        time.sleep(0.05)
    assert step.compiles["compiles"] > start
    _join_compiling_ahead()


def test_a_program_asked_for_on_several_threads_compiles_once_and_a_failure_reaches_them_all():
    """`_PerShape`: threads that need a program another is compiling wait for it; a compile that
    fails raises on every waiting thread, and the next call compiles afresh. `ahead` returns the
    shapes of a call's result without running it."""
    import threading
    import time
    lowered = []

    class Slow:  # `jax.jit`'s function, its lowering counted and slow enough for the threads to meet
        def __init__(self, jitted):
            self.jitted, self.fail = jitted, True

        def __call__(self, *args):
            return self.jitted(*args)

        def lower(self, *args):
            lowered.append(args)
            time.sleep(0.3)
            if self.fail:
                self.fail = False
                raise RuntimeError("no compile this time")
            return self.jitted.lower(*args)

    programs = _programs._PerShape(Slow(jax.jit(lambda a: a * 2)))
    results = []

    def call():
        try:
            results.append(float(programs(np.float32(3))))
        except RuntimeError as error:
            results.append(str(error))

    for expected in ("no compile this time", 6.0):
        threads = [threading.Thread(target=call) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [expected] * 4
        results.clear()
    assert len(lowered) == 2  # once failed, once compiled: never once per thread
    shape = programs.ahead(jax.ShapeDtypeStruct((2, 3), np.float32))
    assert (shape.shape, shape.dtype) == ((2, 3), np.float32) and len(lowered) == 3


def test_a_process_that_ends_while_compiling_ahead_exits_cleanly_without_finishing():
    """The thread stops between programs at exit and the exit waits for the one in progress: exit
    code 0, no fatal error, and far fewer programs compiled than were asked for."""
    script = f"""
import atexit, sys
sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
counts = {{}}
atexit.register(lambda: print("compiled", counts["step"].compiles["compiles"]))  # runs after the stop: LIFO
import numpy as np
from test_jax_compile import _step, _zeros_like, batches, task
net, step = _step(num_layers=4, max_len=64)
counts["step"] = step
X, y = batches(task(8, seed=5), 8)[0]
wide = [((np.zeros((8, w), X[0].dtype), np.zeros((8, w), X[1].dtype), X[2]), y) for w in (12, 16, 24, 32, 48, 64)]
step.compile_ahead(wide, [])
sys.exit(0)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(pathlib.Path(__file__).parent))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Fatal" not in proc.stderr
    compiled = int(proc.stdout.split("compiled")[-1])
    assert compiled < 1 + 6 * 6  # the update and six widths' programs were asked for


@pytest.mark.skipif(not _programs.PERSISTENT_CPU_CACHE,
                    reason=f"jax {jax.__version__} keeps no CPU programs on disk (0.4.30 does: Python 3.12's JAX extra)")
def test_a_second_process_loads_the_first_ones_programs_from_the_compilation_cache(tmp_path):
    """With jax 0.4.30 a step's programs go to `COMPILATION_CACHE_DIR` (~/.cache/nlibert/jax; HOME here tmp_path):
    the next process that needs them loads every one of them from there and compiles none."""
    script = f"""
import sys
sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
import os
os.environ["HOME"] = {str(tmp_path)!r}  # COMPILATION_CACHE_DIR: ~/.cache/nlibert/jax
from nlibert.backends.jax import _programs
import jax
assert jax.config.jax_compilation_cache_dir == os.path.join({str(tmp_path)!r}, ".cache", "nlibert", "jax")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this tiny model's compile in less than 0.1 s
from test_jax_compile import _step, batches, task
net, step = _step(num_layers=3, max_len=24)
X, y = batches(task(8, seed=3), 8)[0]
step.read(step(X, y))
print("counts", step.compiles["compiles"], step.compiles["from_cache"])
"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    counts = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts.append(tuple(int(n) for n in proc.stdout.split("counts")[-1].split()))
    assert counts == [(7, 0), (7, 7)]  # the staged step's 7 programs: compiled, then all 7 loaded
    assert len(list((tmp_path / ".cache" / "nlibert" / "jax").iterdir())) >= 7


def test_the_cache_keeps_programs_of_a_tenth_of_a_second_unless_the_user_chose_otherwise(monkeypatch):
    """jax's own threshold (1 s) would keep none of a run's programs: the backend lowers it to 0.1 s
    (jax 0.4.30 on), also beside a folder the user chose, but not a threshold the user set in
    `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` or in jax's config; the user's folder stands."""
    key, env = "jax_persistent_cache_min_compile_time_secs", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
    folder, before = jax.config.jax_compilation_cache_dir, getattr(jax.config, key)
    assert folder  # tests/conftest.py chose one (JAX_COMPILATION_CACHE_DIR)
    try:
        for env_value, config_value, expected in ((None, 1.0, 0.1), ("1.0", 1.0, 1.0), (None, 3.0, 3.0)):
            if env_value is None:
                monkeypatch.delenv(env, raising=False)
            else:
                monkeypatch.setenv(env, env_value)
            jax.config.update(key, config_value)
            _programs.use_compilation_cache()
            assert getattr(jax.config, key) == (expected if _programs.PERSISTENT_CPU_CACHE else config_value)
            assert jax.config.jax_compilation_cache_dir == folder
    finally:
        jax.config.update(key, before)


@pytest.mark.slow
def test_bench_finetune_times_the_minilm_command_in_jax_beside_torch(tmp_path, shared_data):
    """`--e2e-only`: the MiniLM command alone, torch first, JAX's programs and seconds beside it."""
    pytest.importorskip("torch")
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_finetune.py"), "--e2e-only", "--e2e", "8",
                           "--backend", "jax", "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NLIBERT_SHARED_DATA": str(shared_data)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    e2e = json.loads(out.read_text())["end_to_end"]
    assert list(e2e) == ["torch", "jax"] and e2e["torch"]["compiles"] is None
    assert e2e["jax"]["ratio_to_torch"] == pytest.approx(e2e["jax"]["wall_seconds"] / e2e["torch"]["wall_seconds"])
    # 8 pairs, one width each: the staged step's 6 programs and the update, and evaluation's one
    assert e2e["jax"]["compiles"] == 8 and e2e["jax"]["compile_seconds"] > 0
    assert "== end to end: nlibert finetune --pretrained minilm-l6" in proc.stdout and "== summary" not in proc.stdout
