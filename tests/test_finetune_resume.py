"""Fine-tuning resumes where it stopped and ends where an uninterrupted run ends: the same parameters,
bit for bit, and the same per-epoch figures, in both backends and both modes, after a crash between
checkpoints, after `--stop-after`, and after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nlibert import cli, jobs
from nlibert.backends import BACKENDS, load_backend
from nlibert.core.sample import write_sample_snli
from nlibert.core.settings import FinetuneSettings

FIGURES = ("epoch", "loss", "train_acc", "test_acc", "num_examples")  # examples/sec is timing


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_snli(tmp_path_factory.mktemp("data") / "snli", num_train=96, num_test=16, seed=4)


def settings(backend, mode, data, out, **extra):
    # 6 steps an epoch, 2 epochs, a checkpoint every 4 steps (and at each epoch's end); dropout on, so
    # resuming must also draw the same dropout masks.
    return FinetuneSettings(**{**dict(backend=backend, mode=mode, pretrained="random", data=str(data),
                                      max_len=32, batch_size=16, epochs=2, lr=1e-3, dropout=0.1, device="cpu",
                                      out=str(out), checkpoint_every=4), **extra})


def assert_same_run(a: dict, b: dict, backend: str) -> None:
    assert [{k: e[k] for k in FIGURES} for e in a["epochs"]] == [{k: e[k] for k in FIGURES} for e in b["epochs"]]
    read = load_backend(backend).read_params
    pa, pb = (read(os.path.join(m["model_dir"], "classifier.params")) for m in (a, b))
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "book"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_crash_between_checkpoints_resumes_to_the_uninterrupted_result(backend, mode, sample, tmp_path,
                                                                       monkeypatch, capsys):
    whole = jobs.run_finetune(settings(backend, mode, sample, tmp_path / "whole"))
    assert whole["completed"] and whole["steps"] == 12 and whole["resumed_from_step"] is None

    module = load_backend(backend)

    class Crash(Exception):
        pass

    class CrashingStep(module.FinetuneStep):  # dies in step 6: the last checkpoint is step 4's
        calls = 0

        def __call__(self, features, labels):
            CrashingStep.calls += 1
            if CrashingStep.calls == 6:
                raise Crash
            return super().__call__(features, labels)

    out = tmp_path / "crashed"
    monkeypatch.setattr(module, "FinetuneStep", CrashingStep)
    with pytest.raises(Crash):
        jobs.run_finetune(settings(backend, mode, sample, out))
    monkeypatch.undo()
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["step"] == 4 and not (out / "model").exists()  # mid-epoch: sums and data position saved
    capsys.readouterr()
    resumed = jobs.run_finetune(settings(backend, mode, sample, out))
    assert "resuming from" in capsys.readouterr().out
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 12
    assert_same_run(whole, resumed, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_after_then_the_same_command_finishes_the_run(backend, sample, tmp_path):
    whole = jobs.run_finetune(settings(backend, "fast", sample, tmp_path / "whole"))
    out = tmp_path / "stopped"
    first = jobs.run_finetune(settings(backend, "fast", sample, out, stop_after=5))
    assert first == {"completed": False, "step": 5, "epoch": 1, "resume_dir": str(out / "resume")}
    assert not (out / "metrics.json").exists() and not (out / "model").exists()
    second = jobs.run_finetune(settings(backend, "fast", sample, out, stop_after=4))  # to step 9
    assert second["completed"] is False and second["step"] == 9
    last = jobs.run_finetune(settings(backend, "fast", sample, out))
    assert last["resumed_from_step"] == 9
    assert_same_run(whole, last, backend)


def test_other_settings_are_refused_and_no_resume_starts_over(sample, tmp_path, capsys):
    out = tmp_path / "out"
    jobs.run_finetune(settings("torch", "fast", sample, out, stop_after=3))
    with pytest.raises(ValueError, match=r"other settings \(lr\).*--no-resume"):
        jobs.run_finetune(settings("torch", "fast", sample, out, lr=5e-4))
    args = ["finetune", "--pretrained", "random", "--data", str(sample), "--out", str(out), "--max-len", "32",
            "--batch-size", "16", "--epochs", "2", "--device", "cpu", "--checkpoint-every", "4", "--dropout", "0.1"]
    assert cli.main(args + ["--lr", "5e-4"]) == 2
    assert "other settings (lr)" in capsys.readouterr().err
    assert cli.main(args + ["--lr", "5e-4", "--no-resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] is None and metrics["hyperparameters"]["lr"] == 5e-4
    # more epochs continue a finished run
    assert cli.main(args + ["--lr", "5e-4", "--epochs", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 12 and len(metrics["epochs"]) == 3


@pytest.mark.slow
def test_sigkill_then_the_same_command_ends_with_the_uninterrupted_parameters(sample, tmp_path):
    """The real thing: the process is killed once a checkpoint exists, mid-run, and started again."""
    def command(out, *extra):
        return [sys.executable, "-m", "nlibert.cli", "finetune", "--pretrained", "random", "--data", str(sample),
                "--out", str(out), "--max-len", "32", "--batch-size", "8", "--epochs", "3", "--lr", "1e-3",
                "--device", "cpu", "--checkpoint-every", "2", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True, env=env, timeout=600)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = out / "resume" / "state.json"
    deadline = time.time() + 300
    while not (state.exists() and json.loads(state.read_text())["step"] >= 4) and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "metrics.json").exists():
        pytest.skip("the run finished before it could be killed")
    done = subprocess.run(command(out), capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", out))
    assert_same_run(a, b, "torch")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_with_the_recipe_resumes_to_the_uninterrupted_result(backend, sample, tmp_path):
    """The rate is a function of the step (warm-up, then linear decay over both epochs), AdamW's
    state is the optimizer's, clipping keeps none: stopped mid-epoch and resumed, the run ends as
    an uninterrupted one does; the resume signature holds the epochs the schedule was sized for."""
    recipe = dict(optimizer="adamw", weight_decay=0.01, warmup_ratio=0.25, lr_schedule="linear", max_grad_norm=1.0)
    whole = jobs.run_finetune(settings(backend, "book", sample, tmp_path / "whole", **recipe))
    assert whole["hyperparameters"]["lr_schedule"] == "linear" and whole["hyperparameters"]["weight_decay"] == 0.01
    stopped = jobs.run_finetune(settings(backend, "book", sample, tmp_path / "parts", stop_after=5, **recipe))
    assert not stopped["completed"]
    with pytest.raises(ValueError, match="schedule_epochs"):
        jobs.run_finetune(settings(backend, "book", sample, tmp_path / "parts", epochs=3, **recipe))
    assert_same_run(jobs.run_finetune(settings(backend, "book", sample, tmp_path / "parts", **recipe)), whole, backend)
