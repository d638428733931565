"""Data-parallel jobs of several processes (core/distributed.py): the rows each rank computes, and,
for every backend that runs as several processes, that 2 processes on 127.0.0.1 end where one
process ends (parameters within 1e-5, per-epoch figures equal to rounding), that only rank 0 writes,
and that a worker killed mid-run ends the whole job with a clear message and no hang, after which
the same command resumes from the last checkpoint."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nlibert import jobs
from nlibert.backends import BACKENDS, backend_info, load_backend
from nlibert.core.distributed import LaunchProcess, World, free_port, launch, worker_threads
from nlibert.core.sample import write_sample_snli
from nlibert.core.settings import FinetuneSettings, PretrainSettings

# The backends whose jobs run as several processes: all of them (fine-tuning; JAX pretrains as one).
MULTI_PROCESS = list(BACKENDS)
MULTI_PROCESS_PRETRAINING = [name for name in BACKENDS if backend_info(name).multi_process_pretraining]


# --- core: shards, devices, the launcher -----------------------------------------------------------

@pytest.mark.parametrize("num_rows,size", [(16, 2), (17, 2), (5, 3), (3, 3), (2, 4), (0, 2), (1000, 7)])
def test_shards_cover_a_batch_once_in_order_and_differ_by_at_most_one_row(num_rows, size):
    bounds = [World(rank=r, size=size).shard(num_rows) for r in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == num_rows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in rank order
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert sizes == [len(part) for part in np.array_split(np.arange(num_rows), size)]


def test_a_training_batch_smaller_than_the_job_is_refused_by_name():
    with pytest.raises(ValueError, match="batch of 1 examples cannot be split across 2 processes.*--batch-size"):
        World(rank=1, size=2).training_shard(1)
    assert World(rank=1, size=2).training_shard(2) == (1, 2)


def test_each_process_drives_its_own_device_of_a_list():
    devices = ["cuda:0", "cuda:1"]
    assert World().local_devices(devices) == devices  # one process: all of them (DataParallel, sharding)
    assert World(rank=1, size=2, local_rank=1).local_devices(devices) == ["cuda:1"]
    assert World(rank=1, size=2, local_rank=1).local_devices(["cpu"]) == ["cpu"]
    with pytest.raises(ValueError, match="process 2 on this machine has no device"):
        World(rank=2, size=3, local_rank=2).local_devices(devices)


def test_free_port_is_on_loopback_and_bindable():
    import socket
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert worker_threads(1) >= worker_threads(2) >= 1


def test_launch_stops_every_process_when_one_fails_and_reports_it(capsys):
    sleeper = LaunchProcess("helper", {}, (sys.executable, "-c", "import time; time.sleep(60)"))
    failing = LaunchProcess("rank 1", {}, (sys.executable, "-c", "import sys; sys.exit(3)"))
    start = time.monotonic()
    # Workers are the processes without an argv of their own; here a helper fails while another waits.
    code = launch([sys.executable, "-c", "import time; time.sleep(60)"], [sleeper, failing, LaunchProcess("rank 0", {}, None)], grace_s=5)
    assert code == 1 and time.monotonic() - start < 30  # the 60 s sleeper was stopped, not waited for
    assert "the rank 1 process exited with code 3" in capsys.readouterr().err


def test_a_users_mistake_in_a_process_is_the_jobs_exit_2_with_that_process_message_alone(capsys):
    sleeper = LaunchProcess("helper", {}, (sys.executable, "-c", "import time; time.sleep(60)"))
    mistake = LaunchProcess("rank 1", {}, (sys.executable, "-c", "import sys; sys.exit(2)"))
    start = time.monotonic()
    code = launch([sys.executable, "-c", "import time; time.sleep(60)"],
                  [sleeper, mistake, LaunchProcess("rank 0", {}, None)], grace_s=5)
    assert code == 2 and time.monotonic() - start < 30
    assert "stopped the job's other processes" not in capsys.readouterr().err  # the process said what was wrong


# --- jobs of two processes --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_snli(tmp_path_factory.mktemp("data") / "snli", num_train=96, num_test=16, seed=4)


def options(backend: str, data, out, **extra) -> list[str]:
    # Dropout 0: one process and two draw different masks otherwise. 6 steps an epoch.
    settings = {"backend": backend, "pretrained": "random", "data": str(data), "max-len": "32", "batch-size": "16",
                "epochs": "2", "lr": "1e-4", "dropout": "0", "device": "cpu", "out": str(out),
                "checkpoint-every": "2", **extra}
    return [f"--{k}={v}" for k, v in settings.items()]


def nlibert(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nlibert.cli", "finetune", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def one_process(backend: str, data, out, **extra) -> dict:
    """The reference: the same run in this process."""
    settings = dict(backend=backend, pretrained="random", data=str(data), max_len=32, batch_size=16, epochs=2,
                    lr=1e-4, dropout=0.0, device="cpu", out=str(out), checkpoint_every=2)
    return jobs.run_finetune(FinetuneSettings(**{**settings, **extra}))


def assert_same_training(one: dict, two: dict, backend: str) -> None:
    """Per-epoch figures equal to rounding, final parameters within 1e-5. (The attention's key bias
    has a zero true gradient, softmax being blind to a shift shared by all keys: Adam turns its
    rounding noise into steps of up to lr, here 1e-4 a step, in one run or two processes alike.)"""
    for a, b in zip(one["epochs"], two["epochs"], strict=True):
        assert a["num_examples"] == b["num_examples"] and a["train_acc"] == b["train_acc"]
        assert a["test_acc"] == b["test_acc"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    read = load_backend(backend).read_params
    pa, pb = (read(os.path.join(m["model_dir"], "classifier.params")) for m in (one, two))
    assert pa.keys() == pb.keys()
    for key in pa:
        if key.endswith(("W_k.bias", "attention_W_k_bias")):
            continue
        np.testing.assert_allclose(pa[key], pb[key], rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("backend", MULTI_PROCESS)
def test_two_processes_train_what_one_process_trains_and_only_rank_0_writes(backend, sample, tmp_path):
    one = one_process(backend, sample, tmp_path / "one")
    job = nlibert(*options(backend, sample, tmp_path / "two"), "--nproc=2", "--log-every=4")
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert_same_training(one, two, backend)
    # Rank 0 alone printed (one set of the book's lines, one line per epoch and per 4 steps) and
    # wrote (no file of another rank; one log entry per logged step and epoch).
    assert out.count("examples/sec on") == 1 and out.count("wrote ") == 1, out
    assert re.findall(r"^(epoch \d+|step \d+),", out, re.M) == ["step 4", "epoch 1", "step 8", "step 12", "epoch 2"]
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["step"]) for e in log] == [("step", 4), ("epoch", 6), ("step", 8), ("step", 12),
                                                     ("epoch", 12)]
    assert sorted(os.listdir(tmp_path / "two" / "resume")) == sorted(os.listdir(tmp_path / "one" / "resume"))


def _workers(launcher_pid: int) -> list[int]:
    """The nlibert processes the launcher started (its children running nlibert.cli)."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    workers = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"nlibert.cli" in f.read():
                    workers.append(pid)
        except FileNotFoundError:
            pass
    return workers


