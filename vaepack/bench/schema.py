"""The benchmark result document (schema in benchmarks/README.md, version ``SCHEMA_VERSION``).

A result is a plain dict: ``schema_version``, ``kind`` ("bench" or "rd"), ``created_utc``,
``interrupted``, ``machine``, ``config`` and ``rows``. ``validate`` checks it (presence, types,
finiteness, status/reason) and raises a one-line ``BenchSchemaError``; ``save``/``load`` validate on
write and read, so a file on disk always follows the schema.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from vaepack.errors import VaepackError
from vaepack.metrics import PSNR_CAP_DB

SCHEMA_VERSION = 1

ROW_FIELDS: dict[str, tuple] = {
    # field: (types, nullable)
    "model": ((str,), False), "part": ((str,), False), "network": ((str,), False), "decoder": ((str,), True),
    "backend": ((str,), False), "precision": ((str,), False), "device": ((str,), False),
    "size": ((int,), False), "scale": ((int, float), False), "batch": ((int,), False), "nfe": ((int,), True),
    "input_shape": ((list,), True), "status": ((str,), False), "reason": ((str,), True),
    "runs": ((int,), False), "latency_ms_median": ((int, float), True), "latency_ms_p90": ((int, float), True),
    "latency_ms_min": ((int, float), True), "throughput_img_s": ((int, float), True),
    "params": ((int,), True), "param_mb": ((int, float), True), "param_dtype": ((str,), True),
    "macs_per_image": ((int, float), True), "flops_per_image": ((int, float), True),
    "gflops_per_s": ((int, float), True), "peak_mem_mb": ((int, float), True), "mem_method": ((str,), True),
    "psnr": ((int, float), True), "ssim": ((int, float), True), "ms_ssim": ((int, float), True),
    "haarpsi": ((int, float), True), "gmsd": ((int, float), True),
    "quality_images": ((int,), True), "quality_note": ((str,), True),
}
RD_ROW_FIELDS: dict[str, tuple] = {
    "codec": ((str,), False), "variant": ((str,), False), "quality_setting": ((int,), True),
    "model": ((str,), True), "decoder": ((str,), True), "scale": ((int, float), True),
    "bpp": ((int, float), False), "psnr": ((int, float), False), "ssim": ((int, float), False),
    "ms_ssim": ((int, float), False), "haarpsi": ((int, float), True), "gmsd": ((int, float), True),
    "images": ((int,), False),
}
# Fields added after results were first recorded: a file written before them may lack them (read as
# absent = not measured); new files always carry them.
ADDED_FIELDS = frozenset({"haarpsi", "gmsd"})
STATUSES = ("ok", "skipped", "error")
MACHINE_FIELDS = ("cpu", "logical_cpus", "threads", "device", "python", "torch", "vaepack")


class BenchSchemaError(VaepackError):
    """A benchmark result that does not follow the documented schema."""


def new_result(kind: str, machine: dict, config: dict) -> dict:
    """An empty result document of ``kind`` ("bench" or "rd"), stamped now (UTC); rows are appended."""
    return {
        "schema_version": SCHEMA_VERSION, "kind": kind,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "interrupted": False, "machine": machine, "config": config, "rows": [],
    }


def empty_row(**kw) -> dict:
    """A bench row with every field of ``ROW_FIELDS`` (None unless given), status ok, no runs yet."""
    row = {k: None for k in ROW_FIELDS}
    row.update(status="ok", runs=0)
    row.update(kw)
    return row


def _type_ok(v, types) -> bool:
    if isinstance(v, bool):
        return bool in types
    return isinstance(v, types)


def validate(result) -> None:
    """Raise ``BenchSchemaError`` (one line) if ``result`` does not follow the documented schema."""

    def bad(msg):
        raise BenchSchemaError(f"invalid benchmark result: {msg}")

    if not isinstance(result, dict):
        bad(f"expected an object, got {type(result).__name__}")
    for key, types in (("schema_version", (int,)), ("kind", (str,)), ("created_utc", (str,)),
                       ("interrupted", (bool,)), ("machine", (dict,)), ("config", (dict,)), ("rows", (list,))):
        if key not in result:
            bad(f"missing '{key}'")
        if not _type_ok(result[key], types):
            bad(f"'{key}' should be {types[0].__name__}, got {type(result[key]).__name__}")
    if result["schema_version"] != SCHEMA_VERSION:
        bad(f"schema_version {result['schema_version']} (this vaepack reads {SCHEMA_VERSION})")
    if result["kind"] not in ("bench", "rd"):
        bad(f"kind must be 'bench' or 'rd', got {result['kind']!r}")
    for key in MACHINE_FIELDS:
        if key not in result["machine"]:
            bad(f"machine.{key} missing")
    fields = ROW_FIELDS if result["kind"] == "bench" else RD_ROW_FIELDS
    for i, row in enumerate(result["rows"]):
        if not isinstance(row, dict):
            bad(f"rows[{i}] is not an object")
        for key, (types, nullable) in fields.items():
            if key not in row:
                if key in ADDED_FIELDS:
                    continue
                bad(f"rows[{i}].{key} missing")
            v = row[key]
            if v is None:
                if not nullable:
                    bad(f"rows[{i}].{key} is null")
                continue
            if not _type_ok(v, types):
                bad(f"rows[{i}].{key} should be {types[0].__name__}, got {type(v).__name__}")
            if isinstance(v, float) and not math.isfinite(v):
                bad(f"rows[{i}].{key} is not finite ({v}); PSNR of identical images is stored as {PSNR_CAP_DB}")
        if result["kind"] == "bench":
            if row["status"] not in STATUSES:
                bad(f"rows[{i}].status must be one of {', '.join(STATUSES)}, got {row['status']!r}")
            if row["status"] == "ok":
                for key in ("latency_ms_median", "latency_ms_p90", "throughput_img_s", "params", "flops_per_image"):
                    if row[key] is None:
                        bad(f"rows[{i}].{key} is null in an 'ok' row")
            elif not row["reason"]:
                bad(f"rows[{i}] is '{row['status']}' without a reason")


def to_json(result: dict) -> str:
    validate(result)
    return json.dumps(result, indent=1, allow_nan=False) + "\n"


def save(result: dict, path) -> None:
    """Validate and write ``result`` as JSON, atomically."""
    from vaepack.io import atomic_output

    text = to_json(result)
    with atomic_output(Path(path)) as tmp:
        Path(tmp).write_text(text)


def load(path) -> dict:
    """Read and validate a result file."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BenchSchemaError(f"cannot read benchmark result ({e})", path=str(path)) from None
    validate(result)
    return result
