"""Named benchmark suites: YAML files in benchmarks/suites/ (beside the package, in the repository).

A suite is ``{name, description, kind: bench|rd, pending, params}`` where ``params`` are keyword
arguments of ``run_bench`` (or ``run_rd``), checked against the function's signature when loaded.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from vaepack.bench import rd, run
from vaepack.bench.inputs import Progress
from vaepack.errors import UsageError
from vaepack.files import read_yaml
from vaepack.paths import package_dir

SUITE_KEYS = {"name", "description", "kind", "pending", "params"}


def suites_dir() -> Path:
    """Named suites live in the repository (benchmarks/suites), beside the package."""
    return package_dir().parent / "benchmarks" / "suites"


def list_suites() -> list[str]:
    d = suites_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _runner(kind: str):
    # looked up on the module at call time, so a patched run.run_bench (tests) is the one used
    return run.run_bench if kind == "bench" else rd.run_rd if kind == "rd" else None


def load_suite(name_or_path: str) -> dict:
    """Read a suite: a YAML file path, or a name in benchmarks/suites/.

    Returns ``{"name", "description", "kind": "bench"|"rd", "pending": str|None, "params": {...}}``
    where ``params`` are keyword arguments of ``run_bench`` (or ``run_rd``). A ``pending`` suite
    references something not built yet and should not be run.
    """
    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") and p.is_file()):
        p = suites_dir() / f"{name_or_path}.yaml"
    if not p.is_file():
        avail = ", ".join(list_suites()) or "none"
        raise UsageError(f"unknown benchmark suite '{name_or_path}' (available: {avail})")
    data = read_yaml(p, UsageError, "suite")
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise UsageError("suite needs a 'params' mapping", path=str(p))
    extra = set(data) - SUITE_KEYS
    if extra:
        raise UsageError(f"unknown suite keys: {', '.join(sorted(extra))}", path=str(p))
    kind = data.get("kind", "bench")
    fn = _runner(kind)
    if fn is None:
        raise UsageError(f"suite kind must be 'bench' or 'rd', got {kind!r}", path=str(p))
    allowed = set(inspect.signature(fn).parameters) - {"progress"}
    bad = set(data["params"]) - allowed
    if bad:
        raise UsageError(f"suite params not accepted by {fn.__name__}: {', '.join(sorted(bad))}", path=str(p))
    return {"name": data.get("name", p.stem), "description": data.get("description", ""), "kind": kind,
            "pending": data.get("pending") or None, "params": data["params"], "path": str(p)}


def run_suite(name_or_path: str, progress: Progress | None = None, **overrides) -> dict:
    """Load and run a suite; keyword overrides replace suite params (e.g. repeat=3, crop=256), and an
    override of None removes the suite's value (e.g. nfe=None to time a deterministic decoder)."""
    s = load_suite(name_or_path)
    if s["pending"]:
        raise UsageError(f"suite '{s['name']}' is pending: {s['pending']}")
    params = {k: v for k, v in {**s["params"], **overrides}.items() if v is not None}
    res = _runner(s["kind"])(progress=progress, **params)
    res["config"]["suite"] = s["name"]
    return res
