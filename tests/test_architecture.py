"""The layout's rules, read from the source with ``ast``: imports point one way (down the layers of
docs/architecture.md) and no module imports itself through others. Function-level imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.shared import ROOT

# Lowest first: a module may import its own layer (without a cycle) and the layers below, never one above.
LAYERS = (
    ("znn.errors", "znn.types", "znn.environment", "znn.text"),
    ("znn.ops",),
    ("znn.spec", "znn.network"),
    ("znn.io",),
    ("znn.pipeline.graph", "znn.pipeline.run"),
    ("znn.pipeline.forward",),
    ("znn.pipeline.dense", "znn.pipeline.segment", "znn.pipeline.train"),
    ("znn.pipeline.jobs",),
    ("znn.bench",),
    ("znn.cli",),
)
# Package markers that only name what is inside them.
PACKAGES = ("znn", "znn.pipeline", "znn.workflows")


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``package``."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``path`` imports (``from a.b import c`` is ``a.b.c`` when that is a module)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                targets.add(sub if sub in known else node.module)
    return {t for t in targets if t in known}


def layer(module: str, layers: tuple[tuple[str, ...], ...]) -> int | None:
    for i, prefixes in enumerate(layers):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def import_problems(package: Path, layers: tuple[tuple[str, ...], ...] = LAYERS,
                    packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Every upward import, every module in no layer, and every import cycle under ``package``."""
    known = modules(package)
    graph = {m: imports(p, known) for m, p in known.items()}
    problems = []
    for source, targets in sorted(graph.items()):
        here = layer(source, layers)
        if here is None:
            if source not in packages:
                problems.append(f"{source}: in no layer of the architecture")
            continue
        for target in sorted(targets):
            there = layer(target, layers)
            if there is None or there > here:
                problems.append(f"{source} imports {target}, a layer above it")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (depth-first search)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_imports_point_down_the_layers_and_form_no_cycle():
    problems = import_problems(ROOT / "znn")
    assert not problems, "\n".join(problems)


def test_every_module_is_in_a_layer_of_the_architecture_document():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for prefixes in LAYERS:
        for prefix in prefixes:
            assert f"`{prefix.replace('.', '/')}" in text, f"{prefix} is not described in docs/architecture.md"


def test_the_check_finds_a_deliberate_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "znn"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "io").mkdir()
    for init in (pkg / "__init__.py", pkg / "ops" / "__init__.py", pkg / "io" / "__init__.py"):
        init.write_text("")
    (pkg / "ops" / "a.py").write_text("from znn.ops import b\n")
    (pkg / "ops" / "b.py").write_text("def f():\n    from znn.ops.a import g\n")
    (pkg / "io" / "c.py").write_text("from znn.ops import a\n")
    (pkg / "ops" / "d.py").write_text("import znn.io.c\n")
    problems = import_problems(pkg)
    assert "import cycle: znn.ops.a -> znn.ops.b -> znn.ops.a" in problems
    assert "znn.ops.d imports znn.io.c, a layer above it" in problems
    assert len(problems) == 2, problems
