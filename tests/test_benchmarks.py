"""The benchmarks' arithmetic and plumbing (never their speed): the FLOP count against a hand count,
the peak-memory probe, and `bench_finetune.py` end to end on a tiny configuration."""
import json
import mmap
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest


BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from _common import PeakRSS, seed_interval, training_flops  # noqa: E402

H, F, LAYERS = 4, 8, 2


def hand_count(L, layers=LAYERS):
    """The issue's formula for one example, written out: 2 FLOPs per multiply-add, x3 for fwd + bwd."""
    per_layer = 4 * L * H * H + 2 * L * L * H + 2 * L * H * F
    return 2 * 3 * (layers * per_layer + H * H + 3 * H)


def test_useful_flops_count_valid_tokens_only():
    # L=3: 6 * (2 * (192 + 72 + 192) + 16 + 12) = 5640; L=5: 6 * (2 * (320 + 200 + 320) + 28) = 10248
    assert hand_count(3) == 5640 and hand_count(5) == 10248
    assert training_flops(np.array([3, 5]), None, H, F, LAYERS) == 5640 + 10248


def test_executed_flops_count_the_padding_and_the_cls_only_last_block():
    assert training_flops(np.array([3, 5]), 6, H, F, LAYERS) == 2 * hand_count(6)
    # With cls_only the last block computes K and V at all 6 positions (4 L H^2 = 384) but the
    # Q and O projections (4 H^2 = 64), the FFN (4 H F = 128) and attention (4 L H = 96) at <cls> only.
    last_block = 3 * (384 + 64 + 128 + 96)
    per_example = hand_count(6, layers=1) + last_block
    assert training_flops(np.array([3, 5]), 6, H, F, LAYERS, cls_only=True) == 2 * per_example


def test_peak_rss_sees_memory_touched_inside_the_window():
    probe = PeakRSS().start()
    # 64 MiB of fresh pages straight from the kernel (an allocator could reuse resident memory), written
    # so they become resident, then released: the peak must still show them.
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * len(block))
    block.close()
    assert probe.stop() >= 48 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", [("torch", "cpu"), ("mxnet", "cpu:0,cpu:1"), ("jax", "cpu:0,cpu:1")])
