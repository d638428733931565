"""Clean stops (issue 24): SIGINT and SIGTERM end a command with 130 / 143 and one line saying what
was kept, never a traceback; SIGTERM checkpoints at the next step boundary; the `--nproc` launcher
passes signals on once and waits, its processes die with it even when it is SIGKILLed, and an
error (or a dead peer) is reported once; a job that cannot work is refused before it starts.
Every test runs real processes in process groups of their own, as a terminal or scheduler does."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nlibert.core.distributed import check_job

TRAIN = ["--pretrained", "random", "--max-len", "16", "--batch-size", "8", "--device", "cpu", "--mode", "book"]


def wait_for(condition, what: str, timeout: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def start(argv: list[str], **kwargs) -> subprocess.Popen:
    """A command in a process group of its own (a terminal's job, a scheduler's task)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **kwargs)


def nlibert(*args: str) -> subprocess.Popen:
    return start([sys.executable, "-m", "nlibert.cli", *args])


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def assert_one_line(err: str, *expected: str) -> None:
    assert "Traceback" not in err and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.csv"
    rows = [f"good great movie {i},pos\nbad awful film {i},neg" for i in range(300)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return str(path)


def finetune_args(train_file: str, out, *extra: str) -> list[str]:
    return ["finetune", *TRAIN, "--train-file", train_file, "--text-columns", "text", "--label-column", "label",
            "--out", str(out), "--cache-dir", str(out) + "-cache", *extra]


# --- one process -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_the_same_command_resumes(train_file, tmp_path):
    out = tmp_path / "out"
    args = finetune_args(train_file, out, "--epochs", "20", "--checkpoint-every", "2")
    job = nlibert(*args)
    state = out / "resume" / "state.json"
    wait_for(state.exists, "first checkpoint", proc=job)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143
    step = json.loads(state.read_text())["step"]
    assert_one_line(err, "stopped by SIGTERM", f"the checkpoint of step {step} is kept in {out / 'resume'}",
                    "run the same command to resume")
    assert 3 <= step < 20 * 68 and not (out / "model").exists()
    again = nlibert(*args[:-4], "--epochs", "1", "--checkpoint-every", "2", "--stop-after", "1")
    printed, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"at epoch 1, step {step + 1}" in printed or f"step {step + 1}" in printed, printed


@pytest.mark.slow
def test_ctrl_c_ends_finetune_and_predict_with_one_line_and_130(train_file, tmp_path):
    out = tmp_path / "out"
    # Training, at the first epoch's checkpoint: a second after the seeded checkpoint, the signal came
    # once after all 20 epochs had ended, and (2000 epochs) once before any checkpoint, exit -2.
    job = nlibert(*finetune_args(train_file, out, "--epochs", "2000", "--checkpoint-every", "1000"))
    wait_for(lambda: (out / "resume" / "state.json").exists(), "the first epoch's checkpoint", proc=job)
    os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130, err
    assert_one_line(err, "stopped by SIGINT (Ctrl-C)", "run the same command")

    model = tmp_path / "m"
    assert subprocess.run([sys.executable, "-m", "nlibert.cli", *finetune_args(train_file, model, "--epochs", "1",
                                                                                "--train-limit", "16")],
                          capture_output=True).returncode == 0
    many = tmp_path / "many.csv"
    many.write_text("text\n" + "".join(f"good great movie {i}\n" for i in range(100_000)))
    predict = nlibert("predict", "--model", str(model / "model"), "--file", str(many), "--output",
                      str(tmp_path / "p.csv"), "--batch-size", "1")
    time.sleep(6)
    assert predict.poll() is None
    os.killpg(predict.pid, signal.SIGINT)
    _, err = predict.communicate(timeout=60)
    assert predict.returncode == 130
    assert_one_line(err, "stopped by SIGINT (Ctrl-C); nothing was written")
    assert not (tmp_path / "p.csv").exists()


# --- the launcher of a job -----------------------------------------------------------------------------

LAUNCHER = textwrap.dedent("""
    import sys
    from nlibert.core.distributed import LaunchProcess, launch
    worker = [sys.executable, "-c", sys.argv[1]]
    ranks = [LaunchProcess(f"rank {r}", {"R": str(r)}) for r in range(2)]
    sys.exit(launch(worker, ranks, grace_s=5, stop_grace_s=20))
""")

# A worker that notes every signal it gets, takes a moment to "checkpoint", and ends 128 + signal.
NOTING_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    got = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda s, f: got.append(s))
    folder = os.environ["WORKER_DIR"]
    open(os.path.join(folder, "ready-" + os.environ["R"]), "w").write(str(os.getpid()))
    while not got:
        time.sleep(0.02)
    time.sleep(1.5)
    open(os.path.join(folder, "done-" + os.environ["R"]), "w").write(str(got))
    sys.exit(128 + got[0])
