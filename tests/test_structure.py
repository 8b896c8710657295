"""The package's layering, read from its source: no import cycle, counting imports inside functions and under
TYPE_CHECKING, and config.py below everything (it imports nothing of the package but `errors`)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "layerwise"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports anywhere in its source. `from P import x`
    is an edge to the submodule P.x when there is one, else to P itself (its __init__); so a cycle through a
    package's __init__ is seen when the package itself is imported."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle for each strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(imports()) == []


def test_config_imports_nothing_of_the_package_but_errors():
    assert imports()["layerwise.config"] == {"layerwise.errors"}


def test_the_walk_sees_a_cycle_inside_a_function_and_through_an_init(tmp_path):
    """The checks above can fail: a planted package with each kind of cycle is caught."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (root / "b.py").write_text("from pkg import a\n")
    (root / "sub" / "__init__.py").write_text("from pkg.sub import c\n")
    (root / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import x\n")
    (root / "d.py").write_text("from pkg.sub import thing\n")
    graph = imports(root)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.sub"}
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.d", "pkg.sub", "pkg.sub.c"]]


SERVING = {"layerwise.delivered", "layerwise.early_exit", "layerwise.predict", "layerwise.export", "layerwise.report"}
"""What reads a finished run to answer with it or show it."""


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_serving_imports_nothing_from_train_and_training_no_serving():
    graph = imports()
    for module in SERVING:
        assert not {m for m in reach(graph, module) if m.startswith("layerwise.train")}, module
    for module in (m for m in graph if m.startswith("layerwise.train")):
        assert not reach(graph, module) & SERVING, module


def long_functions(root: Path = PACKAGE, most: int = 8) -> list[str]:
    """Functions with more than `most` parameters (self, cls, *args and **kwargs aside); an autograd Function's
    forward and backward, whose form torch fixes, are the exception."""
    over = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        forwards = {
            id(f)
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef) and any("Function" in ast.unparse(b) for b in c.bases)
            for f in c.body
            if isinstance(f, ast.FunctionDef) and f.name in ("forward", "backward")
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and id(node) not in forwards:
                a = node.args
                names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg not in ("self", "cls")]
                if len(names) > most:
                    over.append(f"{path.relative_to(root)}:{node.name} ({len(names)})")
    return over


def long_constructors(root: Path = PACKAGE, most: int = 5) -> list[str]:
    """Classes whose __init__ takes more than `most` parameters (a dataclass's generated one is not counted)."""
    over = []
    for path in sorted(root.rglob("*.py")):
        for cls in (c for c in ast.walk(ast.parse(path.read_text())) if isinstance(c, ast.ClassDef)):
            for f in cls.body:
                if isinstance(f, ast.FunctionDef) and f.name == "__init__":
                    a = f.args
                    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg != "self"]
                    if len(names) + bool(a.vararg) > most:
                        over.append(f"{path.relative_to(root)}:{cls.name} ({len(names)})")
    return over


def test_no_function_takes_more_than_eight_parameters():
    """Beyond that, a frozen dataclass."""
    assert long_functions() == []


def test_no_constructor_takes_more_than_five_parameters():
    """Beyond that, a frozen dataclass of the settings."""
    assert long_constructors() == []


def test_the_counts_see_long_signatures(tmp_path):
    """The two checks above can fail: planted functions and constructors over the limits are found, an autograd
    Function's forward is not."""
    (tmp_path / "m.py").write_text(
        "def f(a, b, c, d, e, f, g, h, i):\n    pass\n"
        "class A:\n    def __init__(self, a, b, c, d, e, f):\n        pass\n"
        "    def g(self, a, b, c, d, e, f, g, h):\n        pass\n"
        "class F(torch.autograd.Function):\n    def forward(ctx, a, b, c, d, e, f, g, h, i):\n        pass\n"
    )
    assert long_functions(tmp_path) == ["m.py:f (9)"]
    assert long_constructors(tmp_path) == ["m.py:A (6)"]
