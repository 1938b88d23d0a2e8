"""The package's shape: no import circle, and the GPT core never imports the tools around it.

Imports are read from the source (ast), so a test here fails before anything runs. Every
import counts, at module level or inside a function; only `if TYPE_CHECKING:` blocks are left
out (they never run).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("gpt_jax", "launch")

# The tools: everything else under gpt_jax/ is the core (docs/architecture.md draws both).
TOOLS = ("gpt_jax.aot", "gpt_jax.aot_search", "gpt_jax.hlo_profile", "gpt_jax.projection",
         "gpt_jax.tpu_flags",
         "gpt_jax.bench", "gpt_jax.sweep", "gpt_jax.report", "gpt_jax.hf", "gpt_jax.commands",
         "gpt_jax.cli", "gpt_jax.evals.harness", "gpt_jax.serve.http", "launch")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The absolute names `tree` imports (each `from a import b` as a.b, then kept if real)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")
                parent = parent if is_package else parent[:-1]
                parent = parent[:len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = imported(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {n for n in found if n in files and n != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def is_tool(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TOOLS)


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_circle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_core_module_imports_a_tool():
    graph = import_graph()
    core = [m for m in graph if m.startswith("gpt_jax") and not is_tool(m)]
    assert {m: sorted(t for t in graph[m] if is_tool(t)) for m in core
            if any(is_tool(t) for t in graph[m])} == {}


def test_the_tool_check_sees_a_function_level_import():
    tree = ast.parse("def f():\n    from gpt_jax import aot\n")
    assert "gpt_jax.aot" in imported(tree, "gpt_jax.model", False)
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from gpt_jax import aot\n")
    assert "gpt_jax.aot" not in imported(guarded, "gpt_jax.model", False)
