"""The package's layout: its modules import each other without cycles, and import only optional heavy
packages inside functions (each with a comment saying why)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "flowopd"

# Imported inside functions on purpose: optional extras, or heavy to import (peft and tokenizers
# import transformers' machinery; matplotlib only for the report's figures; tensorboard's writer).
LOCAL_OK = ("diffusers", "transformers", "accelerate", "huggingface_hub", "peft", "tokenizers", "pytesseract",
            "paddleocr", "wandb", "tensorboard", "torch.utils.tensorboard", "matplotlib", "open_clip", "clip")


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _function_level(tree: ast.AST):
    """(node, inside_function) for every import statement of the module."""
    out = []

    def walk(node, in_fn):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, in_fn))
            walk(child, in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return out


def _targets(mod: str, is_pkg: bool, node, mods) -> list[str]:
    """The flowopd modules an import statement executes (the named module and its parent packages)."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        names = [stem] + [f"{stem}.{a.name}" for a in node.names]
    # A module's own parent packages are being imported already when it runs: an edge to one counts
    # only when the statement takes a name defined there (`from .. import make_backend`).
    ancestors = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
    out = set()
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts) + 1):
            m = ".".join(parts[:i])
            if m in mods and m != "flowopd" and m not in ancestors:
                out.add(m)
    if isinstance(node, ast.ImportFrom) and names[0] in ancestors and names[0] != "flowopd":
        if any(f"{names[0]}.{a.name}" not in mods for a in node.names):
            out.add(names[0])
    return sorted(out)


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for mod, f in mods.items():
        tree = ast.parse(f.read_text())
        edges = set()
        for node, in_fn in _function_level(tree):
            if not in_fn:
                edges.update(t for t in _targets(mod, f.name == "__init__.py", node, mods) if t != mod)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                c = visit(n)
                if c:
                    return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert "flowopd.pipeline" in graph and "flowopd.config" in graph["flowopd.pipeline"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_function_local_imports_are_optional_heavy_packages_with_a_reason():
    bad = []
    for mod, f in _modules().items():
        lines = f.read_text().splitlines()
        for node, in_fn in _function_level(ast.parse(f.read_text())):
            if not in_fn:
                continue
            where = f"{f.relative_to(PKG.parent)}:{node.lineno}"
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if node.__class__ is ast.ImportFrom and node.level:
                bad.append(f"{where}: function-local import of flowopd's own module")
                continue
            for n in names:
                if not any(n == ok or n.startswith(ok + ".") for ok in LOCAL_OK):
                    bad.append(f"{where}: function-local import of {n} (move it to the top of the module)")
            near = lines[node.lineno - 2:node.end_lineno]
            if not any("#" in line for line in near):
                bad.append(f"{where}: function-local import without a comment saying why")
    assert not bad, "\n".join(bad)
