"""The engine's import graph has no cycle, counting imports inside functions too.

A cycle hidden in function-level imports still couples two modules both ways (neither can be read,
moved or tested alone) and becomes an ImportError the day one of the imports moves to the top of its
file. The graph is read from the source with `ast`, so nothing is imported or executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "ultrasound_ai"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` under `root`."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict) -> str | None:
    """The longest known module that `name` starts with (an imported function resolves to its module)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imported_modules(module: str, path: Path, modules: dict) -> set[str]:
    """Engine modules that `module` imports anywhere in its file (module level or inside functions).

    `from a.b import c` counts a.b.c when c is a module, else a.b; importing a.b.c also runs the
    packages a and a.b, which count too unless they contain `module` itself (already being imported)."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            if not name.startswith(PACKAGE):
                continue
            target = _resolve(name, modules)
            while target:
                if target != module and not module.startswith(target + "."):
                    targets.add(target)
                target = target.rpartition(".")[0]
                target = target if target in modules else None
    return targets


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(root, package)
    return {m: imported_modules(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_engine_has_no_import_cycle():
    graph = import_graph(REPO)
    assert len(graph) > 50, "the engine's modules were not found"
    found = cycles(graph)
    assert not found, "import cycles in the engine (imports inside functions count):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_the_checker_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / PACKAGE / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from ultrasound_ai.sub.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from . import a  # the back edge, inside a function\n    return a\n")
    (pkg / "c.py").write_text("from ultrasound_ai.sub import a\n")
    graph = import_graph(tmp_path)
    assert graph[f"{PACKAGE}.sub.a"] == {f"{PACKAGE}.sub.b"}
    assert graph[f"{PACKAGE}.sub.b"] == {f"{PACKAGE}.sub.a"}
    assert cycles(graph) == [[f"{PACKAGE}.sub.a", f"{PACKAGE}.sub.b"]]
    (pkg / "b.py").write_text("def g():\n    return 1\n")
    assert cycles(import_graph(tmp_path)) == []
