"""The package's shape: few top-level modules, no import circle, no borrowed private names, and one
config file per registered method whose keys are that method's parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tallmasks.core.params import parameters
from tallmasks.merging import METHODS
from tallmasks.merging.registry import CONFIG_ONLY_FIELDS

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "tallmasks"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported name or None) for every import of ``module``, function-level ones too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tallmasks"):
                    yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tallmasks"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                yield (full, None) if full in modules else (node.module, alias.name)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _ in _imports(module, path, modules):
            # importing a.b.c runs a and a.b too: a package's __init__ counts as a dependency
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != module and not module.startswith(prefix + "."):
                    graph[module].add(prefix)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_at_most_eight_modules_at_the_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


def test_no_import_circle_even_through_function_level_imports():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_sees_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    borrowed = [
        f"{module} imports {target}.{name}"
        for module, path in modules.items()
        for target, name in _imports(module, path, modules)
        if name and name.startswith("_") and not name.startswith("__") and target != module
    ]
    borrowed += [
        f"{module} imports {target}"
        for module, path in modules.items()
        for target, _ in _imports(module, path, modules)
        if target.rsplit(".", 1)[-1].startswith("_") and not target.endswith("__main__")
    ]
    assert borrowed == []


METHOD_CONFIGS = sorted((REPO / "config" / "method").glob("*.yaml"))


def test_every_registered_method_has_its_config_file():
    assert sorted(METHODS) == sorted(path.stem for path in METHOD_CONFIGS)


@pytest.mark.parametrize("path", METHOD_CONFIGS, ids=lambda p: p.stem)
def test_every_config_key_is_a_parameter_of_its_method(path):
    config = yaml.safe_load(path.read_text())
    assert config["name"] == path.stem
    method = METHODS[config["name"]]
    params = parameters(method.fn, runtime=("device",))
    unknown = sorted(set(config) - set(params) - CONFIG_ONLY_FIELDS)
    assert unknown == [], f"{path.name}: {unknown} are not parameters of {method.name}"
    missing = sorted(p for p in params if p not in config)
    assert missing == [], f"{path.name} does not list {missing}"
