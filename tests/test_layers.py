"""The layering of the code, read from its imports.

Bottom to top: r3_client and `memory` (the bounded caches and the C allocator's account: standard
library only) import nothing of r3; the rule (`r3_service.rule`, pure Python) with
`metrics` beside it; `settings` (imports only the rule); store; models and qtype; engine; api;
the service's cli; r3_tools and r3_trainer on top (the trainer imports only the rule and the
client). A module imports its own layer or lower ones, and no chain of imports comes back to
where it started."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"r3_client": ROOT / "client", "r3_service": ROOT / "service", "r3_tools": ROOT / "tools",
            "r3_trainer": ROOT / "trainer"}

# Bottom first; the layers of one row are side by side. A module belongs to the layer of the
# longest prefix naming it; `r3_service` itself (its __init__, the version) only by its name.
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"client": ("r3_client",), "memory": ("r3_service.caches", "r3_service.allocator")},
    {"service package": ("r3_service",), "rule": ("r3_service.rule",), "metrics": ("r3_service.metrics",)},
    {"settings": ("r3_service.settings",)},
    {"store": ("r3_service.store",)},
    {"models": ("r3_service.models",), "qtype": ("r3_service.qtype",)},
    {"engine": ("r3_service.engine",)},
    {"api": ("r3_service.api",)},
    {"cli": ("r3_service.cli", "r3_service.ray_serve")},
    {"tools": ("r3_tools",), "trainer": ("r3_trainer",)},
]
# Layers that may import only these (themselves included), whatever sits below them.
ONLY = {
    "client": {"client"},
    "memory": {"memory"},
    "service package": {"service package", "client"},
    "rule": {"rule", "memory"},
    "metrics": {"metrics", "client", "memory"},
    "settings": {"settings", "rule"},
    "trainer": {"trainer", "rule", "client"},
}
RANK = {layer: rank for rank, row in enumerate(LAYERS) for layer in row}
PREFIXES = {prefix: layer for row in LAYERS for layer, prefixes in row.items() for prefix in prefixes}


@cache
def modules() -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    found = {}
    for package, root in PACKAGES.items():
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str) -> str:
    if module == "r3_service":
        return "service package"
    named = [p for p in PREFIXES if p != "r3_service" and (module == p or module.startswith(p + "."))]
    assert named, f"{module} is in no layer: add it to LAYERS"
    return PREFIXES[max(named, key=len)]


def resolve(name: str) -> str | None:
    """The module of ours an imported name is (its longest prefix that is one); None: not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules():
            return ".".join(parts[:end])
    raise AssertionError(f"{name} is imported but is no module of ours")


@cache
def imports(module: str) -> frozenset[str]:
    """The modules of ours that `module` imports, at module level or inside functions."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from package import submodule` imports the submodule
                name = f"{base}.{alias.name}"
                found.add(resolve(name) if name in modules() else resolve(base))
    return frozenset(found - {None, module})  # type: ignore[arg-type]


def test_every_module_is_parsed_and_placed() -> None:
    assert {"r3_service.rule.reward", "r3_service.api.app", "r3_client._core", "r3_tools.qtypes",
            "r3_trainer.data"} <= set(modules())
    assert layer_of("r3_service.engine.resolve") == "engine" and layer_of("r3_service") == "service package"
    assert imports("r3_client._async") >= {"r3_client._core"}  # `from . import _core`
    assert imports("r3_tools.qtypes") >= {"r3_tools.qtype_eval", "r3_tools.store_admin"}
    for module in modules():
        layer_of(module)


def test_imports_go_to_the_same_layer_or_below() -> None:
    wrong = []
    for module in modules():
        layer = layer_of(module)
        for target in sorted(imports(module)):
            to = layer_of(target)
            if RANK[to] > RANK[layer] or (layer in ONLY and to not in ONLY[layer]):
                wrong.append(f"{module} ({layer}) imports {target} ({to})")
    assert wrong == []


def find_cycle(graph: dict[str, frozenset[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt):], nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset()}) is None
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"d", "b"}), "d": frozenset()}
    assert find_cycle(graph) == ["b", "c", "b"]


def test_the_module_import_graph_has_no_cycle() -> None:
    assert find_cycle({module: imports(module) for module in modules()}) is None


def test_the_rule_loads_nothing_heavy() -> None:
    """Importing every module of `r3_service.rule` in a fresh interpreter loads no framework."""
    heavy = {"torch", "fastapi", "starlette", "transformers"}
    rule = sorted(m for m in modules() if layer_of(m) == "rule")
    assert "r3_service.rule.reward" in rule
    script = (f"import sys\nfor name in {rule!r}:\n    __import__(name)\n"
              f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
