"""The backend contract (backends/contract.py) holds every registered backend: the same exported names
in the same order, the same signatures, the same files with the same public names; the registry is
the one place that names the frameworks, core imports none of them, backends never import each other."""
import ast
import importlib
import inspect
import pathlib

import pytest

from nlibert import cli
from nlibert.backends import BACKENDS, REGISTRY, contract, installed_backends, load_backend
from nlibert.core.names import FORMAT_NAMES

ROOT = pathlib.Path(__file__).resolve().parents[1]
FRAMEWORKS = {info.framework for info in REGISTRY} | {"jax", "flax"}


def _signature(obj) -> list[tuple]:
    """Parameter names, kinds and defaults (annotations are each framework's own)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]


def _contract_members(cls) -> list[str]:
    """The methods and properties a contract class lists (its own, not `object`'s)."""
    return [name for name, value in vars(cls).items()
            if callable(value) or isinstance(value, (classmethod, property))
            if not name.startswith("__") or name == "__call__"] + list(getattr(cls, "__annotations__", {}))


@pytest.fixture(scope="module", params=installed_backends())
def backend(request):
    return request.param, load_backend(request.param)


def test_every_backend_exports_the_contracts_names_in_its_order(backend):
    name, module = backend
    assert module.__all__ == contract.__all__, name
    for export in contract.__all__:
        assert hasattr(module, export), f"{name} lacks {export}"


def test_every_function_and_constructor_has_the_contracts_signature(backend):
    name, module = backend
    for export in contract.__all__:
        expected, found = getattr(contract, export), getattr(module, export)
        if inspect.isclass(expected):
            assert inspect.isclass(found), f"{name}.{export} should be a class"
            assert _signature(found.__init__)[1:] == _signature(expected.__init__)[1:], f"{name}.{export}.__init__"
            for member in _contract_members(expected):
                assert hasattr(found, member), f"{name}.{export} lacks {member}"
                want = inspect.getattr_static(expected, member, None)
                if callable(want) or isinstance(want, classmethod):
                    assert _signature(getattr(found, member)) == _signature(getattr(expected, member)), \
                        f"{name}.{export}.{member}"
        else:
            assert _signature(found) == _signature(expected), f"{name}.{export}"


def test_the_contract_checks_something():
    """A backend with a renamed parameter or a missing name would fail the two tests above."""
    def renamed(net, enabled_=True):
        return net

    assert _signature(renamed) != _signature(contract.set_fused_attention)
    assert "load" in _contract_members(contract.PretrainStep) and "learning_rate" in _contract_members(
        contract.PretrainStep)
    assert {"__call__", "read", "evaluate"} <= set(_contract_members(contract.FinetuneStep))
    assert {"from_config", "forward"} <= set(_contract_members(contract.BERTModel))



def test_load_pretrained_model_keeps_the_books_order_and_needs_only_the_checkpoint():
    """The book calls it positionally (pretrained, num_hiddens, ffn_num_hiddens, num_heads, num_layers,
    dropout, max_len, devices); nlibert names what it passes, the rest None: read off the checkpoint
    (devices None: the CPU). The signature test above holds every backend to this one."""
    parameters = inspect.signature(contract.load_pretrained_model).parameters.values()
    assert [p.name for p in parameters] == ["pretrained_model", "num_hiddens", "ffn_num_hiddens", "num_heads",
                                            "num_layers", "dropout", "max_len", "devices"]
    assert [p.default for p in parameters][1:] == [None] * 7
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)

def _public_names(path: pathlib.Path) -> list[str]:
    """Top-level functions, classes and constants of a module that do not start with '_', in order."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return [n for n in names if not n.startswith("_")]


def test_backends_are_mirror_images_file_by_file():
    folders = [ROOT / "backends" / name for name in BACKENDS]
    for folder in folders:
        # The contract's files, plus private helper modules of the backend's own ('_layers.py').
        public = [p.stem for p in folder.glob("*.py") if p.stem == "__init__" or not p.stem.startswith("_")]
        assert sorted(public) == sorted(("__init__",) + contract.FILES), folder
    for file in contract.FILES:
        reference = _public_names(folders[0] / f"{file}.py")
        for folder in folders[1:]:
            assert _public_names(folder / f"{file}.py") == reference, f"{folder.name}/{file}.py"


def _imports(path: pathlib.Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(module, level) of each import in a file (`level` > 0: relative)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.module or "", node.level)] + [
                (f"{node.module}.{a.name}" if node.module else a.name, node.level) for a in node.names]
    return found


def test_core_imports_no_framework_and_has_no_import_cycle():
    graph = {}
    for path in sorted((ROOT / "core").glob("*.py")):
        for module, level in _imports(path):
            assert level > 0 or module.split(".")[0] not in FRAMEWORKS, f"core/{path.name} imports {module}"
        graph[path.stem] = {m.split(".")[0] for m, level in _imports(path, top_level_only=True)
                            if level == 1 and m and (ROOT / "core" / f"{m.split('.')[0]}.py").exists()}

    def visit(node, trail):
        assert node not in trail, f"import cycle in core: {' -> '.join(trail + [node])}"
        for nxt in graph[node]:
            visit(nxt, trail + [node])

    for module in graph:
        visit(module, [])


def test_backends_never_import_each_other():
    for name in BACKENDS:
        for path in (ROOT / "backends" / name).glob("*.py"):
            for module, level in _imports(path):
                others = [o for o in BACKENDS if o != name]
                assert not any(module.startswith(f"nlibert.backends.{o}") for o in others), f"{path}: {module}"
                assert not (level == 2 and module.split(".")[0] in others), f"{path}: {module}"


def test_the_registry_is_the_one_place_that_names_the_frameworks():
    assert BACKENDS == tuple(info.name for info in REGISTRY)
    for info in REGISTRY:
        assert info.name in FORMAT_NAMES, f"no rename table for {info.name}"
        assert importlib.util.find_spec(info.module) is not None
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for command, option in (("finetune", "backend"), ("pretrain", "backend"), ("convert", "to")):
        action = next(a for a in subparsers[command]._actions if a.dest == option)
        assert tuple(action.choices) == BACKENDS, (command, option)
    # orchestration names no framework: no string constant in jobs.py, convert.py, inference.py or cli.py is a backend's name
    for path in (ROOT / "jobs.py", ROOT / "finetune_data.py", ROOT / "convert.py", ROOT / "inference.py",
                 ROOT / "cli.py"):
        constants = {n.value for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not constants & set(BACKENDS), f"{path.name} names {constants & set(BACKENDS)}"
        assert not any(m.split(".")[0] in FRAMEWORKS for m, level in _imports(path) if level == 0), path.name


def test_backend_capabilities_live_in_the_registry_and_are_checked_with_the_settings():
    """`--precision` is checked against the registry's list for the backend when the settings are
    built (before any data or checkpoint is read); each backend's PRECISIONS is the registry's."""
    from nlibert.core.settings import FinetuneSettings
    for info in REGISTRY:
        for precision in ("float32", "bfloat16"):
            if precision in info.precisions:
                assert FinetuneSettings(backend=info.name, precision=precision).precision == precision
            else:
                with pytest.raises(ValueError, match=f"--precision {precision}: the {info.name} backend trains in"):
                    FinetuneSettings(backend=info.name, precision=precision)
    for info in REGISTRY:
        if info.name in installed_backends():
            assert importlib.import_module(f"{info.module}.train").PRECISIONS == info.precisions
