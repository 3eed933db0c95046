"""The package's layers, checked over its imports: a module's path says what it may import.

    apps/            the Flower apps and what composes them        may import everything
    run.py           the run lifecycle                             everything but apps
    privacy/         DP and SecAgg+ around the packed strategy     federation, config
    federation/      strategy, protocol, accounting, sampling...   config: no model, no data, no torch
    training/        local training and evaluation                 methods, data, config: no Flower
    methods/         PEFT methods and the pretrained model         data, config: no Flower
    data/            GLUE data and the node-local cache            config: no Flower apps, no torch
    report/          run files, tables, plots                      data (task metrics), config: no torch, no Flower
    deploy/          compose generator, relay                      nothing of fedsparse
    config.py        composing the Hydra config                    nothing of fedsparse
    atomic.py        atomic file writes                            nothing of fedsparse (every layer may use it)

Imports under `if TYPE_CHECKING:` are annotations only and are not counted.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedsparse"
ALLOWED = {
    "apps": {
        "atomic",
        "apps",
        "run",
        "privacy",
        "federation",
        "training",
        "methods",
        "data",
        "report",
        "config",
    },
    "__main__": {"atomic", "apps", "run", "config"},
    "run": {"atomic", "run", "privacy", "federation", "methods", "data", "report", "config"},
    "privacy": {"atomic", "privacy", "federation", "config"},
    "federation": {"atomic", "federation", "config"},
    "training": {"atomic", "training", "methods", "data", "config"},
    "methods": {"atomic", "methods", "data", "config"},
    "data": {"atomic", "data", "config"},
    "report": {"atomic", "report", "data", "config"},
    "deploy": {"atomic", "deploy"},
    "config": {"atomic", "config"},
    "atomic": set(),
    "fedsparse": set(),  # the package itself imports nothing
}
# Third-party packages a layer must not import, at module level or inside a function.
FORBIDDEN = {
    "federation": {"torch", "transformers", "peft"},
    "privacy": {"torch", "transformers", "peft"},
    "methods": {"flwr"},
    "training": {"flwr"},
    "report": {"torch", "transformers", "peft", "flwr"},
    "config": {"torch", "transformers", "flwr"},
    "deploy": {"torch", "transformers", "flwr"},
}


def _layer(module: str) -> str:
    """`fedsparse.federation.strategy` -> `federation`; `fedsparse.run` -> `run`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fedsparse"


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import outside `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, top))
                if child.module == "fedsparse" or child.module.startswith("fedsparse."):
                    found.extend((f"{child.module}.{alias.name}", top) for alias in child.names)
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            visit(child, top and not nested)

    visit(tree, True)
    return found


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str) -> bool:
    return name in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_from_the_layers_below_it(module):
    layer = _layer(module)
    assert layer in ALLOWED, f"{module}: no layer rule for '{layer}' (add it to ALLOWED)"
    wrong = []
    for name, _ in _imports(MODULES[module]):
        root = name.split(".")[0]
        if root == "fedsparse" and _is_module(name) and name != "fedsparse":
            if _layer(name) not in ALLOWED[layer]:
                wrong.append(name)
        elif root in FORBIDDEN.get(layer, ()):
            wrong.append(name)
    assert not wrong, f"{module} ({layer}) imports {sorted(set(wrong))}"


def test_no_import_cycle_between_modules():
    graph = {
        m: {n for n, top in _imports(p) if top and _is_module(n) and n != m and n != "fedsparse"}
        for m, p in MODULES.items()
    }
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n) :], n]))
            if n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize(
    "module, heavy",
    [
        ("fedsparse.apps.client_app", ("torch", "transformers")),  # a query or SecAgg+ stage message
        ("fedsparse.report.cli", ("torch", "transformers", "flwr")),  # reads files only
        ("fedsparse.report.results", ("torch", "transformers", "flwr")),
    ],
)
def test_light_entry_points_do_not_import_heavy_packages(module, heavy):
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"
