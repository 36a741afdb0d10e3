"""What a dataset run encodes: its inputs, units, aspect-ratio buckets and fingerprint.

The inputs are listed and sorted once, then cut into units of K files; each unit becomes one shard.
The plan is stored in OUT (``plan.jsonl``), so a rerun resumes the same units and ``--append`` adds
new files as new units after them. The fingerprint hashes every setting that changes a latent; a
run into an OUT with another fingerprint is refused (the stale-cache failure of other tools).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vaepack.errors import UsageError, VaepackError
from vaepack.files import atomic_write_bytes, sha256_file
from vaepack.io import IMAGE_SUFFIXES, list_images

SCHEMA_VERSION = 1
PLAN_FILE = "plan.jsonl"
LIST_SUFFIXES = {".txt", ".lst", ".list", ".csv"}


class DatasetError(VaepackError):
    """A dataset folder that is not one, is stale (other fingerprint), or is damaged."""


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputItem:
    key: str  # unique name in the dataset: the path relative to SRC (or as listed)
    path: str  # absolute path the workers read (on a cluster: the same on every node)
    size: int  # bytes when planned (-1: unreadable then; the encode reports why)
    sha256: str = ""  # content hash, when planned with hash=True


@dataclass(frozen=True)
class Unit:
    id: int
    items: tuple[InputItem, ...]


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    keep = []
    for p in parts:
        if any(c in p for c in "*?["):
            break
        keep.append(p)
    return Path(*keep) if keep else Path(".")


def _read_list(path: Path) -> list[tuple[str, Path]]:
    """(key, path) per line of a text list (blank lines and # comments skipped; relative paths are
    relative to the list's folder) or per row of a Parquet file's ``path`` column."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError("reading a Parquet list needs pyarrow", path=str(path),
                             hint="pip install pyarrow (or 'vaepack[ray]'), or pass a text list") from None
        table = pq.read_table(path)
        if "path" not in table.column_names:
            raise UsageError(f"Parquet list has no 'path' column (has: {', '.join(table.column_names)})",
                             path=str(path))
        lines = [str(v) for v in table.column("path").to_pylist() if v]
    else:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the list ({e})", path=str(path)) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln, p if (p := Path(ln).expanduser()).is_absolute() else path.parent / p) for ln in lines]


def collect_inputs(src: str | Path, hash: bool = False) -> list[InputItem]:
    """SRC (a folder, walked recursively; a glob; a text/Parquet list of paths; or one image) ->
    items sorted by key. Missing listed files are kept (size -1): the encode reports them."""
    s = str(src)
    p = Path(s).expanduser()
    if p.is_dir():
        pairs = [(f.relative_to(p).as_posix(), f) for f in list_images(p, recursive=True, require=True)]
    elif any(c in s for c in "*?["):
        root = _glob_root(s)
        files = [Path(m) for m in glob.glob(s, recursive=True) if Path(m).is_file()]
        pairs = [(f.relative_to(root).as_posix() if f.is_relative_to(root) else f.as_posix(), f) for f in files]
        if not pairs:
            raise UsageError(f"no files match '{s}'")
    elif p.is_file() and (p.suffix.lower() in LIST_SUFFIXES or p.suffix.lower() == ".parquet"):
        pairs = _read_list(p)
    elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        pairs = [(p.name, p)]
    else:
        raise UsageError("is not a folder, glob, image or list of paths (.txt/.lst/.parquet)", path=s)
    if not pairs:
        raise UsageError("lists no images", path=s)
    keys: dict[str, Path] = {}
    for k, f in pairs:
        if k in keys and keys[k] != f:
            raise UsageError(f"two inputs have the key '{k}' ({keys[k]} and {f})", path=s,
                             hint="list each image once, by distinct relative paths")
        keys[k] = f
    items = []
    for k in sorted(keys):
        f = keys[k].absolute()
        try:
            size = f.stat().st_size
        except OSError:
            size = -1
        digest = sha256_file(f) if hash and size >= 0 else ""
        items.append(InputItem(key=k, path=str(f), size=size, sha256=digest))
    return items


def make_units(items: list[InputItem], shard_size: int, first: int = 0) -> list[Unit]:
    if shard_size < 1:
        raise UsageError("--shard-size must be >= 1")
    return [Unit(first + i, tuple(items[j:j + shard_size]))
            for i, j in enumerate(range(0, len(items), shard_size))]


def save_plan(out: Path, units: list[Unit]) -> None:
    lines = [json.dumps({"unit": u.id, **asdict(it)}, sort_keys=True) for u in units for it in u.items]
    atomic_write_bytes(Path(out) / PLAN_FILE, ("\n".join(lines) + "\n").encode())


