"""What a test needs that an environment may lack: a backend, which is an extra of the package."""
import os

import pytest

from nlibert.backends import BACKENDS, install_hint, installed_backends, is_installed


def require_backend(name: str) -> None:
    """Skip the calling test, or at a module's top the whole module, when the backend `name` is not
    installed, saying how to install it."""
    if not is_installed(name):
        _missing(f"the {name} backend is not installed ({install_hint(name)})")


def other_backends(source: str) -> list[str]:
    """The installed backends beside `source`, for a test that compares backends: skip when there is
    none, naming the extras that add one."""
    others = [name for name in installed_backends() if name != source]
    if not others:
        hints = "; ".join(install_hint(name) for name in BACKENDS if name != source)
        _missing(f"compares {source} with another backend, and none is installed ({hints})")
    return others


def _missing(reason: str) -> None:
    """Skip for want of a backend; CI's main environment has every backend and sets
    NLIBERT_REQUIRE_BACKENDS=1 (.ci/run), which turns the skip into a failure."""
    if os.environ.get("NLIBERT_REQUIRE_BACKENDS") == "1":
        pytest.fail(reason + "; NLIBERT_REQUIRE_BACKENDS=1 asks for it", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