@pytest.mark.slow
@pytest.mark.parametrize("backend", MULTI_PROCESS)
def test_a_killed_worker_ends_the_job_and_the_same_command_resumes(backend, sample, tmp_path):
    out = tmp_path / "two"
    args = [*options(backend, sample, out, epochs=3), "--nproc=2"]
    job = nlibert(*args)
    state = out / "resume" / "state.json"
    deadline = time.monotonic() + 240
    while not state.exists():  # the first checkpoint: step 2 of 18
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    workers = _workers(job.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    _, err = job.communicate(timeout=120)  # no hang: the launcher stops the survivors
    assert job.returncode == 1
    assert "process was killed by signal 9; stopped the job's other processes" in err
    assert "run the same command to resume" in err
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    assert all(not os.path.exists(f"/proc/{pid}") or _zombie(pid) for pid in workers)
    stopped_at = json.loads(state.read_text())["step"]
    assert 2 <= stopped_at < 18

    again = nlibert(*args)
    printed, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"resuming from {out / 'resume'}" in printed
    two = json.loads((out / "metrics.json").read_text())
    assert two["resumed_from_step"] == stopped_at and two["steps"] == 18
    assert_same_training(one_process(backend, sample, tmp_path / "one", epochs=3), two, backend)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("backend", MULTI_PROCESS_PRETRAINING)
def test_two_processes_pretrain_what_one_process_pretrains(backend, tmp_path):
    """MLM + NSP means over the whole batch (each rank's share divides by the batch's totals):
    per-step losses equal to rounding, final parameters within 1e-5 (key biases aside, as above)."""
    from test_pretrain import TINY, write_wiki
    corpus = write_wiki(tmp_path / "wikitext-tiny")
    settings = dict(backend=backend, corpus=str(corpus), steps=4, batch_size=32, max_len=24, device="cpu",
                    dropout=0.0, lr=1e-3, checkpoint_every=2, **TINY)
    one = jobs.run_pretrain(PretrainSettings(out=str(tmp_path / "one"), **settings))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    job = subprocess.run([sys.executable, "-m", "nlibert.cli", "pretrain", *args, f"--out={tmp_path / 'two'}",
                          "--nproc=2"], capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr
    assert job.stdout.count("sentence pairs/sec on") == 1
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["processes"] == 2 and two["completed"]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert (a["step"], a["num_pairs"]) == (b["step"], b["num_pairs"])
        assert a["mlm_loss"] == pytest.approx(b["mlm_loss"], rel=1e-6)
        assert a["nsp_loss"] == pytest.approx(b["nsp_loss"], rel=1e-6)
    read = load_backend(backend).read_params
    pa, pb = (read(str(tmp_path / run / "pretrained.params")) for run in ("one", "two"))
    for key in pa:
        if not key.endswith(("W_k.bias", "attention_W_k_bias")):
            np.testing.assert_allclose(pa[key], pb[key], rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("backend", [name for name in BACKENDS if name not in MULTI_PROCESS_PRETRAINING])
def test_pretraining_as_several_processes_is_refused_by_name_before_any_starts(backend, tmp_path):
    job = subprocess.run([sys.executable, "-m", "nlibert.cli", "pretrain", f"--backend={backend}", "--nproc=2",
                          f"--corpus={tmp_path}", f"--out={tmp_path / 'out'}"], capture_output=True, text=True,
                         timeout=120)
    assert job.returncode == 2 and f"--nproc: the {backend} backend pretrains as one process" in job.stderr
    assert not (tmp_path / "out").exists()


def test_a_gpu_list_is_one_process_per_gpu_in_torch_fast_mode_only():
    """`--device cuda:0,cuda:1`: DDP processes in fast mode where the backend trains GPUs that way
    (the registry's `process_per_device`), the book's one process driving them all in book mode."""
    gpus = FinetuneSettings(device="cuda:0,cuda:1")
    assert gpus.processes(backend_info("torch").process_per_device) == 2
    assert gpus.replace(mode="book").processes(True) == 1
    assert gpus.processes(backend_info("mxnet").process_per_device) == 1  # split_and_load, unless --nproc
    assert FinetuneSettings(device="cpu").processes(True) == 1
    assert gpus.replace(nproc=3).processes(False) == 3
    assert PretrainSettings(mode="fast", device="cuda:0,cuda:1").processes(True) == 2
    with pytest.raises(ValueError, match="--nproc must be a positive integer"):
        FinetuneSettings(nproc=0)
