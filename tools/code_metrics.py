"""Count what the structure issue measures, for a closing note: top-level modules of the package, import
cycles between its modules, the longest functions, and imports that sit inside functions.

    python tools/code_metrics.py [src/diffquant]

Cycles come from grimp's import graph (every import statement, module level or not; the graph import-linter
checks), as strongly connected components of more than one module. Hand-written: no well-kept tool prints these
four numbers together; radon/mccabe count complexity, not length.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _own(node: ast.AST) -> bool:
    """An import of the package's own modules (relative, or absolute from diffquant)."""
    return isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("diffquant"))


def main(argv: list[str]) -> None:
    root = Path(argv[0] if argv else "src/diffquant")
    top = sorted(p.name for p in root.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    longest, inner = [], set()
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in _functions(tree):
            longest.append((fn.end_lineno - fn.lineno + 1, f"{path.relative_to(root.parent)}:{fn.lineno} {fn.name}"))
            # a statement in a nested function is counted once
            inner |= {(path, n.lineno, _own(n)) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}

    import grimp
    import networkx as nx

    sys.path.insert(0, str(root.parent))
    graph = grimp.build_graph(root.name, cache_dir=None)
    g = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            g.add_edge(module, imported)
    # a package imports its own __init__ implicitly; cycles through a package's __init__ re-exports are real too
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]

    print(f"top-level modules in {root}: {len(top)}")
    print(f"import cycles (groups of modules importing each other): {len(cycles)}")
    for c in cycles:
        print("   ", " <-> ".join(c))
    own = sum(1 for *_, is_own in inner if is_own)
    print(f"imports inside functions: {len(inner)} ({own} of the package's own modules, {len(inner) - own} of others)")
    print("longest functions:")
    for n, where in sorted(longest, reverse=True)[:5]:
        print(f"    {n:4d} lines  {where}")


if __name__ == "__main__":
    main(sys.argv[1:])
