"""The package's shape: no import circles, pillars apart, a light `glmgym --help`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import glmgym

SRC = Path(glmgym.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported glmgym module: line}} over every import statement, at any depth (an
    import inside a function still ties the two modules together)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from pkg import sub` names a submodule when one exists
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name inside a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def _circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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


def test_the_graph_sees_imports_at_any_depth():
    graph = _import_graph()
    assert "glmgym.agents.model" in graph["glmgym.agents.policy"]
    assert "glmgym.chat.session" in graph["glmgym.chat.tuning.predict"]  # imported inside a function
    assert _circles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_no_import_circles():
    graph = _import_graph()
    circles = _circles(graph)
    detail = [" <-> ".join(c) + ": " + ", ".join(f"{a} imports {b} (line {graph[a][b]})"
                                               for a in c for b in graph[a] if b in c)
              for c in circles]
    assert not circles, "\n".join(detail)


def test_the_pillars_do_not_import_each_other():
    crossings = [(a, b) for a, edges in _import_graph().items() for b in edges
                 for x, y in (("agents", "chat"), ("chat", "agents"))
                 if a.startswith(f"glmgym.{x}") and b.startswith(f"glmgym.{y}")]
    assert not crossings


def test_help_does_not_import_torch():
    code = ("import sys\nfrom glmgym.cli import main\ntry:\n    main(['chat', 'serve', '--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'gymnasium') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--max-batch" in out  # the help was printed
    assert out.strip().splitlines()[-1] == "[]"


def test_lazy_exports_are_the_functions_even_after_their_modules_load():
    code = ("import glmgym.agents.train, glmgym.chat.generate\n"
            "from glmgym.agents import train, Policy\nfrom glmgym.chat import generate, load\n"
            "print(train.__module__, generate.__module__, load.__module__, Policy.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["glmgym.agents.train", "glmgym.chat.generate", "glmgym.chat.session",
                           "glmgym.agents.policy"]