""")


def launcher(worker: str, tmp_path) -> subprocess.Popen:
    env = {**os.environ, "WORKER_DIR": str(tmp_path)}
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, worker], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)


def _has_pid(tmp_path, rank: int) -> bool:
    """Worker `rank` wrote its pid: its ready file exists and is no longer empty (the worker opens the
    file, then writes; seen between the two once in a CI run)."""
    path = tmp_path / f"ready-{rank}"
    return path.exists() and path.read_text().strip() != ""


def ready(tmp_path) -> list[int]:
    return [int((tmp_path / f"ready-{r}").read_text()) for r in range(2)]


@pytest.mark.parametrize("how", ["sigterm-to-the-launcher", "ctrl-c-to-its-group"])
def test_the_launcher_passes_a_signal_on_once_and_waits_for_its_workers(tmp_path, how):
    job = launcher(NOTING_WORKER, tmp_path)
    wait_for(lambda: all(_has_pid(tmp_path, r) for r in range(2)), "workers", 60, job)
    signum = signal.SIGTERM if how.startswith("sigterm") else signal.SIGINT
    if signum == signal.SIGTERM:
        job.send_signal(signum)
    else:
        os.killpg(job.pid, signum)
    job.communicate(timeout=60)
    assert job.returncode == 128 + signum  # after the workers' "checkpoints", not before
    assert [(tmp_path / f"done-{r}").read_text() for r in range(2)] == [str([int(signum)])] * 2  # once each


def test_workers_die_with_a_sigkilled_launcher(tmp_path):
    job = launcher("import os, time; open(os.path.join(os.environ['WORKER_DIR'], 'ready-' + os.environ['R']), 'w')"
                   ".write(str(os.getpid())); time.sleep(120)", tmp_path)
    wait_for(lambda: all(_has_pid(tmp_path, r) for r in range(2)), "workers", 60, job)
    workers = ready(tmp_path)
    job.kill()
    job.wait()
    wait_for(lambda: not any(alive(pid) for pid in workers), "the workers' end", 10)


def test_an_error_is_printed_once_and_a_dead_peers_traceback_never(tmp_path):
    same_mistake = ("import os, sys; open(os.environ['NLIBERT_REPORT_FILE'], 'w').write('nlibert: error: bad\\n');"
                    " sys.exit(2)")
    job = launcher(same_mistake, tmp_path)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 2 and err == "nlibert: error: bad\n"
    # rank 1 is killed; rank 0 then fails on the broken connection, as gloo's "Connection reset by peer".
    peer = textwrap.dedent("""
        import os, signal, sys, time, traceback
        dying = os.path.join(os.environ["WORKER_DIR"], "dying-1")
        if os.environ["R"] == "1":
            open(dying, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        while not os.path.exists(dying):  # rank 1 dies first, however slowly it started
            time.sleep(0.02)
        time.sleep(1)
        try:
            raise RuntimeError("Connection reset by peer")
        except RuntimeError:
            with open(os.environ["NLIBERT_REPORT_FILE"], "w") as f:
                traceback.print_exc(file=f)
        sys.exit(1)
    """)
    job = launcher(peer, tmp_path)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 1
    assert_one_line(err, "the rank 1 process was killed by signal 9")


def test_a_job_that_cannot_work_is_refused_before_it_starts(tmp_path):
    with pytest.raises(ValueError, match="--nproc 99: more processes than the 16 examples of a batch"):
        check_job(99, 16, ["cpu"])
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match=rf"--nproc {cores + 1}: more processes than this machine's {cores} CPU "
                                         r"cores.*--oversubscribe"):
        check_job(cores + 1, 512, ["cpu"])
    check_job(cores + 1, 512, ["cpu"], oversubscribe=True)
    with pytest.raises(ValueError, match="more processes than the 2 GPUs of --device"):
        check_job(3, 512, ["cuda:0", "cuda:1"], oversubscribe=True)
    with pytest.raises(ValueError, match="more processes than the one GPU"):
        check_job(2, 512, ["cuda:0"])
    start_time = time.monotonic()
    job = nlibert("finetune", "--pretrained", "random", "--nproc", "99", "--batch-size", "16", "--device", "cpu",
                  "--out", str(tmp_path / "out"))
    _, err = job.communicate(timeout=120)
    assert job.returncode == 2 and time.monotonic() - start_time < 60
    assert_one_line(err, "--nproc 99: more processes than the 16 examples of a batch")
    assert not (tmp_path / "out").exists()


# --- a real job of two processes ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_stopping_the_nlibert_command_of_a_job_stops_its_workers(train_file, tmp_path, how):
    out = tmp_path / "out"
    job = nlibert(*finetune_args(train_file, out, "--epochs", "20", "--checkpoint-every", "2", "--nproc", "2"))
    state = out / "resume" / "state.json"
    wait_for(state.exists, "first checkpoint", proc=job)
    workers = children(job.pid)
    assert len(workers) == 2
    if how == "sigkill":
        job.kill()
        job.wait()
        wait_for(lambda: not any(alive(pid) for pid in workers), "the workers' end", 10)
        time.sleep(1)
        assert not (out / "model").exists()
        return
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143
    step = json.loads(state.read_text())["step"]
    assert_one_line(err, "stopped by SIGTERM", f"the checkpoint of step {step} is kept")
    assert not any(alive(pid) for pid in workers)
