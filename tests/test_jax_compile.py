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
    compared = [k for k in whole if not k.endswith("W_k.bias")]
    worst = max(compared, key=lambda k: np.abs(staged[k] - whole[k]).max())
    assert np.abs(staged[worst] - whole[worst]).max() < 1e-5, worst
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
