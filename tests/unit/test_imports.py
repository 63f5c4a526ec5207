"""The package's shape: data flows one way, so a module imports only from its own package or a lower one (lazy
and type-checking imports included), no module imports itself back through others, and nothing swaps a class.

    errors → tokenizer → config → data → model → hf → hf_tokenizer → checkpoint → train → export → generate →
    analysis
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gptoss"

LAYERS = [
    {"gptoss", "gptoss.errors"},
    {"gptoss.tokenizer"},
    {"gptoss.config"},
    {"gptoss.data"},
    {"gptoss.model"},
    {"gptoss.hf"},
    {"gptoss.hf_tokenizer"},
    {"gptoss.checkpoint"},
    {"gptoss.train"},
    {"gptoss.export"},
    {"gptoss.generate"},
    {"gptoss.analysis"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer unit of a module: its top-level subpackage or module (`gptoss.model.moe` -> `gptoss.model`)."""
    return ".".join(module.split(".")[:2])


def level(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if unit(module) in names)


def imports() -> dict[str, set[str]]:
    """Every gptoss module -> the gptoss modules it imports anywhere in its file (`from pkg import mod` counts as
    importing `pkg.mod`)."""
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package
                    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                if target.startswith("gptoss"):
                    found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in paths else target
                                 for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("gptoss"))
        graph[name] = {m for m in found if m != name}
    return graph


def test_every_unit_has_a_layer() -> None:
    for name in imports():
        level(name)  # StopIteration names a module the layering forgot


def test_imports_only_run_downward() -> None:
    upward = sorted(f"{name} imports {target}" for name, targets in imports().items() for target in targets
                    if unit(target) != unit(name) and level(target) >= level(name))
    assert upward == [], "\n".join(upward)


def test_no_import_circles() -> None:
    graph = imports()
    modules = set(graph)

    def resolve(target: str) -> str | None:  # `from gptoss.model import x` names the package module
        return target if target in modules else None

    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(filter(None, map(resolve, graph[node]))):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # A package's __init__ re-exporting its modules is not a circle back into it.
    real = [c for c in cycles if not any(a == b.rsplit(".", 1)[0] for a, b in zip(c, c[1:]))]
    assert real == [], "\n".join(" -> ".join(c) for c in real)


def test_no_class_swaps() -> None:
    swaps = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}" for path in PACKAGE.rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Attribute) and t.attr == "__class__"]
    assert swaps == [], "\n".join(swaps)
