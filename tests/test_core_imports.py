"""`nlibert.core` is framework-neutral: importing all of it loads neither torch nor mxnet."""
import pkgutil
import subprocess
import sys

import nlibert.core


def test_core_imports_no_framework():
    modules = sorted(f"nlibert.core.{m.name}" for m in pkgutil.iter_modules(nlibert.core.__path__))
    assert {"nlibert.core.data_hub", "nlibert.core.snli", "nlibert.core.packing", "nlibert.core.batching",
            "nlibert.core.sample", "nlibert.core.vocab", "nlibert.core.io", "nlibert.core.wordpiece"} <= set(modules)
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mxnet'))\n"
            "assert not bad, bad\n"
            "print('ok', len(sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
