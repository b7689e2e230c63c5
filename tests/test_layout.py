"""The package layout: layers import one way, no circles, a small top level, small modules (README "How the code is
laid out")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rir_finetune"

# layer -> the layers it may import (besides itself); the top-level helpers are the bottom layer
ALLOWED = {
    "cli": {"commands", "round", "training", "prep", "generator", "evaluation", "retrieval", "llm", "base"},
    # the round runs its stages through the command table
    "round": {"commands", "training", "prep", "generator", "evaluation", "retrieval", "llm", "base"},
    # the command table names every command's config classes and runner by dotted path, imported when used
    "commands": {"base"},
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
# the bottom layer: config (a package: fields, conversion, loading, help), errors, files (reading, atomic writing,
# output checks), lifecycle (lock, resume, resolved config, fingerprint, partial output), precision (device, dtype)
TOP_LEVEL_HELPERS = {
    "__init__",
    "__main__",
    "config",
    "errors",
    "files",
    "cpu_memory",
    "lifecycle",
    "precision",
}
MAX_MODULE_LINES = 450


def layer_of(module: str) -> str:
    """``rir_finetune.training.model`` -> ``training``; top-level helpers -> ``base``; ``cli`` -> ``cli``."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    if head == "cli" or head == "__main__":
        return "cli"
    if head == "commands":
        return "commands"
    return "base" if head in TOP_LEVEL_HELPERS else head


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}:
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(path: Path) -> set[str]:
    """Every ``rir_finetune`` module imported anywhere in the file (top-level and lazy imports alike)."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
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
    assert set(modules) <= TOP_LEVEL_HELPERS | {"cli", "commands"}, modules


def test_no_module_is_too_long():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}  # fmt: skip
    assert not long, long


def test_every_command_of_the_table_resolves():
    """The command table names real config classes and runners (it imports them only when used)."""
    from rir_finetune.commands import COMMANDS, _resolve
    from rir_finetune.round.stages import KINDS

    for cmd in COMMANDS.values():
        assert cmd.config_classes() and callable(_resolve(cmd.runner)), cmd.name
    assert {k.command for k in KINDS.values()} <= set(COMMANDS)


def test_one_pooling_function():
    """Training and retrieval pool with the same function, defined below both."""
    from rir_finetune.retrieval import encoder, pooling
    from rir_finetune.training import model

    assert model.pool is pooling.pool and encoder.pool is pooling.pool
