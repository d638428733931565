"""The registry of backends: the one place that names the frameworks.

Each backend is a package exporting the names written down in `nlibert.backends.contract`, with the
same signatures (a test holds every registered backend to it). Its `name` is also the `format` its
checkpoint folders record in config.json, and the key of its rename table in core/names.py.
Importing this module imports no framework: `load_backend` does, on demand.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str  # `--backend NAME`, and the checkpoint format its folders record
    module: str  # the package exporting the contract's names
    framework: str  # the framework's import name, to tell whether it is installed
    requirement: str  # what to install when it is not
    fused_adam: bool = False  # `make_trainer(fused=True)` has a fused kernel (metrics.json's fast_path records it)
    # Fast mode trains a `--device` list of GPUs as one process per GPU (DistributedDataParallel),
    # not one process driving them all (the book's DataParallel, which `--mode book` keeps).
    process_per_device: bool = False
    # The environment variable that marks a process as part of a job its engine's launcher started
    # (torchrun's WORLD_SIZE, ps-lite's DMLC_ROLE): such a process never launches a job itself.
    job_env: str = ""
    # `nlibert pretrain --nproc N` runs as N processes (JAX's PretrainStep is one process's, so far).
    multi_process_pretraining: bool = True
    # A backend that compiles one program per input shape (JAX): what one compile (trace, lower and
    # XLA) costs, in the rows x positions of training steps the same time computes. The fast path's
    # widths are then planned per run (`core.batching.plan_widths`); 0: any width is free.
    compile_cost: int = 0


REGISTRY = (
    BackendInfo("torch", "nlibert.backends.torch", "torch", "torch==2.13.0", fused_adam=True,
                process_per_device=True, job_env="WORLD_SIZE"),
    BackendInfo("mxnet", "nlibert.backends.mxnet", "mxnet", "mxnet==1.9.1", job_env="DMLC_ROLE"),
    BackendInfo("jax", "nlibert.backends.jax", "jax", "jax==0.4.23 jaxlib==0.4.23 flax==0.8.4 optax==0.2.1",
                job_env="WORLD_SIZE", multi_process_pretraining=False,
                # Measured for MiniLM-L6 on a 2-core CPU: a train step's program ~100 s under load,
                # as long as ~50 steps of 32 rows x 32 positions (bert.small: about the same ratio).
                compile_cost=50_000),
)
BACKENDS = tuple(info.name for info in REGISTRY)
_BY_NAME = {info.name: info for info in REGISTRY}


def backend_info(name: str) -> BackendInfo:
    if name not in _BY_NAME:
        raise ValueError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    return _BY_NAME[name]


def is_installed(name: str) -> bool:
    """Whether the backend's framework can be imported (without importing it)."""
    return importlib.util.find_spec(backend_info(name).framework) is not None


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if is_installed(name)]


def load_backend(name: str) -> ModuleType:
    """Import the backend `name` (its framework with it); an uninstalled framework is an error that
    says what to install."""
    info = backend_info(name)
    if not is_installed(name):
        raise ModuleNotFoundError(f"the {name} backend needs {info.requirement}: pip install {info.requirement}")
    return importlib.import_module(info.module)


def read_params_in(path: str, fmt: str) -> dict:
    """The tensors of a params file in backend `fmt`'s format, keyed by that format's names, read by
    that backend's own reader: how every backend reads every format (a torch backend given the
    book's MXNet folder reads it through MXNet). The format's framework must be installed."""
    info = backend_info(fmt)
    if not is_installed(fmt):
        raise ModuleNotFoundError(f"{path}: a {fmt}-format parameter file; reading it needs {info.requirement}: "
                                  f"pip install {info.requirement} (or convert it where {fmt} is installed)")
    return load_backend(fmt).read_params(path)
