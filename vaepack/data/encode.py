"""The one unit-encoding function both engines run (``encode_unit``), and the worker's model load.

A unit is encoded the same way whichever engine, process or node runs it: its images are read in
unit order, fitted to their bucket, grouped by shape (stable order) into batches of ``batch_size``
and encoded through the pipeline's public API (``encode_batch``: the same remap, padding and tiling
as ``vaepack encode``). The batches are a function of the unit alone, so the same inputs, model,
backend, precision and batch size give the same latents under either engine.

A bad image (unreadable, truncated, empty, too small, changed since planned) is skipped and listed
with its error type; it never stops the unit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vaepack.data.plan import BucketSpec, DatasetError, Settings, Unit, bucket_for, cover_crop, parse_buckets
from vaepack.data.shards import UnitResult, write_unit
from vaepack.errors import VaepackError

# Images waiting for a full batch are flushed early past this many pixels (uint8, ~3 bytes each), so
# a unit of many differently-shaped images stays bounded in memory; deterministic (unit order only).
PENDING_PIXELS = 32 * 1024 * 1024


@dataclass(frozen=True)
class Job:
    """What a worker needs to encode units (picklable: sent to worker processes and Ray actors)."""

    out: str
    model: str  # as the user named it (alias allowed); settings.model is the resolved id
    backend: str  # as asked (auto allowed); settings.backend is what the driver resolved
    dtype: str | None
    device: str
    batch_size: int
    settings: Settings
    fingerprint: str
    max_pixels: int | None = None


def loaded_as(vae) -> tuple[str, str, str]:
    """(backend, precision, weights sha256) of a loaded encoder: what untiled images run on."""
    p = vae.parts["encoder"]
    return p.backend, vae.precision("encoder"), p.sha256


def load_encoder(job: Job, threads: int | None = None):
    """The encoder, built once per worker; refused if it is not what the fingerprint says (e.g. a
    cluster node without OpenVINO, where --backend auto would silently fall back to torch).

    ``threads``: the worker's share of the CPU; torch takes it process-wide and an OpenVINO or
    ONNX Runtime runner is rebuilt with it (load_vae gives runners every core)."""
    from vaepack.runtime import get_backend, load_vae

    if threads:
        torch.set_num_threads(int(threads))
    vae = load_vae(job.model, parts=("encoder",), device=job.device, dtype=job.dtype, backend=job.backend)
    p = vae.parts["encoder"]
    if threads and p.runner is not None and p.backend in ("openvino", "onnxruntime"):
        p.runner = get_backend(p.backend, vae.entry.id, "encoder", vae.precision("encoder"), device=str(vae.device),
                               threads=int(threads))
    got = loaded_as(vae)
    want = (job.settings.backend, job.settings.precision, job.settings.weights_sha256)
    if got != want:
        raise DatasetError(f"this worker loaded {job.settings.model} as {got[0]} {got[1]} (weights {got[2][:12]}) "
                           f"but the dataset was planned for {want[0]} {want[1]} (weights {want[2][:12]})",
                           path=job.out, hint="install the same vaepack extras and weights on every worker, or "
                           "pass --backend and --dtype explicitly")
    return vae


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def fit_bucket(x: torch.Tensor, spec: BucketSpec | None, filter: str) -> tuple[torch.Tensor, dict]:
    """The image as it is encoded, and where it came from (SDXL's size/crop conditioning):
    buckets none: the image itself; else resized to cover its bucket (antialiased when shrinking),
    center-cropped and rounded to 8 bits, read region by region (tiling.Remap) so no resized
    full-size float image is made."""
    from vaepack.tiling import Remap

    h, w = x.shape[-2:]
    if spec is None:
        return x, {"original_size": [h, w], "resized_size": [h, w], "crop_top_left": [0, 0], "target_size": [h, w]}
    bw, bh = bucket_for(w, h, spec)
    (rw, rh), (left, top) = cover_crop(w, h, bw, bh)
    region = Remap(x, (rh, rw), filter, (0, 0, 0, 0)).region(top, top + bh, left, left + bw)
    xb = _uint8(region[0]) if x.dtype == torch.uint8 else region[0].clamp(0, 1)
    return xb, {"original_size": [h, w], "resized_size": [rh, rw], "crop_top_left": [top, left], "target_size": [bh, bw]}


def _error(item, e: BaseException) -> dict:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return {"input": item.path, "key": item.key, "error_type": type(e).__name__, "error": msg}


def _read(item, job: Job, spec: BucketSpec | None, factor: int):
    """Load and fit one image; raises for a bad one (the caller lists it)."""
    from vaepack.files import sha256_file
    from vaepack.io import load_image
    from vaepack.pipeline import plan

    size = Path(item.path).stat().st_size if os.path.exists(item.path) else -1
    if item.size >= 0 and size >= 0 and size != item.size:
        raise DatasetError(f"changed since it was planned ({item.size} -> {size} bytes)", path=item.path,
                           hint="rerun with --force to plan the dataset again")
    if item.sha256 and size >= 0 and sha256_file(item.path) != item.sha256:
        raise DatasetError("content changed since it was planned (sha256)", path=item.path,
                           hint="rerun with --force to plan the dataset again")
    s = job.settings
    x = load_image(Path(item.path), max_pixels=job.max_pixels, uint8=True)
    plan(x.shape[-2], x.shape[-1], factor, s.scale, s.filter, item.path)  # too small: ImageError before batching
    return fit_bucket(x, spec, s.filter)


def encode_unit(vae, job: Job, unit: Unit) -> UnitResult:
    """Encode one unit and write its shard, errors file and done marker (vaepack.data.shards)."""
    from vaepack.pipeline import TileOptions, encode_batch, encode_tiles

    t0 = time.perf_counter()
    s = job.settings
    spec = parse_buckets(s.buckets)
    tiles = TileOptions(*s.tiles)
    done: dict[int, tuple[dict, torch.Tensor, torch.Tensor | None]] = {}
    errors: dict[int, dict] = {}

    def run(xs: list[torch.Tensor], names: list[str]):
        return encode_batch(vae, xs, s.scale, s.filter, tiles, names, model_id=s.model)

    def flush(group: list[tuple[int, torch.Tensor, dict]]) -> None:
        xs = [x for _, x, _ in group]
        names = [unit.items[i].path for i, _, _ in group]
        try:
            recs = run(xs, names)
            flips = run([torch.flip(x, dims=[-1]) for x in xs], names) if s.flip else [None] * len(xs)
        except VaepackError as e:
            if len(group) == 1:
                errors[group[0][0]] = _error(unit.items[group[0][0]], e)
            else:  # isolate the image that failed (the others keep their latents)
                for g in group:
                    flush([g])
            return
        for (i, _, meta), rec, frec in zip(group, recs, flips):
            it = unit.items[i]
            meta = {"key": it.key, "path": it.path, "size": it.size, "sha256": it.sha256, **meta,
                    "scaled_size": list(rec.scaled_size), "padding": list(rec.padding),
                    "latent_shape": list(rec.latent.shape[1:]), "flip": s.flip,
                    "backend": rec.backend, "dtype": rec.dtype}
            done[i] = (meta, rec.latent[0].float(), None if frec is None else frec.latent[0].float())

    pending: dict[tuple, list] = {}
    for i, item in enumerate(unit.items):
        try:
            x, meta = _read(item, job, spec, vae.factor)
        except Exception as e:  # noqa: BLE001 - a bad image is listed, never fatal (load_image maps the usual ones)
            errors[i] = _error(item, e)
            continue
        h, w = x.shape[-2:]
        if encode_tiles(vae, h, w, s.scale, tiles):  # tiled: alone, now (one large image in memory)
            flush([(i, x, meta)])
            continue
        group = pending.setdefault(tuple(x.shape), [])
        group.append((i, x, meta))
        if len(group) >= job.batch_size:
            flush(pending.pop(tuple(x.shape)))
        elif sum(g[1].numel() for grp in pending.values() for g in grp) > 3 * PENDING_PIXELS:
            flush(pending.pop(max(pending, key=lambda k: len(pending[k]))))
    for shape in list(pending):
        flush(pending.pop(shape))
    items, tensors = [], {}
    for j, i in enumerate(sorted(done)):
        meta, z, zf = done[i]
        items.append(meta)
        tensors[f"latent.{j}"] = z
        if zf is not None:
            tensors[f"latent_flip.{j}"] = zf
    errs = [errors[i] for i in sorted(errors)]
    return write_unit(Path(job.out), unit.id, job.fingerprint, tensors, items, errs, time.perf_counter() - t0)
