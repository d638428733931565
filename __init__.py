"""nlibert: the d2l chapter "Natural Language Inference: Fine-Tuning BERT" on MXNet Gluon and PyTorch."""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# Every core for MXNet, and for torch beside it. MXNet 1.9's engine (src/engine/openmp.cc), unless
# OMP_NUM_THREADS or MXNET_OMP_MAX_THREADS is set, takes half of omp_get_num_procs() on Intel CPUs
# (it assumes hyper-threading) as its operators' thread count, and calls omp_set_num_threads with it
# when `import mxnet` starts the engine. On a 2-core machine MXNet then runs on one core, and so does
# torch in the same process (libgomp's setting is shared). Naming the cores this process may use
# before MXNet starts keeps both at full width. This runs first whatever a user imports from nlibert
# (the CLI, the backends, a notebook's `from nlibert.backends.mxnet import ...`); a user's own
# setting is left alone. Once MXNet has started, its count cannot be changed: importing mxnet before
# nlibert is warned about by nlibert.backends.mxnet.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MXNET_OMP_MAX_THREADS")
_user_set_threads = any(name in _os.environ for name in _THREAD_VARIABLES)
_mxnet_started_before_nlibert = "mxnet" in _sys.modules and not _user_set_threads
if not _user_set_threads:
    _cores = len(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else (_os.cpu_count() or 1)
    _os.environ["MXNET_OMP_MAX_THREADS"] = str(_cores)
