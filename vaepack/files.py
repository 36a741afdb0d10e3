"""File helpers every layer uses: one sha256, one atomic byte write, one YAML reader, one record of
the command line. Imports only the standard library, PyYAML and vaepack.errors (bottom layer)."""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from vaepack.errors import VaepackError

CHUNK = 1 << 20
_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, memoized per process on (path, size, mtime) so verifying and then
    recording the digest of a 335 MB checkpoint reads it once."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def publish_mode(path: str | os.PathLike) -> None:
    """mkstemp creates 0600 files; an output is meant to be shared like any file the user writes
    (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename: never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_yaml(path: str | os.PathLike, error: type[VaepackError], what: str = "file") -> Any:
    """Parse a YAML file; an unreadable file or invalid YAML raises ``error`` naming the file."""
    import yaml

    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except OSError as e:
        raise error(f"cannot read the {what}: {e.strerror}", path=str(p)) from None
    except yaml.YAMLError as e:
        raise error(f"invalid YAML in the {what} ({str(e).splitlines()[0]})", path=str(p)) from None


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user typed it (``vaepack ARGS``), recorded in provenance metadata."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["vaepack"] + [shlex.quote(a) for a in args])