def test_bench_finetune_runs_both_paths_on_a_tiny_configuration(tmp_path, shared_data, backend, device):
    """Every backend once (a JAX child compiles bert.small's step for each shape, tens of seconds
    here, so it runs once): torch on the CPU, MXNet and JAX splitting each batch across two CPU
    devices, the code path that `--device cuda:0,cuda:1` takes with GPUs."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_finetune.py"), "--backend", backend, "--device", device,
         "--batch-size", "4", "--steps", "1", "--book-steps", "1", "--warmup", "0", "--pairs", "1",
         "--peak-size", "128", "--json", str(out), *(["--e2e", "8"] if backend == "torch" else [])],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "NLIBERT_SHARED_DATA": str(shared_data)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{backend}: fast / book = " in proc.stdout
    variants = json.loads(out.read_text())["backends"][backend]["variants"]
    book, fast = variants["book"], variants["fast"]
    assert book["ratio_to_book"] == pytest.approx(1.0)
    assert fast["ratio_to_book"] == pytest.approx(fast["examples_per_sec"] / book["examples_per_sec"])
    assert 0 < fast["mfu"] and 0 < book["mfu"] and fast["mfu_issue_peak"] > 0
    assert book["mean_width"] == 128 and fast["mean_width"] < 128  # padded vs trimmed
    assert all(v["peak_mem_bytes"] >= 0 for v in (book, fast))
    one, two = {"torch": ("[device(type='cpu')]", None), "mxnet": ("[cpu(0)]", "[cpu(0), cpu(1)]"),
                "jax": ("[CpuDevice(id=0)]", "[CpuDevice(id=0), CpuDevice(id=1)]")}[backend]
    assert fast["runs"][0]["devices"] == (one if device == "cpu" else two)
    if backend == "jax":  # every padded shape compiled before the timer, and reported
        runs = book["runs"] + fast["runs"]
        assert all(r["before"]["shapes"] >= 1 and r["before"]["compile_seconds"] > 0 for r in runs)
    assert f"== summary: batch 4, max_len 128, device {device} ==" in proc.stdout
    assert fast["warmup_seconds"] >= 0 and "warm-up s" in proc.stdout
    if backend == "torch":  # the MiniLM command end to end (JAX's beside it would compile for minutes here)
        e2e = json.loads(out.read_text())["end_to_end"]["torch"]
        assert e2e["wall_seconds"] > 0 and e2e["examples_per_sec"] > 0 and e2e["compiles"] is None
        assert "== end to end: nlibert finetune --pretrained minilm-l6" in proc.stdout


def test_paired_difference_on_a_hand_computed_example():
    from accuracy_book_vs_fast import paired_difference
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    book = [0, 1, 2, 0, 1, 2, 1, 2, 0, 2]  # right on 0-5: 6/10
    fast = [0, 1, 2, 0, 1, 1, 0, 1, 2, 1]  # wrong on 5 (b), right on 6, 7, 8 (c), wrong differently on 9
    p = paired_difference(labels, book, fast)
    assert (p["n"], p["b"], p["c"], p["disagree"]) == (10, 1, 3, 5)
    assert p["book_acc"] == pytest.approx(0.6) and p["fast_acc"] == pytest.approx(0.8)
    # diff = (3 - 1) / 10 = 0.2; se = sqrt(1 + 3 - 2^2 / 10) / 10 = sqrt(3.6) / 10 = 0.189737
    assert p["diff_pts"] == pytest.approx(20.0)
    assert p["se_pts"] == pytest.approx(18.9737, abs=1e-4)
    assert p["ci_pts"] == pytest.approx((20 - 1.96 * 18.9737, 20 + 1.96 * 18.9737), abs=1e-3)
    # No discordant pairs: a zero-width interval at 0.
    same = paired_difference(labels, book, book)
    assert (same["diff_pts"], same["se_pts"], same["disagree"], same["ci_pts"]) == (0, 0, 0, (0, 0))


def test_seed_interval_is_the_t_interval_of_the_mean_difference():
    low, high = seed_interval([1.0, -1.0, 3.0])  # mean 1, sd 2, se 2/sqrt(3), t(0.975, 2) = 4.303
    half = 4.303 * 2 / np.sqrt(3)
    assert (low, high) == pytest.approx((1 - half, 1 + half))
    assert seed_interval([0.5, 0.5]) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="two or more"):
        seed_interval([1.0])


@pytest.mark.slow
def test_pretraining_worth_compares_against_the_pretrainings_own_init(tmp_path, monkeypatch):
    """End to end on a tiny checkpoint pretrained with --init xavier: both fine-tunes per seed, the
    random baseline drawn with the pretraining's init (Xavier: no N(0, 1) positional embedding),
    the seeds' t-interval in worth.json."""
    import torch
    from nlibert import jobs
    from nlibert.backends.torch.checkpoint import read_params
    from nlibert.core.sample import write_sample_snli
    from nlibert.core.settings import PretrainSettings
    from pretraining_worth import main as worth_main
    from test_pretrain import write_wiki
    torch.set_num_threads(1)
    sample = write_sample_snli(tmp_path / "snli", num_train=120, num_test=10, seed=1)
    corpus = write_wiki(tmp_path / "wiki")
    pretrained = tmp_path / "pretrained"
    jobs.run_pretrain(PretrainSettings(corpus=str(corpus), steps=2, batch_size=8, max_len=24, num_hiddens=16,
                                       ffn_num_hiddens=32, num_heads=2, num_layers=1, out=str(pretrained),
                                       init="xavier"))
    out = tmp_path / "worth"
    worth_main(["--pretrained", str(pretrained), "--out", str(out), "--snli-dev", f"{sample}/snli_1.0_train.txt",
                "--seeds", "0", "1", "--epochs", "1", "--batch-size", "16", "--max-len", "24"])
    report = json.loads((out / "worth.json").read_text())
    assert [row["seed"] for row in report["runs"]] == [0, 1]
    assert report["pretraining"]["hyperparameters"]["init"] == "xavier"
    for row in report["runs"]:
        assert row["difference"] == pytest.approx(row["pretrained"]["test_acc"] - row["random_init"]["test_acc"])
    low, high = report["difference_95pct_t_interval_pts"]
    assert low <= 100 * np.mean([row["difference"] for row in report["runs"]]) <= high
    for seed in (0, 1):
        pos = read_params(out / f"random-init-{seed}" / "pretrained.params")["encoder.pos_embedding"]
        assert np.abs(pos).max() < 0.5  # Xavier's bound here; torch's own init draws N(0, 1)


@pytest.mark.slow
def test_bench_finetune_nproc_times_one_process_against_a_job_of_two(tmp_path, shared_data):
    """`--nproc 2`: the fast path on one process and as a DDP job of two (CPU: a smoke test), with the
    scaling efficiency = examples/sec / (2 x the one-process examples/sec)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_finetune.py"), "--backend", "torch", "--variants", "fast",
         "--nproc", "2", "--batch-size", "4", "--steps", "1", "--book-steps", "1", "--warmup", "0", "--pairs", "1",
         "--peak-size", "128", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NLIBERT_SHARED_DATA": str(shared_data)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a smoke test of the distributed path, not a scaling result" in proc.stdout
    scaling = json.loads(out.read_text())["scaling"]["torch"]
    assert list(scaling) == ["fast"]  # the paths --variants names
    for path in scaling:
        one, two = scaling[path]
        assert (one["processes"], two["processes"]) == (1, 2)
        assert one["efficiency"] == pytest.approx(1.0)
        assert two["efficiency"] == pytest.approx(two["examples_per_sec"] / (2 * one["examples_per_sec"]))
