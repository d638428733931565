"""What users install: setup.cfg's extras agree with the registry, CI's exact versions satisfy the
ranges, a missing backend is skipped by the tests and named (with its extra) by the CLI."""
import configparser
import os
import pathlib
import platform
import subprocess
import sys
import textwrap

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from nlibert import __version__, backends, cli
from nlibert.backends import BACKENDS, REGISTRY, install_hint, installed_backends

REPO = pathlib.Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return config


def _requirements(text: str) -> list[Requirement]:
    return [Requirement(line) for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


# Every place a marker can tell apart here: Pythons, systems and machines.
ENVIRONMENTS = [{"python_version": f"3.{minor}", "python_full_version": f"3.{minor}.0", "platform_system": system,
                 "platform_machine": machine, "sys_platform": system.lower()}
                for minor in range(8, 15) for system in ("Linux", "Darwin", "Windows") for machine in ("x86_64", "arm64")]


def _holds(marker, environment: dict) -> bool:
    return marker is None or marker.evaluate(environment)


def test_each_backend_is_an_extra_whose_marker_is_the_registrys():
    """Each extra installs its framework wherever the registry's marker holds and nothing where it
    does not (a line may hold on less: JAX's pins differ on Python 3.12)."""
    extras = _setup_cfg()["options.extras_require"]
    for info in REGISTRY:
        requirements = _requirements(extras[info.name])
        registry = Marker(info.marker) if info.marker else None
        for environment in ENVIRONMENTS:
            allowed = _holds(registry, environment)
            assert any(r.name == info.framework and _holds(r.marker, environment) for r in requirements) == allowed, \
                (info.name, environment)
            for requirement in requirements:
                assert allowed or not _holds(requirement.marker, environment), (info.name, environment, str(requirement))
    (everything,) = _requirements(extras["all"])
    assert everything.name == "nlibert" and everything.extras == set(BACKENDS) and not everything.marker


def test_ci_pins_satisfy_every_range_that_applies_here():
    """.ci/constraints.txt (the exact versions CI installs with) lies inside setup.cfg's ranges:
    `pip install -c .ci/constraints.txt '.[all,test]'` has a solution."""
    config, pins = _setup_cfg(), _constraints()
    lists = [config["options"]["install_requires"]] + list(config["options.extras_require"].values())
    checked = 0
    for requirement in (r for text in lists for r in _requirements(text)):
        if requirement.name == "nlibert" or (requirement.marker and not requirement.marker.evaluate()):
            continue
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not pinned in .ci/constraints.txt"
        assert requirement.specifier.contains(version, prereleases=True), (str(requirement), version)
        checked += 1
    assert checked >= 10
    assert config["metadata"]["version"] == "attr: nlibert.__version__"


def test_the_default_backend_is_the_first_installed(monkeypatch):
    assert cli.build_parser().parse_args(["finetune"]).backend == backends.default_backend()
    monkeypatch.setattr(backends, "is_installed", lambda name: name != "torch")
    assert cli.build_parser().parse_args(["finetune"]).backend == "mxnet"
    assert cli.build_parser().parse_args(["pretrain"]).backend == "mxnet"
    monkeypatch.setattr(backends, "is_installed", lambda name: False)
    assert cli.build_parser().parse_args(["finetune"]).backend == "torch"  # which then names its extra


@pytest.mark.parametrize("name", BACKENDS)
def test_a_missing_backend_is_one_error_line_naming_its_extra(name, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(backends, "is_installed", lambda other: other != name)
    out = tmp_path / "out"
    assert cli.main(["finetune", "--backend", name, "--pretrained", "random", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"nlibert: error: the {name} backend ({backends.backend_info(name).label}) "
                                f"is not installed: pip install 'nlibert[{name}]'"], err
    assert not out.exists()


def test_a_backend_with_no_build_for_this_platform_says_where_it_has_one(monkeypatch):
    monkeypatch.setattr(backends, "is_installed", lambda name: False)
    monkeypatch.setattr(platform, "system", lambda: "Darwin")  # an Intel Mac
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    here = f"Python {sys.version_info[0]}.{sys.version_info[1]} on Darwin x86_64"
    with pytest.raises(ModuleNotFoundError) as error:
        backends.load_backend("mxnet")
    assert str(error.value) == (f"the mxnet backend (MXNet 1.9.1) is not installed: MXNet 1.9.1 exists for Linux x86_64 "
                                f"with Python 3.10 or 3.11 only, not for {here}: its extra 'nlibert[mxnet]' installs nothing here")
    assert backends.install_hint("torch") == (f"PyTorch 2.13 exists for Linux, Windows and Apple-silicon macOS only, not "
                                              f"for {here}: its extra 'nlibert[torch]' installs nothing here")
    if sys.version_info < (3, 13):
        assert backends.install_hint("jax") == "pip install 'nlibert[jax]'"
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert backends.install_hint("torch") == "pip install 'nlibert[torch]'"


def test_version_flag_and_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "nlibert", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"nlibert {__version__} (Python {platform.python_version()}; backends: "), line
    assert len(backends.installed_versions()) == len(installed_backends())
    for found in backends.installed_versions():
        assert found in line


def test_ci_main_environment_has_every_backend():
    """CI's main environment (NLIBERT_REQUIRE_BACKENDS=1, .ci/run) runs every backend's tests; a
    backend that failed to install there fails here instead of shrinking the run."""
    if os.environ.get("NLIBERT_REQUIRE_BACKENDS") != "1":
        pytest.skip("not CI's main environment (NLIBERT_REQUIRE_BACKENDS=1)")
    assert installed_backends() == list(BACKENDS)


@pytest.mark.parametrize("require, outcome", [(None, "1 passed, 3 skipped"), ("1", "1 passed, 3 errors")])
def test_tests_needing_a_missing_backend_skip_naming_the_extra_and_fail_in_ci(require, outcome, tmp_path):
    """A test parametrized with a backend's name, one marked `backends(...)` and a module that
    needs it at its top all skip, naming the extra, where the backend is missing (jax, here by
    pretence); under NLIBERT_REQUIRE_BACKENDS=1 they fail instead."""
    tests = pathlib.Path(__file__).parent
    conftest = (tests / "conftest.py").read_text()
    (tmp_path / "conftest.py").write_text(conftest + "\nimport needs\nneeds.is_installed = lambda name: name != 'jax'\n")
    (tmp_path / "needs.py").write_text((tests / "needs.py").read_text())
    (tmp_path / "test_some.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("backend", ["torch", "jax"])
        def test_parametrized(backend):
            pass

        @pytest.mark.backends("jax")
        def test_marked():
            pass
    """))
    (tmp_path / "test_module.py").write_text("from needs import require_backend\nrequire_backend('jax')\n")
    env = {k: v for k, v in os.environ.items() if k != "NLIBERT_REQUIRE_BACKENDS"}
    if require:
        env["NLIBERT_REQUIRE_BACKENDS"] = require
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rs",
                             "--continue-on-collection-errors", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert outcome in result.stdout, result.stdout
    assert "the jax backend is not installed (pip install 'nlibert[jax]')" in result.stdout


def test_parity_with_one_backend_names_the_extras_that_add_another(monkeypatch):
    """A torch-only user asking for parity is told which extras install a second backend."""
    import nlibert.convert as convert
    monkeypatch.setattr(convert, "installed_backends", lambda: ["torch"])
    with pytest.raises(ValueError) as error:
        convert.run_parity("minilm-l6")
    message = str(error.value)
    assert message.startswith("parity needs two installed backends; installed: torch; add one: ")
    for name in BACKENDS[1:]:
        assert install_hint(name) in message
