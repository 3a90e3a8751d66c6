"""What may import what (DESIGN.md, "Layout"): read from the source with ``ast``, every import at
any depth (a lazy import inside a function is still a dependency), so a change that bends the
layering fails here and not in a newcomer's head."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("medvlm", "client", "server", "simulations", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The modules ``path`` imports (``from a.b import c`` is ``a.b.c`` when that is a module)."""
    out = set()
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from the package, up level - 1
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return out


GRAPH = {name: _imports(path, set(_modules())) for name, path in _modules().items()}


def _top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("package, forbidden", [
    ("medvlm", {"flwr", "client", "server", "simulations", "cli", "benchmarks", "tests"}),
    ("client", {"server", "simulations", "cli", "benchmarks", "tests"}),
    ("server", {"client", "simulations", "cli", "benchmarks", "tests"}),
    ("simulations", {"cli", "benchmarks", "tests"}),
])
def test_each_package_imports_only_what_sits_below_it(package, forbidden):
    bad = sorted(f"{m} imports {i}" for m, imps in GRAPH.items() if _top(m) == package
                 for i in imps if _top(i) in forbidden)
    assert not bad, bad


def test_the_model_package_only_assembles():
    """``medvlm/model`` builds modules from what it is given: it never trains, caches features, reads
    run folders or resolves what a config names (that is ``medvlm.build``, above it)."""
    above = ("medvlm.train", "medvlm.features", "medvlm.runs", "medvlm.recipes", "medvlm.build", "medvlm.evaluate",
             "medvlm.infer", "medvlm.audit")
    bad = sorted(f"{m} imports {i}" for m, imps in GRAPH.items() if m.startswith("medvlm.model")
                 for i in imps if i.startswith(above))
    assert not bad, bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_medvlm():
    graph = {m: {i for i in imps if i in GRAPH and i != m} for m, imps in GRAPH.items() if _top(m) == "medvlm"}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_one_training_loop_steps_every_optimizer():
    """Every recipe (foundation, public start, train-local) and a hospital's DP-SGD train through
    ``medvlm.loop.fit``: no other module steps an optimizer or clears its gradients."""
    steppers = set()
    for pkg in (*PACKAGES, "benchmarks"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("zero_grad", "step") and not node.args and not node.keywords[1:]):
                    steppers.add(_module_name(path) if pkg != "benchmarks" else str(path.relative_to(ROOT)))
    assert steppers == {"medvlm.loop"}, sorted(steppers)
