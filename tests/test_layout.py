"""The package's layers: no import circle among jaxgrok's modules (imports inside functions
included; `if TYPE_CHECKING:` blocks, which never run, left out), and the leaves stay leaves."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jaxgrok"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _runtime_nodes(tree):
    """Every node but those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def import_graph() -> dict[str, set[str]]:
    """{module: the jaxgrok modules it imports, anywhere in it}."""
    mods = _modules()

    def resolve(name):
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                r = resolve(n) if n.startswith("jaxgrok") else None
                if r and r not in (m, "jaxgrok"):
                    graph[m].add(r)
    return graph


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on.discard(w)
                comp.append(w)
            on.discard(v)
            if comp:
                out.append(sorted([v, *comp]))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert _cycles(import_graph()) == []


def test_the_leaves_and_the_layers():
    g = import_graph()
    assert g["jaxgrok.registry"] == set()  # names -> classes: imports nothing of jaxgrok
    assert not any(m.startswith("jaxgrok.analysis") for r in g if r.startswith("jaxgrok.report") for m in g[r])
    assert not any(m.startswith(("jaxgrok.sweep", "jaxgrok.analysis", "jaxgrok.report"))
                   for r in g if r.startswith("jaxgrok.measures") for m in g[r])  # the table is a leaf of the program
    for low in ("jaxgrok.tasks", "jaxgrok.models"):
        assert g[low] <= {"jaxgrok.registry"}, (low, g[low])
