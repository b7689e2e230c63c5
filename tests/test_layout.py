"""The package layout: layers import one way, no circles, a small top level (README "How the code is laid out")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rir_finetune"

# layer -> the layers it may import (besides itself); the top-level helpers are the bottom layer
ALLOWED = {
    "cli": {"round", "training", "prep", "generator", "evaluation", "retrieval", "llm", "base"},
    "round": {"training", "prep", "generator", "evaluation", "retrieval", "llm", "base"},
    "training": {"evaluation", "retrieval", "base"},  # train_eval scores with evaluation's metrics
    "prep": {"retrieval", "llm", "base"},
    "generator": {
        "retrieval",
        "llm",
        "base",
    },  # reward judges with the retriever, samples with the llm backends
    "evaluation": {"retrieval", "base"},
    "retrieval": {"base"},
    "llm": {"base"},
    "base": {"base"},
}
TOP_LEVEL_HELPERS = {
    "__init__",
    "__main__",
    "config",
    "errors",
    "files",
    "cpu_memory",
    "signals",
    "guards",
    "precision",
}


def layer_of(module: str) -> str:
    """``rir_finetune.training.model`` -> ``training``; top-level helpers -> ``base``; ``cli`` -> ``cli``."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    if head == "cli" or head == "__main__":
        return "cli"
    return "base" if head in TOP_LEVEL_HELPERS else head


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every ``rir_finetune`` module imported anywhere in the file (top-level and lazy imports alike)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rir_finetune"):
            found.add(node.module)
            for alias in node.names:  # "from rir_finetune.training import distributed" imports a module
                if (PACKAGE.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists():
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rir_finetune"))
    return found


MODULES = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_layers_exist():
    assert {"training", "retrieval", "llm", "prep", "evaluation"} <= {layer_of(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    here = layer_of(module)
    wrong = sorted(i for i in MODULES[module] if layer_of(i) not in ALLOWED[here] | {here})
    assert not wrong, f"{module} ({here}) imports {wrong}"


def test_prep_never_imports_evaluation():
    wrong = {m: i for m, i in MODULES.items() if layer_of(m) == "prep" and any(".evaluation" in x for x in i)}
    assert not wrong


def test_no_import_cycles_between_modules():
    graph = {m: {i for i in imps if i in MODULES and i != m} for m, imps in MODULES.items()}
    # a package's __init__ re-exporting its own modules is not a cycle with them
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_small_top_level():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 9, modules
    assert set(modules) <= TOP_LEVEL_HELPERS | {"cli"}, modules


def test_one_pooling_function():
    """Training and retrieval pool with the same function, defined below both."""
    from rir_finetune.retrieval import encoder, pooling
    from rir_finetune.training import model

    assert model.pool is pooling.pool and encoder.pool is pooling.pool
