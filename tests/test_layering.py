"""The package's import graph, read from the source with ``ast``: one way, no cycles.

Every ``import``/``from ... import`` of a ``lightning_optim`` module counts, at module level
or inside a function (a lazy import is still a dependency), except under
``if TYPE_CHECKING:`` (annotations only). ``from pkg import name`` is an edge to the
submodule ``pkg.name`` when that is a module, else to ``pkg`` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_optim"
# The Hydra configs are a top-level folder shipped as lightning_optim.conf.
CONF = ROOT / "conf"
# The app, the dashboard and the Lightning side sit on top of the library; the two shims keep
# the ``python -m lightning_optim.train`` / ``.demo`` commands and the package's lazy
# attributes (``lightning_optim.OptimizerCallback``) reach up by design.
UPPER = ("lightning_optim.app", "lightning_optim.dashboard", "lightning_optim.integration")
ENTRY_POINTS = {"lightning_optim", "lightning_optim.train", "lightning_optim.demo"}
# Upward imports known and reported, each with its reason; nothing else may join them.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for root, prefix in ((PACKAGE, "lightning_optim"), (CONF, "lightning_optim.conf")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imports(name: str) -> set[str]:
    """The ``lightning_optim`` modules ``name`` imports."""
    tree = ast.parse(MODULES[name].read_text())
    skipped = _type_checking_nodes(tree)
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # ``import a.b.c`` of a package path
                target = target.rpartition(".")[0]
            if target.startswith("lightning_optim") and target != name:
                found.add(target)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_was_read():
    """The reader sees the edges it must (a broken reader would pass every test below)."""
    assert {"lightning_optim.rules", "lightning_optim.backends", "lightning_optim.optim.buckets",
            "lightning_optim.optim.state_dict"} <= GRAPH["lightning_optim.optim.base"]
    assert "lightning_optim.rules" in GRAPH["lightning_optim.backends.triton.kernels"]
    assert "lightning_optim.backends.triton.selfcheck" in GRAPH["lightning_optim.backends"]  # lazy, counted
    assert "lightning_optim.optim.base" not in GRAPH["lightning_optim.optim.buckets"]  # TYPE_CHECKING only
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    """No module imports one that (directly or not) imports it back."""
    assert _cycle(GRAPH) is None


def test_no_two_modules_import_each_other():
    pairs = sorted((a, b) for a, deps in GRAPH.items() for b in deps if a < b and a in GRAPH[b])
    assert pairs == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("lightning_optim.backends")))
def test_backends_never_import_the_optimizers(name):
    """The backends sit below ``optim/``: they get a rule's spec in the call
    (:mod:`lightning_optim.rules` is below both)."""
    assert not {d for d in GRAPH[name] if d.startswith(("lightning_optim.optim", "lightning_optim.registry"))}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith(UPPER) and n not in ENTRY_POINTS))
def test_the_library_never_imports_the_app_the_dashboard_or_the_lightning_side(name):
    assert not {d for d in GRAPH[name] if d.startswith(UPPER) and (name, d) not in KNOWN_UPWARD}


def test_the_rule_table_type_sits_at_the_bottom():
    """``rules.py`` is read by the backends, the optimizers, the registry and the statistics,
    so it imports none of them."""
    assert GRAPH["lightning_optim.rules"] == set()


def _code_strings(path: Path) -> set[str]:
    """The string constants of a module's code, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


@pytest.mark.parametrize("name", ["lightning_optim.optim.base", "lightning_optim.optim.buckets",
                                  "lightning_optim.optim.state_dict", "lightning_optim.clipping"])
def test_the_shared_optimizer_code_names_no_backend_and_no_rule(name):
    """What every optimizer shares reads the rule's spec and the backend's capabilities; it
    never tests for a backend's or a rule's name (docstrings may mention them)."""
    import lightning_optim as lo
    from lightning_optim import backends, rules

    names = {*backends.BACKENDS, *(s.name for s in rules.registered()), *lo.optimizers()} - {"auto"}
    assert not _code_strings(MODULES[name]) & names
    source = MODULES[name].read_text()
    assert "bucket[" not in source  # buckets are named tuples: bucket.params, bucket.state...