def load_plan(out: Path) -> list[Unit]:
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        return []
    by_unit: dict[int, list[InputItem]] = {}
    try:
        for ln in path.read_text().splitlines():
            if ln.strip():
                d = json.loads(ln)
                by_unit.setdefault(int(d.pop("unit")), []).append(InputItem(**d))
    except (ValueError, TypeError, KeyError) as e:
        raise DatasetError(f"the plan is damaged ({e})", path=str(path), hint="rerun with --force") from None
    return [Unit(u, tuple(items)) for u, items in sorted(by_unit.items())]


# --------------------------------------------------------------------------- buckets
@dataclass(frozen=True)
class BucketSpec:
    """kohya-ss style aspect-ratio buckets: every (w, h) on a ``step`` grid with sides in
    [min, max] and w * h <= max_area (sd-scripts ``make_bucket_resolutions``)."""

    max_area: int = 1024 * 1024
    step: int = 64
    min: int = 256
    max: int = 2048

    def text(self) -> str:
        return f"max-area={self.max_area},step={self.step},min={self.min},max={self.max}"


def parse_buckets(text: str | None) -> BucketSpec | None:
    """``none`` (keep each image's size) or ``max-area=A,step=S,min=M,max=X`` (any subset; the rest
    default to 1048576, 64, 256, 2048)."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    names = {"max-area": "max_area", "max_area": "max_area", "step": "step", "min": "min", "max": "max"}
    vals: dict[str, int] = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep or k.strip().lower() not in names:
            raise UsageError(f"cannot parse --buckets '{text}'", hint="none, or max-area=1048576,step=64,min=256,max=2048")
        try:
            vals[names[k.strip().lower()]] = int(v)
        except ValueError:
            raise UsageError(f"--buckets {k.strip()} must be an integer, got '{v}'") from None
    spec = BucketSpec(**vals)
    if spec.step < 1 or spec.min < spec.step or spec.max < spec.min or spec.max_area < spec.min * spec.min:
        raise UsageError(f"--buckets {spec.text()} holds no bucket",
                         hint="need step >= 1, min >= step, max >= min, max-area >= min * min")
    return spec


@functools.lru_cache(maxsize=64)
def bucket_sizes(spec: BucketSpec) -> tuple[tuple[int, int], ...]:
    """Every bucket (w, h) of ``spec``, sorted: for each width on the grid, the tallest height on the
    grid within max-area and [min, max], and its transpose (as sd-scripts builds them)."""
    out: set[tuple[int, int]] = set()
    for w in range(-(-spec.min // spec.step) * spec.step, spec.max + 1, spec.step):  # grid widths >= min
        h = min(spec.max, (spec.max_area // w) // spec.step * spec.step)
        if h >= spec.min:
            out.update({(w, h), (h, w)})
    return tuple(sorted(out))


def bucket_for(w: int, h: int, spec: BucketSpec) -> tuple[int, int]:
    """The bucket (w, h) of a w x h image: the nearest aspect ratio (in log space, so 2:1 and 1:2 are
    equally far from 1:1), ties to the larger area, then the smaller width. Pure: the same image
    size and spec always give the same bucket, in any process."""
    if w < 1 or h < 1:
        raise UsageError(f"image size must be positive, got {w}x{h}")
    ar = math.log(w / h)
    return min(bucket_sizes(spec), key=lambda b: (round(abs(math.log(b[0] / b[1]) - ar), 12), -b[0] * b[1], b[0]))


def cover_crop(w: int, h: int, bw: int, bh: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize a w x h image to cover bw x bh, then center-crop: ((resized w, resized h), (left, top))."""
    s = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * s)), max(bh, round(h * s))
    return (rw, rh), ((rw - bw) // 2, (rh - bh) // 2)


# --------------------------------------------------------------------------- fingerprint
@dataclass(frozen=True)
class Settings:
    """Everything that changes a latent (hashed into the fingerprint). Batch size, device, worker
    count and engine are not: they move results by float summation order at most (recorded in the
    manifest)."""

    model: str  # manifest id (alias resolved)
    weights_sha256: str
    convention: dict = field(hash=False)
    backend: str  # what runs the encoder untiled (tiled images run the torch module, see pipeline.runtime)
    precision: str
    scale: float = 1.0
    filter: str = "bilinear"
    buckets: str = "none"  # BucketSpec.text() or "none"
    flip: bool = False
    tiles: tuple[int, int, int] = (0, 512, 64)  # (budget, tile, overlap), budget resolved from the env
    schema: int = SCHEMA_VERSION

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tiles"] = list(self.tiles)
        return d


def fingerprint(settings: Settings) -> str:
    return hashlib.sha256(json.dumps(settings.as_dict(), sort_keys=True).encode()).hexdigest()


def differing(a: dict, b: dict) -> list[str]:
    """The settings that differ between two ``Settings.as_dict()``s (for the refusal message)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
