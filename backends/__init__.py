"""The registry of backends: the one place that names the frameworks.

Each backend is a package exporting the names written down in `nlibert.backends.contract`, with the
same signatures (a test holds every registered backend to it). Its `name` is also the `format` its
checkpoint folders record in config.json, and the key of its rename table in core/names.py.
Importing this module imports no framework: `load_backend` does, on demand. Each backend is an
extra of the package (`pip install 'nlibert[mxnet]'`, setup.cfg), so any of them may be missing:
`installed_backends()` are those present, and `load_backend` names the extra of one that is not.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import platform
import sys
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str  # `--backend NAME`, and the checkpoint format its folders record
    module: str  # the package exporting the contract's names
    framework: str  # the framework's import name, to tell whether it is installed
    label: str  # the framework and its version, for messages
    # setup.cfg's extra `pip install 'nlibert[NAME]'` and its environment marker: where pip installs
    # the framework at all (tests/test_packaging.py holds setup.cfg to these two fields).
    marker: str = ""
    where: str = ""  # the marker in words
    fused_adam: bool = False  # `make_trainer(fused=True)` has a fused kernel (metrics.json's fast_path records it)
    # `--precision` values its FinetuneStep takes (torch: bfloat16 autocast of the forward pass);
    # FinetuneSettings checks them before any data or checkpoint is read.
    precisions: tuple[str, ...] = ("float32",)
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
    BackendInfo("torch", "nlibert.backends.torch", "torch", "PyTorch 2.13",
                marker='platform_system != "Darwin" or platform_machine != "x86_64"',
                where="Linux, Windows and Apple-silicon macOS", fused_adam=True, precisions=("float32", "bfloat16"),
                process_per_device=True, job_env="WORLD_SIZE"),
    BackendInfo("mxnet", "nlibert.backends.mxnet", "mxnet", "MXNet 1.9.1",
                marker='platform_system == "Linux" and platform_machine == "x86_64" and python_version < "3.12"',
                where="Linux x86_64 with Python 3.10 or 3.11", job_env="DMLC_ROLE"),
    BackendInfo("jax", "nlibert.backends.jax", "jax", "JAX 0.4.23, 0.4.30 on Python 3.12", marker='python_version < "3.13"',
                where="Python 3.10 to 3.12", job_env="WORLD_SIZE", multi_process_pretraining=False,
                # Measured for MiniLM-L6 on a 2-core CPU (benchmarks/bench_jax_compile.py): a new
                # width's training programs ~2.4 s, as long as ~12,000 rows x positions of steps take
                # beyond a step's fixed cost (0.41 s at 32 x 32, 0.61 s at 32 x 64).
                compile_cost=12_000),
)  # in order of preference: the CLI's default --backend is the first one installed
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


def installed_versions() -> list[str]:
    """'DISTRIBUTION VERSION' of each installed backend's framework (`nlibert --version`): the
    distribution, as a GPU build such as mxnet-cu117 provides the same module as mxnet."""
    providers = importlib.metadata.packages_distributions()
    found = []
    for name in installed_backends():
        for dist in providers.get(backend_info(name).framework, [])[:1]:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
    return found


def default_backend() -> str:
    """The first installed backend (torch first); the first of all when none is, so that using it
    says what to install."""
    return next(iter(installed_backends()), BACKENDS[0])


def install_hint(name: str) -> str:
    """How to install the backend `name` here: its extra, or where its extra installs anything."""
    from packaging.markers import Marker  # pip's own reading of setup.cfg's marker

    info = backend_info(name)
    system, machine = platform.system(), platform.machine()
    if not info.marker or Marker(info.marker).evaluate({"platform_system": system, "platform_machine": machine}):
        return f"pip install 'nlibert[{info.name}]'"
    here = f"Python {sys.version_info[0]}.{sys.version_info[1]} on {system} {machine}"
    return f"{info.label} exists for {info.where} only, not for {here}: its extra 'nlibert[{info.name}]' installs nothing here"


def load_backend(name: str) -> ModuleType:
    """Import the backend `name` (its framework with it); an uninstalled framework is an error that
    says which extra to install."""
    info = backend_info(name)
    if not is_installed(name):
        raise ModuleNotFoundError(f"the {name} backend ({info.label}) is not installed: {install_hint(name)}")
    return importlib.import_module(info.module)


def read_params_in(path: str, fmt: str) -> dict:
    """The tensors of a params file in backend `fmt`'s format, keyed by that format's names, read by
    that backend's own reader: how every backend reads every format (a torch backend given the
    book's MXNet folder reads it through MXNet). The format's framework must be installed."""
    if not is_installed(fmt):
        raise ModuleNotFoundError(f"{path}: a {fmt}-format parameter file; reading it needs the {fmt} backend "
                                  f"({backend_info(fmt).label}): {install_hint(fmt)} (or convert the folder where "
                                  f"{fmt} is installed)")
    return load_backend(fmt).read_params(path)
