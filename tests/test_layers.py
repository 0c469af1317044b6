"""The package's layers: every import (module-level and inside functions) goes down or stays in
its own unit; nothing imports across or up, and there are no cycles. README "Architecture"
explains the layers; this test is their definition."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fewshot_studio"

# Layers, bottom first. Inside a layer, units are listed in the order they may import each
# other: a unit may import any unit of a lower layer and the units listed BEFORE it in its own
# layer (importing a later one is "sideways" and fails). A unit is a top-level module or a
# sub-package (all of its modules).
LAYERS: list[tuple[str, list[str]]] = [
    ("L0 foundation", ["errors", "progress", "config", "markup"]),
    ("L1 images and features", ["imageio", "onnx_predict", "data", "shapes", "prompts", "precision", "preprocess",
                                "cache", "workers", "tiny", "backbone", "features"]),
    ("L2 methods", ["training", "methods", "acquisition"]),
    ("L3 evaluation, store, jobs", ["evaluation", "insight", "store", "jobs", "onnx_export", "labeling", "scale"]),
    ("L4 use cases", ["app"]),
    ("L5 presentation", ["viz", "ui"]),
    ("L6 harnesses and entry points", ["bench", "cli", "__main__"]),
]
RANK = {unit: (layer, pos) for layer, (_, units) in enumerate(LAYERS) for pos, unit in enumerate(units)}

# Third-party packages that only one unit may import.
ONLY_IN = {"gradio": {"ui"}, "gradio_client": {"bench"}, "plotly": {"viz"}, "argparse": {"cli"},
           "ray": {"scale"}}


def modules() -> dict[str, Path]:
    """Dotted name relative to the package ('methods.base', 'ui.app', 'cli') -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or "__init__"] = path
    return out


@functools.lru_cache(maxsize=None)
def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Every import in the file, anywhere (functions included), as absolute dotted names
    ('fewshot_studio.methods.base', 'gradio', ...) with line numbers."""
    is_pkg = path.name == "__init__.py"
    package = ["fewshot_studio"] + name.split(".")[: None if is_pkg else -1] if name != "__init__" else ["fewshot_studio"]
    out = []
    tree = ast.parse(path.read_text(), str(path))
    # `if TYPE_CHECKING:` blocks never run: annotations may name any module
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # `from pkg import name`: name may be a module of pkg; `internal` keeps the longest
            # prefix that is a module, so a class name resolves to its module
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]
    return out


def internal(target: str, known: dict[str, Path]) -> str | None:
    """The package module an absolute import names (the longest known prefix), else None."""
    if not target.startswith("fewshot_studio"):
        return None
    parts = target.split(".")[1:]
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) if parts else "__init__"


def unit(module: str) -> str:
    return module.split(".")[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {t for t in (internal(i, known) for i, _ in imports(m, p)) if t and t != m} for m, p in known.items()}


def violations(known: dict[str, Path] | None = None) -> list[str]:
    known = known or modules()
    bad = []
    for m, path in known.items():
        if m == "__init__":
            continue
        src = unit(m)
        if src not in RANK:
            bad.append(f"{m}: its unit {src!r} is in no layer (add it to LAYERS)")
            continue
        for target, line in imports(m, path):
            top = target.split(".")[0]
            if top in ONLY_IN and src not in ONLY_IN[top]:
                bad.append(f"{m}:{line} imports {top}, which only {', '.join(sorted(ONLY_IN[top]))} may import")
            t = internal(target, known)
            if t is None or t == "__init__" or unit(t) == src:
                continue
            dst = unit(t)
            if dst not in RANK:
                bad.append(f"{m}:{line} imports {t}, whose unit is in no layer")
            elif RANK[dst] > RANK[src]:
                what = "up" if RANK[dst][0] > RANK[src][0] else "sideways"
                bad.append(f"{m}:{line} imports {t} ({what}: {LAYERS[RANK[dst][0]][0]} · {dst})")
    return bad


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), function-level imports included."""
    g = graph()
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_every_import_goes_down_a_layer_or_stays_in_its_unit():
    assert violations() == []


def test_no_import_cycles_among_the_package_modules():
    # a package's __init__ re-exporting its modules is not a cycle of behaviour; it is also fine
    # for a module to be imported by its package's __init__
    assert cycles() == []


def test_the_check_fails_on_an_upward_import(tmp_path, monkeypatch):
    """Plant an upward import (the store asking the UI for something) in a copy of one module:
    the layer check must name it."""
    known = modules()
    planted = tmp_path / "store.py"
    planted.write_text(known["store"].read_text() + "\n\ndef _bad():\n    from .ui import common  # noqa\n")
    known["store"] = planted
    found = violations(known)
    assert any(v.startswith("store:") and "ui.common" in v and "(up:" in v for v in found), found


def test_the_check_fails_on_gradio_outside_the_ui(tmp_path):
    known = modules()
    planted = tmp_path / "viz.py"
    planted.write_text("import gradio as gr\n" + known["viz"].read_text())
    known["viz"] = planted
    assert any(v.startswith("viz:1 imports gradio") for v in violations(known))


@pytest.mark.parametrize("unit_name", ["errors", "config", "methods", "app"])
def test_layer_units_exist(unit_name):
    assert any(m.split(".")[0] == unit_name for m in modules())
