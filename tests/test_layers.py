"""The package's layering stays true: no import cycle, and every import points down.

The graph is built from the source (``ast``), imports inside functions included, so a lazy import
cannot hide a cycle. docs/architecture.md explains the layers; a new module gets a row in LAYERS.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "vaepack"

# Bottom to top (docs/architecture.md). A module may import its own layer and the ones below.
LAYERS: list[tuple[str, ...]] = [
    ("vaepack", "vaepack.errors", "vaepack.paths", "vaepack.files", "vaepack.policy", "vaepack.presets"),
    ("vaepack.manifest",),
    ("vaepack.weights", "vaepack.loader", "vaepack.io", "vaepack.latents", "vaepack.metrics", "vaepack.flops",
     "vaepack.samplers", "vaepack.perceptual"),
    ("vaepack.models",),
    ("vaepack.vae", "vaepack.bridges"),
    ("vaepack.pipeline", "vaepack.tiling"),
    ("vaepack.backends",),
    ("vaepack.quantize",),
    ("vaepack.export",),
    ("vaepack.runtime", "vaepack.convert"),
    ("vaepack.train", "vaepack.analysis", "vaepack.bench", "vaepack.data", "vaepack.plots", "vaepack.tune",
     "vaepack.modelability"),
    ("vaepack.cli",),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """vaepack modules ``name`` imports anywhere in its source (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "vaepack")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "vaepack":
                continue
            for a in node.names:  # `from vaepack import latents` imports the module vaepack.latents
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in known else mod)
    out.discard(name)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = all_modules()
    known = set(mods)
    return {n: imports_of(n, p, known) for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def layer_of(name: str) -> int:
    best, rank = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"{name} has no layer: add it to LAYERS here and to docs/architecture.md")
    return rank


def test_the_graph_sees_function_level_imports():
    g = graph()
    assert g, "no modules found"
    # sanity of the parser on known facts: the CLI reaches the runtime, and nothing imports the CLI
    assert any(m.startswith("vaepack.runtime") for deps in (g[k] for k in g if k.startswith("vaepack.cli"))
               for m in deps)
    assert not [k for k, deps in g.items() if any(d.startswith("vaepack.cli") for d in deps)
                and not k.startswith("vaepack.cli")]


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_point_down():
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            if layer_of(dep) > layer_of(mod):
                bad.append(f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("mod", sorted(m for m in all_modules() if all_modules()[m].name == "__init__.py"))
def test_package_inits_import_nothing(mod):
    """Importing one submodule must not import its siblings (that is how the old cycle hid)."""
    assert not graph()[mod] - {"vaepack.errors"}, f"{mod}/__init__.py imports {graph()[mod]}"


def test_no_module_is_huge():
    big = {m: n for m, p in all_modules().items() if (n := len(p.read_text().splitlines())) > 650}
    assert not big, f"split these modules (over 650 lines): {big}"


def test_cli_starts_without_torch():
    """`vaepack --help` and option errors stay instant: command modules import the library lazily."""
    import subprocess
    import sys

    code = "import sys, vaepack.cli.app; bad = [m for m in ('torch', 'numpy') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(PKG.parent))


def test_outputs_are_shared_like_any_file(tmp_path):
    """Atomic writes go through mkstemp (0600); the renamed output gets 0666 & ~umask like open()."""
    import os

    from vaepack.files import atomic_write_bytes
    from vaepack.io import atomic_output

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        with atomic_output(tmp_path / "b.txt") as t:
            t.write_text("y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644
