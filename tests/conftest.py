"""Shared fixtures. Tests use files they make, a loopback HTTP server, or the real data in ../shared/data."""
import os
import pathlib
import tempfile

# As the `nlibert` command does (cli.py): xdist workers share the cores, and spinning OpenMP threads
# would steal them from each other. Set here, before any test module loads torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# XLA shows the host as two CPU devices, so the JAX backend's data parallelism (`cpu:0,cpu:1`, the
# path `cuda:0,cuda:1` takes) is testable here; set before any test module starts JAX.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
# Where jax keeps compiled programs on disk (jax 0.4.30, Python 3.12's JAX extra): not the user's
# ~/.cache/nlibert/jax, which the backend would fill otherwise.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "nlibert-tests-jax-cache"))

import numpy as np
import pytest

import nlibert  # noqa: F401  before any test module imports mxnet: it keeps every core (nlibert/__init__.py)
from nlibert.backends import BACKENDS
from needs import require_backend

REPO = pathlib.Path(__file__).resolve().parents[1]


def _shared_data_holding(needed: str) -> pathlib.Path:
    """The shared data folder if it holds `needed`; else skip with the reason, or fail in CI."""
    path = pathlib.Path(os.environ.get("NLIBERT_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / needed).exists():
        folder = needed.split("/")[0]
        reason = f"the real data is not at {path} (set NLIBERT_SHARED_DATA to the folder that holds {folder}/)"
        if os.environ.get("NLIBERT_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(reason + "; NLIBERT_REQUIRE_SHARED_DATA=1 asks for it")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real SNLI dev file and WikiText-2 valid/test (never committed; CI has ../shared beside the clone).

    Absent, the tests that need it skip with the reason, so a lone clone passes the README's test
    command; CI sets NLIBERT_REQUIRE_SHARED_DATA=1 (.ci/run), which turns the skip into a failure."""
    return _shared_data_holding("snli_1.0/snli_1.0_dev.txt")


@pytest.fixture(scope="session")
def ag_news_folder() -> pathlib.Path:
    """The shared folder with half of AG News's test split, `dev.csv`, and `classes.txt`; skipped
    or failed when absent, as `shared_data`."""
    return _shared_data_holding("ag_news/dev.csv") / "ag_news"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): the test needs these backends (skipped, naming the extra, "
                                       "where one is not installed)")
    # The test tiers (README): `-m "not slow"` covers every module and backend in a few minutes;
    # `slow` is end-to-end runs, jobs of several processes, kills and signals on real processes,
    # MiniLM and transformers comparisons, the benchmarks' smoke runs.
    config.addinivalue_line("markers", "slow: an end-to-end or multi-process test (the second tier: -m slow)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test needs the backends it is parametrized with (a parameter whose value is a backend's
    name: `backend`, `name`, `to`, ...) and those its `@pytest.mark.backends(...)` names; where one
    is not installed it skips, naming the extra (tests/needs.py), before its fixtures run."""
    params = getattr(item, "callspec", None)
    needed = [value for value in (params.params.values() if params else ()) if isinstance(value, str) and value in BACKENDS]
    for mark in item.iter_markers("backends"):
        needed += mark.args
    for name in dict.fromkeys(needed):
        require_backend(name)
