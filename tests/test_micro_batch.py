"""`--micro-batch N` computes each batch in chunks of N examples and sums their gradients."""
import numpy as np
import pytest

from nlibert import jobs
from nlibert.backends import BACKENDS
from nlibert.core.batching import chunk_bounds, rows
from nlibert.core.sample import write_sample_snli
from nlibert.core.settings import FinetuneSettings


def test_chunk_bounds_cover_every_row_once():
    assert chunk_bounds(10, None) == [(0, 10)]
    assert chunk_bounds(10, 16) == [(0, 10)]
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    batch = (np.arange(10), np.arange(10) * 2)
    assert [r.tolist() for r in rows(batch, 4, 8)] == [[4, 5, 6, 7], [8, 10, 12, 14]]
    assert rows(np.arange(5), 1, 3).tolist() == [1, 2]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample_snli(tmp_path_factory.mktemp("data") / "snli", num_train=64, num_test=16, seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_finetune_job_takes_micro_batch(backend, sample, tmp_path):
    """The job passes --micro-batch to the step and records it; with dropout off its first epoch's
    loss is the whole-batch run's (the exact step is tested in tests/test_backend_fast.py; later epochs
    drift apart by Adam's amplification of rounding where gradients are near 0)."""
    def run(name, micro_batch):
        return jobs.run_finetune(FinetuneSettings(
            backend=backend, pretrained="random", data=str(sample), max_len=32, batch_size=16,
            epochs=1, lr=1e-3, dropout=0.0, device="cpu", out=str(tmp_path / name), micro_batch=micro_batch))

    whole, chunked = run("whole", None), run("chunked", 5)
    assert chunked["hyperparameters"]["micro_batch"] == 5 and whole["hyperparameters"]["micro_batch"] is None
    assert chunked["epochs"][0]["loss"] == pytest.approx(whole["epochs"][0]["loss"], rel=1e-3)
    with pytest.raises(ValueError, match="--micro-batch must be a positive integer"):
        FinetuneSettings(micro_batch=0)
