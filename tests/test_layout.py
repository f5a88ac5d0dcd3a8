"""The package layout: no import cycles inside ``fgpo``, the pipeline's layers import only
downwards, and ``fgpo_kernels`` never imports ``fgpo``.

Imports are read from the source (every ``import`` statement, module level or inside a function:
a lazy import is still a dependency). ``from pkg import name`` counts as an import of the
submodule ``pkg.name`` when that is a module, else of ``pkg`` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The pipeline, bottom to top; a layer may import only from layers before it (and itself).
LAYERS = ("data", "models", "pairs", "train", "eval", "demo")
TOP = ("cli", "example")  # the command line may import anything


def _modules(package: str) -> dict[str, Path]:
    base = ROOT / package
    out = {}
    for path in base.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of ``known`` (or other top-level packages) that ``name`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in known else mod)
    return found


def _graph(package: str) -> dict[str, set[str]]:
    known = _modules(package)
    return {
        name: {m for m in _imports(name, path, known) if m in known and m != name}
        for name, path in known.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_in_fgpo():
    graph = _graph("fgpo")
    # A package's __init__ re-exports its submodules; a submodule importing its own package
    # (``from fgpo.data import x`` inside fgpo/data/) closes a cycle through it.
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_can_fail():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_only_downwards():
    bad = []
    for mod, deps in _graph("fgpo").items():
        layer = _layer(mod)
        if layer in TOP or layer == "":
            continue
        assert layer in LAYERS, f"{mod}: the layer {layer!r} is not in the pipeline {LAYERS}"
        for dep in deps:
            other = _layer(dep)
            if other and other != layer and LAYERS.index(other) > LAYERS.index(layer):
                bad.append(f"{mod} imports {dep} (layer {other!r} is above {layer!r})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["fgpo_kernels", "csrc"])
def test_kernels_never_import_fgpo(package):
    offenders = []
    for name, path in _modules(package).items():
        deps = _imports(name, path, {})
        offenders += [f"{name} imports {d}" for d in deps if d == "fgpo" or d.startswith("fgpo.")]
    assert not offenders, offenders
