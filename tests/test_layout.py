"""The package layout keeps its promises (docs/architecture.md): modules stay small, imports go
only downward through the layers, and no import cycle exists, lazy imports inside functions
included. Read from the source with ``ast``, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"

#: The most lines a module may have (issue 15: "no module above ~600 lines").
MAX_LINES = 600

#: Layers from the bottom; a module may import only from its own layer or the ones below. A
#: module belongs to the layer of the longest prefix that matches its name, so the networks
#: (every other module of ``nlsr.models``) sit between the parts they are built from and the
#: registry, detection and resolution above them.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "nlsr.atomic",
        "nlsr.io",
        "nlsr.resize",
        "nlsr.metrics",
        "nlsr.data",
        "nlsr.checkpoint",
        "nlsr.padding",
        "nlsr.tiling",
        "nlsr.distributed",
    ),
    ("nlsr.attention",),
    ("nlsr.models.common", "nlsr.models.spec", "nlsr.models.readers"),
    ("nlsr.models",),
    ("nlsr.models.registry", "nlsr.models.detection", "nlsr.models.validation"),
    (
        "nlsr.models.descriptor",
        "nlsr.models.loading",
        "nlsr.models.pretrained",
        "nlsr.models.onnx_model",
    ),
    ("nlsr.models.resolve",),
    ("nlsr.inference", "nlsr.evaluation", "nlsr.export"),
    ("nlsr.explain", "nlsr.figures"),
    ("nlsr.train", "nlsr.bench"),
    ("nlsr.cli", "nlsr.serve", "nlsr.__main__"),
)


def module_name(path: Path, root: Path = SRC) -> str:
    """Dotted module name of a file under ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(p): p for p in sorted((SRC / "nlsr").rglob("*.py"))}


def imports(path: Path, known: set[str], root: Path = SRC) -> set[str]:
    """The nlsr modules a file imports, at module level or inside functions.

    ``from nlsr.a import b`` counts as an import of ``nlsr.a.b`` when that is a module, else of
    ``nlsr.a``; importing ``nlsr.a.b`` from outside the package ``nlsr.a`` also runs that package's
    ``__init__`` (a module inside it already has). The root package ``nlsr`` is left out: its
    ``__init__`` resolves its exports lazily on attribute access."""
    package = module_name(path if path.name == "__init__.py" else path.parent, root)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    result: set[str] = set()
    for name in found:
        if not name.startswith("nlsr."):
            continue
        parts = name.split(".")
        for end in range(2, len(parts) + 1):
            prefix = ".".join(parts[:end])
            inside = package == prefix or package.startswith(prefix + ".")
            if prefix in known and (end == len(parts) or not inside):
                result.add(prefix)
    return result


def import_graph() -> dict[str, set[str]]:
    """Module -> the nlsr modules it imports (itself excluded)."""
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) - {name} for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def layer(name: str) -> int | None:
    """Layer number of a module (None: the root package or an unlisted module); ``__main__``
    modules are command-line entry points, so they sit in the CLI's layer."""
    if name.endswith(".__main__"):
        return len(LAYERS) - 1
    matches = [
        (len(prefix), number)
        for number, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if name == prefix or name.startswith(prefix + ".")
    ]
    return max(matches)[1] if matches else None


def test_layer_takes_the_longest_prefix() -> None:
    assert layer("nlsr.models.dlsn") == layer("nlsr.models") < layer("nlsr.models.registry")
    assert layer("nlsr.models.common") < layer("nlsr.models.dlsn") < layer("nlsr.models.resolve")
    assert layer("nlsr.train.__main__") == layer("nlsr.cli") and layer("nlsr.elsewhere") is None


def test_cycle_finder_sees_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_reader_counts_lazy_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "src" / "nlsr" / "pkg"
    pkg.mkdir(parents=True)
    f = pkg / "mod.py"
    f.write_text(
        "from nlsr.models import registry\n"
        "def later():\n    from nlsr.io import read_image\n    from . import other\n"
    )
    known = {"nlsr.models", "nlsr.models.registry", "nlsr.io", "nlsr.pkg", "nlsr.pkg.other"}
    found = imports(f, known, tmp_path / "src")
    # nlsr.pkg itself is not counted: a module inside a package does not re-run its __init__
    assert found == {"nlsr.models", "nlsr.models.registry", "nlsr.io", "nlsr.pkg.other"}


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_every_module_has_a_layer_and_imports_only_downward() -> None:
    graph = import_graph()
    unplaced = [name for name in graph if name != "nlsr" and layer(name) is None]
    assert unplaced == [], "add these modules to LAYERS (and docs/architecture.md)"
    upward = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, targets in sorted(graph.items())
        if name != "nlsr"
        for target in sorted(targets)
        if layer(target) is not None and layer(target) > layer(name)
    ]
    assert upward == []


def test_modules_stay_small() -> None:
    sizes = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
