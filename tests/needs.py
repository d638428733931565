"""What a test needs that an environment may lack: a backend, which is an extra of the package."""
import os

import pytest

from nlibert.backends import install_hint, is_installed


def require_backend(name: str) -> None:
    """Skip the calling test, or at a module's top the whole module, when the backend `name` is not
    installed, saying how to install it. CI's main environment has every backend and sets
    NLIBERT_REQUIRE_BACKENDS=1 (.ci/run), which turns the skip into a failure."""
    if is_installed(name):
        return
    reason = f"the {name} backend is not installed ({install_hint(name)})"
    if os.environ.get("NLIBERT_REQUIRE_BACKENDS") == "1":
        pytest.fail(reason + "; NLIBERT_REQUIRE_BACKENDS=1 asks for it", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def other_backends(source: str) -> list[str]:
    """The installed backends beside `source`, for a test that compares backends: skip when there is
    none, naming the extras that add one (a failure under NLIBERT_REQUIRE_BACKENDS=1, as above)."""
    from nlibert.backends import BACKENDS, installed_backends
    others = [name for name in installed_backends() if name != source]
    if others:
        return others
    hints = "; ".join(install_hint(name) for name in BACKENDS if name != source)
    reason = f"compares {source} with another backend, and none is installed ({hints})"
    if os.environ.get("NLIBERT_REQUIRE_BACKENDS") == "1":
        pytest.fail(reason + "; NLIBERT_REQUIRE_BACKENDS=1 asks for it", pytrace=False)
    pytest.skip(reason)
