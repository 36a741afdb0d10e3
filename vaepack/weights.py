"""Weights cache: locate, pull (mirror first), verify.

Every file is checked against the manifest's sha256 before it is used. Downloads go to
``<name>.part`` and are renamed only after the hash matches, so an interrupted pull never leaves a
file that looks complete; a later pull resumes the ``.part`` (HTTP Range) or starts it over.
Entries with ``sha256: null`` are trusted on first use: the hash seen at the first pull is recorded
in ``<cache>/tofu.json`` (with a warning) and enforced from then on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from vaepack.errors import WeightsError
from vaepack.files import CHUNK, atomic_write_bytes, sha256_file  # noqa: F401  (W.sha256_file)
from vaepack.manifest import FileSpec, ModelEntry
from vaepack.paths import cache_dir, embedded_weights_dir

log = logging.getLogger("vaepack")

Progress = Callable[[int, int | None], None]  # (bytes done, total or None)


def weights_dir() -> Path:
    return cache_dir() / "weights"


def _tofu_path() -> Path:
    return cache_dir() / "tofu.json"


def _tofu() -> dict[str, str]:
    try:
        return json.loads(_tofu_path().read_text())
    except (OSError, ValueError):
        return {}


def _record_tofu(name: str, digest: str) -> None:
    data = _tofu()
    data[name] = digest
    atomic_write_bytes(_tofu_path(), json.dumps(data, indent=1, sort_keys=True).encode())


def expected_sha256(spec: FileSpec) -> str | None:
    return spec.sha256 or _tofu().get(spec.name)


def file_path(spec: FileSpec) -> Path:
    """Where the file lives (embedded in the package, or in the cache), whether or not it exists."""
    return (embedded_weights_dir() if spec.embedded else weights_dir()) / spec.name


@dataclass
class FileStatus:
    spec: FileSpec
    path: Path
    present: bool


def model_files(entry: ModelEntry, parts: Iterable[str] | None = None) -> list[FileSpec]:
    seen: dict[str, FileSpec] = {}
    for pname, p in entry.parts.items():
        if parts is not None and pname not in parts:
            continue
        for f in p.files:
            seen.setdefault(f.name, f)
    return list(seen.values())


def status(entry: ModelEntry) -> list[FileStatus]:
    return [FileStatus(f, file_path(f), file_path(f).is_file()) for f in model_files(entry)]


def cache_status(entry: ModelEntry) -> tuple[str, int | None]:
    """(embedded | cached | partial | not cached, total size in bytes or None if the manifest lacks one)."""
    st = status(entry)
    size = sum(s.spec.size or 0 for s in st) if all(s.spec.size for s in st) else None
    if entry.embedded:
        return "embedded", size
    have = [s.present for s in st]
    return ("cached" if all(have) else "partial" if any(have) else "not cached"), size


def verify_file(spec: FileSpec, path: Path | None = None) -> str:
    """Hash the file and compare with the manifest (or the trust-on-first-use record)."""
    path = path or file_path(spec)
    if not path.is_file():
        raise WeightsError("weights file is missing", path=str(path), hint="run `vaepack weights pull`")
    if spec.size is not None and path.stat().st_size != spec.size:
        raise WeightsError(f"size {path.stat().st_size} bytes, expected {spec.size}", path=str(path),
                           hint="the file is truncated or not the published one; delete it and pull again")
    digest = sha256_file(path)
    want = expected_sha256(spec)
    if want and digest != want:
        raise WeightsError(f"sha256 mismatch (got {digest[:12]}…, expected {want[:12]}…)", path=str(path),
                           hint="the file is corrupt or tampered; delete it and run `vaepack weights pull`")
    return digest


def mirrors() -> list[str]:
    """``VAEPACK_MIRROR``: local folders or base URLs (os.pathsep- or comma-separated), searched first."""
    raw = os.environ.get("VAEPACK_MIRROR", "")
    out = []
    for chunk in raw.split(","):
        # A URL holds ':' (scheme, port): never split it on os.pathsep.
        out += [chunk] if "://" in chunk else chunk.split(os.pathsep)
    return [m.strip() for m in out if m.strip()]


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://", "file://"))


def _candidates(spec: FileSpec) -> list[str]:
    names = [spec.name]
    if spec.url:
        base = spec.url.rstrip("/").rsplit("/", 1)[-1]
        if base not in names:
            names.append(base)
    out = []
    for m in mirrors():
        for n in names:
            out.append(m.rstrip("/") + "/" + n if _is_url(m) else str(Path(m).expanduser() / n))
    if spec.url:
        out.append(spec.url)
    return out


def _fetch_url(url: str, part: Path, progress: Progress | None) -> None:
    done = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "vaepack"})
    if done:
        req.add_header("Range", f"bytes={done}-")
    try:
        r = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and done:  # nothing left to fetch: the .part is already whole; verify it
            return
        raise
    with r:
        if done and getattr(r, "status", 200) != 206:
            done = 0  # server ignored the range: start over
        total = r.headers.get("Content-Length")
        total = int(total) + done if total else None
        with open(part, "ab" if done else "wb") as f:
            while block := r.read(CHUNK):
                f.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
    if total is not None and done < total:
        # http.client returns a short read instead of raising when the connection drops: keep the
        # .part for a later resume and never hash (or trust on first use) a truncated download.
        raise OSError(f"connection closed after {done} of {total} bytes (kept {part.name} to resume)")


def _fetch(src: str, part: Path, progress: Progress | None) -> None:
    if _is_url(src):
        _fetch_url(src, part, progress)
    else:
        shutil.copyfile(src, part)
        if progress:
            progress(part.stat().st_size, part.stat().st_size)


def pull_file(spec: FileSpec, progress: Progress | None = None, force: bool = False) -> Path:
    """Make ``spec`` present and verified in the cache; return its path."""
    dest = file_path(spec)
    if spec.embedded:
        verify_file(spec, dest)
        return dest
    if dest.is_file() and not force:
        try:
            verify_file(spec, dest)
            return dest
        except WeightsError:
            log.warning("%s: cached file failed verification; pulling it again", dest)
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for src in _candidates(spec):
        if not _is_url(src) and not Path(src).is_file():
            continue
        if not _is_url(src):
            part.unlink(missing_ok=True)  # a local copy never resumes
        try:
            _fetch(src, part, progress)
        except (OSError, urllib.error.URLError) as e:
            errors.append(f"{src}: {getattr(e, 'reason', None) or e}")
            continue  # keep a partial download for a later resume
        if spec.size is not None and part.stat().st_size != spec.size:
            errors.append(f"{src}: got {part.stat().st_size} bytes, expected {spec.size}")
            part.unlink(missing_ok=True)
            continue
        digest = sha256_file(part)
        want = expected_sha256(spec)
        if want and digest != want:
            part.unlink(missing_ok=True)
            errors.append(f"{src}: sha256 mismatch (got {digest[:12]}…, expected {want[:12]}…); deleted")
            continue
        if not want:
            log.warning("%s: no published sha256; trusting this download (%s) and recording it", spec.name, digest)
            _record_tofu(spec.name, digest)
        os.replace(part, dest)
        return dest
    where = "; ".join(errors) if errors else "no mirror has it and it has no URL"
    raise WeightsError(f"could not get {spec.name}: {where}",
                       hint="set VAEPACK_MIRROR to a folder holding the file, or check the network")


def pull(entry: ModelEntry, parts: Iterable[str] | None = None, progress: Progress | None = None,
         force: bool = False) -> list[Path]:
    return [pull_file(f, progress, force) for f in model_files(entry, parts)]


def ensure(entry: ModelEntry, part: str) -> list[Path]:
    """Paths of a part's files, verified; pulled from a mirror/URL if missing.

    A cached file that fails verification is an error here (never silently replaced on use):
    ``vaepack weights pull`` fetches it again explicitly.
    """
    out = []
    for f in entry.part(part).files:
        p = file_path(f)
        if f.embedded or p.is_file():
            verify_file(f, p)
            out.append(p)
        else:
            out.append(pull_file(f))
    return out


def weights_digest(entry: ModelEntry, part: str) -> str:
    """The weights identity recorded in exports and calibrations; equals what ``loader.load_part``
    returns (one sha256 per file, joined by '+')."""
    spec = entry.part(part)
    paths = ensure(entry, part)  # verifies every file against the manifest / trust-on-first-use hash
    return "+".join(expected_sha256(f) or sha256_file(p) for f, p in zip(spec.files, paths))


def clear_partial(entry: ModelEntry) -> int:
    n = 0
    for f in model_files(entry):
        p = file_path(f).with_name(f.name + ".part")
        if p.exists():
            p.unlink()
            n += 1
    return n
