"""The on-disk layout of a dataset, written so that a crash at any instant loses nothing done.

    OUT/manifest.json                          settings, fingerprint, model, versions (vaepack.dataset)
    OUT/plan.jsonl                             the units: one line per input (vaepack.data.plan)
    OUT/shards/NNN/shard-NNNNNN.safetensors    the latents of one unit (tensors latent.I, latent_flip.I)
    OUT/shards/NNN/shard-NNNNNN.errors.json    the unit's bad images: [{input, key, error_type, error}]
    OUT/shards/NNN/shard-NNNNNN.done.json      the done marker, written last
    OUT/index.jsonl (+ index.parquet)          one row per latent, rebuilt from the shards
    OUT/errors.jsonl                           every bad image, rebuilt from the errors files
    OUT/.lock                                  one writer at a time (flock; kept: unlinking it would race)

Every file is written to a temporary name and renamed, and the done marker only after its shard and
errors file, so a unit is either complete (valid marker: fingerprint, shard size) or encoded again.
The index is derived data: ``rebuild_index`` makes it from the shards, so a crashed driver loses
nothing but the time of the units in flight. At most 1000 shards per folder (NNN = unit // 1000).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from vaepack.data.plan import SCHEMA_VERSION, DatasetError, Settings, Unit, fingerprint, load_plan
from vaepack.files import atomic_write_bytes, sha256_file

MANIFEST_FILE = "manifest.json"
INDEX_JSONL = "index.jsonl"
INDEX_PARQUET = "index.parquet"
ERRORS_JSONL = "errors.jsonl"
SHARDS_DIR = "shards"
PER_DIR = 1000
SHARD_FORMAT = "vaepack.dataset.shard"
# rows of the index, in this order (Parquet columns too)
INDEX_FIELDS = ("key", "unit", "shard", "index", "path", "size", "sha256", "original_size", "resized_size",
                "crop_top_left", "target_size", "scaled_size", "padding", "latent_shape", "flip", "backend", "dtype")


def shard_path(out: Path, unit: int) -> Path:
    return Path(out) / SHARDS_DIR / f"{unit // PER_DIR:03d}" / f"shard-{unit:06d}.safetensors"


def errors_path(out: Path, unit: int) -> Path:
    return shard_path(out, unit).with_name(f"shard-{unit:06d}.errors.json")


def done_path(out: Path, unit: int) -> Path:
    return shard_path(out, unit).with_name(f"shard-{unit:06d}.done.json")


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------- manifest
def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(out) / MANIFEST_FILE, _json_bytes(manifest))


def read_manifest(out: Path) -> dict | None:
    path = Path(out) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
        if m.get("format") != "vaepack.dataset" or "fingerprint" not in m or "settings" not in m:
            raise ValueError("not a vaepack dataset manifest")
        return m
    except (OSError, ValueError) as e:
        raise DatasetError(f"unreadable dataset manifest ({e})", path=str(path),
                           hint="rerun `vaepack dataset encode` with --force to start over") from None


def require_manifest(out: Path) -> dict:
    m = read_manifest(out)
    if m is None:
        raise DatasetError("is not a vaepack dataset (no manifest.json)", path=str(out),
                           hint="make one with `vaepack dataset encode SRC OUT`")
    return m


# --------------------------------------------------------------------------- one unit
@dataclass
class UnitResult:
    """What a worker reports for a unit (small: the latents stay in the shard)."""

    unit: int
    images: int = 0  # latents written (not counting flipped copies)
    errors: list[dict] = field(default_factory=list)  # {input, key, error_type, error}
    seconds: float = 0.0
    ran: list[str] = field(default_factory=list)  # distinct "backend dtype" that ran


def write_unit(out: Path, unit: int, fp: str, tensors: dict, items: list[dict], errors: list[dict],
               seconds: float) -> UnitResult:
    """Shard, then errors file, then done marker (each atomic): a marker proves the other two."""
    from safetensors.torch import save_file

    from vaepack.io import atomic_output

    shard = shard_path(out, unit)
    meta = {"format": SHARD_FORMAT, "schema": str(SCHEMA_VERSION), "fingerprint": fp, "unit": str(unit),
            "items": json.dumps(items, sort_keys=True)}
    with atomic_output(shard) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    atomic_write_bytes(errors_path(out, unit), _json_bytes(errors))
    done = {"unit": unit, "fingerprint": fp, "images": len(items), "errors": len(errors),
            "shard": shard.relative_to(out).as_posix(), "shard_bytes": shard.stat().st_size,
            "shard_sha256": sha256_file(shard), "seconds": round(seconds, 3)}
    atomic_write_bytes(done_path(out, unit), _json_bytes(done))
    return UnitResult(unit=unit, images=len(items), errors=errors, seconds=seconds,
                      ran=list(dict.fromkeys(f"{it['backend']} {it['dtype']}" for it in items)))


def read_done(out: Path, unit: int, fp: str) -> dict | None:
    """The unit's done marker if it is valid for fingerprint ``fp`` (shard and errors file present,
    shard size as recorded), else None: the unit is encoded (again)."""
    try:
        d = json.loads(done_path(out, unit).read_text())
        shard = Path(out) / d["shard"]
        if d.get("fingerprint") != fp or d.get("unit") != unit or not errors_path(out, unit).is_file():
            return None
        if shard.stat().st_size != d["shard_bytes"]:
            return None
        return d
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_shard_meta(path: Path) -> tuple[dict, list[dict]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != SHARD_FORMAT:
            raise ValueError("not a vaepack dataset shard")
        return meta, json.loads(meta["items"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise DatasetError(f"unreadable shard ({str(e).splitlines()[0][:120]})", path=str(path),
                           hint="delete its .done.json and rerun `vaepack dataset encode` to encode it again") from None


def read_errors(out: Path, unit: int) -> list[dict]:
    try:
        return json.loads(errors_path(out, unit).read_text())
    except (OSError, ValueError):
        return []


# --------------------------------------------------------------------------- index
@dataclass
class IndexSummary:
    rows: list[dict]
    errors: list[dict]
    done: list[int]
    missing: list[int]


def rebuild_index(out: Path, units: list[Unit], fp: str) -> IndexSummary:
    """index.jsonl (+ index.parquet when pyarrow imports) and errors.jsonl from every unit with a
    valid done marker, in unit order: a resumed run's index equals an uninterrupted one's."""
    out = Path(out)
    rows: list[dict] = []
    errors: list[dict] = []
    done, missing = [], []
    for u in units:
        d = read_done(out, u.id, fp)
        if d is None:
            missing.append(u.id)
            continue
        done.append(u.id)
        _, items = read_shard_meta(out / d["shard"])
        for i, it in enumerate(items):
            rows.append({**{k: it.get(k) for k in INDEX_FIELDS}, "unit": u.id, "shard": d["shard"], "index": i})
        errors += [{**e, "unit": u.id} for e in read_errors(out, u.id)]
    atomic_write_bytes(out / INDEX_JSONL, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    atomic_write_bytes(out / ERRORS_JSONL, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    _write_parquet(out / INDEX_PARQUET, rows)
    return IndexSummary(rows=rows, errors=errors, done=done, missing=missing)


def _write_parquet(path: Path, rows: list[dict]) -> bool:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # JSON lines are the index; Parquet is a convenience where pyarrow exists (Ray brings it)
        path.unlink(missing_ok=True)  # never leave a stale one beside a fresh index.jsonl
        return False
    from vaepack.io import atomic_output

    table = pa.Table.from_pylist(rows) if rows else pa.table({k: pa.array([], pa.string()) for k in INDEX_FIELDS})
    with atomic_output(path) as tmp:
        pq.write_table(table, str(tmp))
    return True


def read_index(out: Path) -> list[dict]:
    path = Path(out) / INDEX_JSONL
    if not path.is_file():
        raise DatasetError("has no index.jsonl (the encode has not finished)", path=str(out),
                           hint="rerun `vaepack dataset encode` to finish it (done units are kept)")
    try:
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    except ValueError as e:
        raise DatasetError(f"damaged index ({e})", path=str(path), hint="rerun `vaepack dataset encode` to rebuild it") from None


# --------------------------------------------------------------------------- info / verify
def dataset_info(out: Path) -> dict:
    """The manifest plus counts: units planned/done, images, errors, buckets, bytes on disk."""
    out = Path(out)
    m = require_manifest(out)
    units = load_plan(out)
    done = [u.id for u in units if read_done(out, u.id, m["fingerprint"]) is not None]
    info = {"out": str(out), "fingerprint": m["fingerprint"], "model": m["settings"]["model"],
            "settings": m["settings"], "units": len(units), "units_done": len(done),
            "inputs": sum(len(u.items) for u in units), "manifest": m}
    try:
        rows = read_index(out)
        buckets: dict[str, int] = {}
        for r in rows:
            t = r.get("target_size") or [0, 0]
            buckets[f"{t[1]}x{t[0]}"] = buckets.get(f"{t[1]}x{t[0]}", 0) + 1
        errs = [ln for ln in (out / ERRORS_JSONL).read_text().splitlines() if ln.strip()] \
            if (out / ERRORS_JSONL).is_file() else []
        info.update(images=len(rows), errors=len(errs), shapes=dict(sorted(buckets.items())), index=True)
    except DatasetError:
        info.update(images=None, errors=None, shapes={}, index=False)
    info["bytes"] = sum(p.stat().st_size for p in (out / SHARDS_DIR).rglob("*") if p.is_file()) \
        if (out / SHARDS_DIR).is_dir() else 0
    return info


def _check_shard(out: Path, unit: Unit, d: dict, fp: str, flip: bool) -> tuple[list[dict], str | None]:
    """Re-read one shard: hash, fingerprint, every tensor (finite, the recorded shape)."""
    from safetensors.torch import load_file

    import torch

    shard = out / d["shard"]
    if sha256_file(shard) != d.get("shard_sha256"):
        return [], "sha256 differs from its done marker"
    meta, items = read_shard_meta(shard)
    if meta.get("fingerprint") != fp:
        return items, "fingerprint differs from the manifest's"
    if len(items) != d.get("images"):
        return items, f"{len(items)} items but its done marker says {d.get('images')}"
    known = {it.key for it in unit.items}
    tensors = load_file(str(shard))
    want = {f"latent.{i}" for i in range(len(items))} | ({f"latent_flip.{i}" for i in range(len(items))} if flip else set())
    if set(tensors) != want:
        return items, f"holds tensors {sorted(set(tensors) ^ want)[:4]} it should not or lacks them"
    for i, it in enumerate(items):
        if it["key"] not in known:
            return items, f"item {it['key']!r} is not in the unit's plan"
        for name in (f"latent.{i}",) + ((f"latent_flip.{i}",) if flip else ()):
            t = tensors[name]
            if list(t.shape) != list(it["latent_shape"]) or not torch.isfinite(t).all():
                return items, f"{name} has shape {list(t.shape)} (want {it['latent_shape']}) or non-finite values"
    return items, None


def verify_dataset(out: Path) -> dict:
    """Re-read every shard and check it against its done marker, the manifest's fingerprint (itself
    recomputed from the recorded settings) and the index; ``ok`` when all agree and no unit is missing."""
    t0 = time.perf_counter()
    out = Path(out)
    m = require_manifest(out)
    fp = m["fingerprint"]
    problems: list[dict] = []
    try:
        s = dict(m["settings"])
        s["tiles"] = tuple(s["tiles"])
        if fingerprint(Settings(**s)) != fp:
            problems.append({"file": MANIFEST_FILE, "error": "the fingerprint does not match the recorded settings"})
    except TypeError as e:
        problems.append({"file": MANIFEST_FILE, "error": f"settings are malformed ({e})"})
    units = load_plan(out)
    missing, images, keys = [], 0, []
    for u in units:
        d = read_done(out, u.id, fp)
        if d is None:
            missing.append(u.id)
            continue
        try:
            items, err = _check_shard(out, u, d, fp, bool(m["settings"].get("flip")))
        except DatasetError as e:
            items, err = [], str(e)
        if err:
            problems.append({"file": d["shard"], "error": err})
        images += len(items)
        keys += [it["key"] for it in items]
    index_ok = True
    try:
        rows = read_index(out)
        if [r["key"] for r in rows] != keys:
            index_ok = False
            problems.append({"file": INDEX_JSONL, "error": f"{len(rows)} rows do not match the shards' {len(keys)} "
                             "latents (rerun `vaepack dataset encode` to rebuild it)"})
    except DatasetError as e:
        index_ok = False
        problems.append({"file": INDEX_JSONL, "error": str(e)})
    errors = sum(len(read_errors(out, u.id)) for u in units if u.id not in set(missing))
    planned = sum(len(u.items) for u in units)
    return {"out": str(out), "ok": not problems and not missing, "fingerprint": fp, "units": len(units),
            "units_done": len(units) - len(missing), "missing_units": missing, "images": images, "errors": errors,
            "inputs": planned, "index": index_ok, "problems": problems,
            "seconds": round(time.perf_counter() - t0, 3), "error_rate": errors / planned if planned else 0.0}
