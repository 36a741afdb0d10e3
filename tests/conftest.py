"""Shared fixtures: the ../shared folder, a hermetic cache, and CLI runners.

Nothing here runs a model or touches the network; every test gets a private cache (VAEPACK_HOME)
and, when ../shared exists, its weights folder as the only mirror, so no test reads or writes
~/.cache.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_HERMETIC_ENV = ("VAEPACK_MANIFEST", "VAEPACK_TILE_BUDGET", "VAEPACK_MAX_PIXELS")


def find_shared() -> Path | None:
    env = os.environ.get("VAEPACK_SHARED")
    p = Path(env).expanduser() if env else REPO.parent / "shared"
    return p if p.is_dir() else None


def _missing_shared(what: str):
    msg = f"{what} not found (set VAEPACK_SHARED or put shared/ beside the repo)"
    if os.environ.get("VAEPACK_REQUIRE_SHARED") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared() -> Path:
    p = find_shared()
    if p is None:
        _missing_shared("the shared folder")
    return p


@pytest.fixture(scope="session")
def shared_weights(shared) -> Path:
    p = shared / "weights"
    if not (p / "taef2_encoder.pth").is_file():
        _missing_shared(f"{p}/taef2_*.pth")
    return p


@pytest.fixture(scope="session")
def dev_photo(shared) -> Path:
    p = shared / "data" / "dev" / "set14_img_010.png"
    if not p.is_file():
        _missing_shared(str(p))
    return p


@pytest.fixture(scope="session", autouse=True)
def vaepack_home(tmp_path_factory) -> Path:
    """Session-wide private cache; the shared weights folder (if any) is the only mirror.

    Session-scoped on purpose: module fixtures of other test files (e.g. a test zoo) may point the
    environment elsewhere for their duration and restore it afterwards.
    """
    home = tmp_path_factory.mktemp("vaepack_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAEPACK_HOME", str(home))
        sh = find_shared()
        if sh is not None and (sh / "weights").is_dir():
            mp.setenv("VAEPACK_MIRROR", str(sh / "weights"))
        else:
            mp.delenv("VAEPACK_MIRROR", raising=False)
        for k in _HERMETIC_ENV:
            mp.delenv(k, raising=False)
        yield home


@pytest.fixture
def fresh_home(tmp_path, monkeypatch) -> Path:
    """A private, empty cache for this test only (for tests that tamper with cached files)."""
    home = tmp_path / "home"
    monkeypatch.setenv("VAEPACK_HOME", str(home))
    return home


@pytest.fixture
def run_cli(capsys):
    """Run ``vaepack.cli.app.main(args)`` in-process; return (exit_code, stdout, stderr)."""
    from vaepack.cli.app import main

    def run(*args):
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def run_cli_subprocess():
    """Run ``python -m vaepack.cli`` in a child process with this process's environment."""

    def run(*args, timeout: float = 120):
        p = subprocess.run([sys.executable, "-m", "vaepack.cli", *map(str, args)], capture_output=True,
                           text=True, timeout=timeout, env=dict(os.environ), cwd=str(REPO))
        return p.returncode, p.stdout, p.stderr

    return run


def _assert_clean_error(err: str, *needles: str) -> str:
    """Exactly one non-empty line on stderr, an ``error:`` line naming every needle; no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    for n in needles:
        assert str(n).lower() in line.lower(), f"{n!r} not in {line!r}"
    return line


@pytest.fixture
def clean_error():
    """``clean_error(stderr, *needles)``: see ``_assert_clean_error``."""
    return _assert_clean_error


@pytest.fixture
def vaepack_warnings():
    """Messages logged at WARNING or above on the "vaepack" logger during the test.

    Not ``caplog``: once a CLI test has run in this process the "vaepack" logger has its own stderr
    handler and ``propagate=False`` (cli/app.py), so records never reach caplog's root handler and a
    caplog assertion would depend on test order."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    log = logging.getLogger("vaepack")
    h = _Collect(level=logging.WARNING)
    old_level = log.level
    log.addHandler(h)
    if log.getEffectiveLevel() > logging.WARNING:
        log.setLevel(logging.WARNING)
    yield messages
    log.removeHandler(h)
    log.setLevel(old_level)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small, shared CPU this is faster than oversubscribing it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
