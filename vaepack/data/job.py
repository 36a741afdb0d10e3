"""``encode_dataset``: plan, refuse a stale OUT, resume, run an engine, rebuild the index.

The driver loads the encoder once to learn what actually runs (``--backend auto`` resolves per
machine) and fingerprints that; workers refuse to run anything else. A rerun into the same OUT
encodes only the units without a valid done marker; ``append`` adds new inputs as new units;
``force`` discards what OUT holds and starts over (needed when the fingerprint changed).
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from vaepack.data import plan as P
from vaepack.data import shards as S
from vaepack.data.encode import Job, loaded_as
from vaepack.errors import UsageError

ENGINES = ("local", "ray")
OWN_FILES = {S.MANIFEST_FILE, P.PLAN_FILE, S.INDEX_JSONL, S.INDEX_PARQUET, S.ERRORS_JSONL, S.SHARDS_DIR, ".lock"}


@dataclass
class EncodeOptions:
    model: str = "default"
    scale: float = 1.0
    filter: str = "bilinear"
    backend: str = "auto"
    dtype: str | None = None
    device: str = "auto"
    batch_size: int = 8
    buckets: str | None = "none"
    flip: bool = False
    engine: str = "local"
    workers: int = 1
    ray_address: str | None = None
    shard_size: int = 64
    max_error_rate: float = 0.05
    force: bool = False
    append: bool = False
    hash: bool = False
    tile_budget: int | None = None
    tile_size: int = 512
    tile_overlap: int = 64
    max_pixels: int | None = None


@dataclass
class EncodeSummary:
    out: str
    fingerprint: str
    encoded: int = 0  # latents written by this run
    skipped: int = 0  # inputs of units that were already done
    failed: list[dict] = field(default_factory=list)  # this run's bad images: {input, error, error_type, key}
    shards: int = 0  # units done (this run and before)
    units: int = 0
    units_encoded: int = 0
    images: int = 0  # latents in the index
    errors: int = 0  # bad images in the whole dataset
    error_rate: float = 0.0  # errors / inputs of done units
    max_error_rate: float = 0.05
    new_inputs: int = 0  # inputs in SRC not in the plan (rerun with --append to add them)
    seconds: float = 0.0
    images_per_s: float = 0.0
    engine: str = "local"
    workers: int = 1
    model: str = ""
    backend: str = ""
    dtype: str = ""

    @property
    def too_many_errors(self) -> bool:
        return self.error_rate > self.max_error_rate

    def as_dict(self) -> dict:
        return {**asdict(self), "too_many_errors": self.too_many_errors}


def _check(o: EncodeOptions) -> P.BucketSpec | None:
    from vaepack.pipeline import FILTERS

    if o.engine not in ENGINES:
        raise UsageError(f"unknown --engine '{o.engine}' (choose {', '.join(ENGINES)})")
    if o.batch_size < 1 or o.workers < 1 or o.shard_size < 1:
        raise UsageError("--batch-size, --workers and --shard-size must be >= 1")
    if o.filter not in FILTERS:
        raise UsageError(f"unknown --filter '{o.filter}' (choose {', '.join(FILTERS)})")
    if not 0 <= o.max_error_rate <= 1:
        raise UsageError(f"--max-error-rate must be in [0, 1], got {o.max_error_rate}")
    if o.tile_size < 8 or o.tile_overlap < 0 or o.tile_overlap >= o.tile_size:
        raise UsageError("--tile-size must be >= 8 and --tile-overlap in [0, tile-size)")
    return P.parse_buckets(o.buckets)


@contextlib.contextmanager
def _locked(out: Path):
    """One writer per OUT (an flock, released by the OS if the driver dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise P.DatasetError("another `vaepack dataset encode` is writing here", path=str(out),
                                 hint="wait for it, or pick another OUT") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clear(out: Path) -> None:
    for name in OWN_FILES - {".lock"}:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def settings_for(vae, o: EncodeOptions, spec: P.BucketSpec | None) -> P.Settings:
    from vaepack import latents as L
    from vaepack.pipeline import tile_budget_default

    backend, precision, sha = loaded_as(vae)
    budget = tile_budget_default() if o.tile_budget is None else o.tile_budget
    return P.Settings(model=vae.entry.id, weights_sha256=sha, convention=L.convention(vae.space), backend=backend,
                      precision=precision, scale=float(o.scale), filter=o.filter,
                      buckets=spec.text() if spec else "none", flip=bool(o.flip),
                      tiles=(int(budget), int(o.tile_size), int(o.tile_overlap)))


def _manifest(o: EncodeOptions, settings: P.Settings, fp: str, src: str, vae, old: dict | None) -> dict:
    from vaepack import __version__
    from vaepack.files import command_line

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"format": "vaepack.dataset", "schema": P.SCHEMA_VERSION, "vaepack_version": __version__,
            "fingerprint": fp, "settings": settings.as_dict(), "model_arg": o.model, "space": vae.space.name,
            "batch_size": o.batch_size, "shard_size": o.shard_size, "device": str(vae.device), "src": src,
            "created": (old or {}).get("created", now), "updated": now, "command": command_line()}


def _refuse_or_reset(out: Path, o: EncodeOptions, fp: str, settings: P.Settings) -> dict | None:
    """The existing manifest when OUT may be resumed; clears OUT with ``force``; refuses otherwise."""
    old = S.read_manifest(out) if not o.force else None
    if o.force:
        _clear(out)
        return None
    if old is None:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES) if out.is_dir() else []
        if foreign:
            raise P.DatasetError(f"is not empty and not a vaepack dataset (holds {foreign[0]})", path=str(out),
                                 hint="pick an empty or new folder, or use --force to write into it")
        _clear(out)  # our own leftovers without a manifest (a crash before the first manifest write)
        return None
    if old["fingerprint"] != fp:
        diff = P.differing(old["settings"], settings.as_dict())
        raise P.DatasetError(f"holds latents made with other settings (differ in: {', '.join(diff) or 'schema'})",
                             path=str(out), hint="use --force to discard them and encode again, or another OUT")
    return old


def encode_dataset(src: str | Path, out: str | Path, o: EncodeOptions | None = None,
                   on_result: Callable[[S.UnitResult], None] | None = None,
                   on_plan: Callable[[int, int], None] | None = None) -> EncodeSummary:
    """Encode SRC into the sharded dataset OUT (see vaepack/data/shards.py for the layout).

    ``on_plan(pending_units, pending_inputs)`` is called once the work is known, ``on_result`` after
    each unit is written (progress bars; an exception raised there stops the run, done units kept)."""
    o = o or EncodeOptions()
    spec = _check(o)
    if o.engine == "ray":  # before anything is loaded or written: the install hint at once
        from vaepack.data.ray_engine import require_ray

        require_ray()
    out = Path(out)
    with _locked(out):
        from vaepack.runtime import load_vae

        vae = load_vae(o.model, parts=("encoder",), device=o.device, dtype=o.dtype, backend=o.backend)
        if spec is not None and spec.step % vae.factor:
            raise UsageError(f"--buckets step {spec.step} is not a multiple of {vae.entry.id}'s factor {vae.factor}",
                             hint=f"use step={max(vae.factor, spec.step // vae.factor * vae.factor)}")
        settings = settings_for(vae, o, spec)
        fp = P.fingerprint(settings)
        items = P.collect_inputs(src, hash=o.hash)  # before --force clears OUT: a wrong SRC keeps it
        old = _refuse_or_reset(out, o, fp, settings)
        S.write_manifest(out, _manifest(o, settings, fp, str(src), vae, old))
        units = P.load_plan(out)
        planned = {it.key for u in units for it in u.items}
        new = [it for it in items if it.key not in planned]
        if not units or (o.append and new):
            units += P.make_units(new, o.shard_size, first=(units[-1].id + 1) if units else 0)
            P.save_plan(out, units)
            new = []
        pending = [u for u in units if S.read_done(out, u.id, fp) is None]
        job = Job(out=str(out.absolute()), model=o.model, backend=o.backend, dtype=o.dtype, device=str(vae.device),
                  batch_size=o.batch_size, settings=settings, fingerprint=fp, max_pixels=o.max_pixels)
        summary = EncodeSummary(out=str(out), fingerprint=fp, units=len(units), units_encoded=len(pending),
                                skipped=sum(len(u.items) for u in units) - sum(len(u.items) for u in pending),
                                new_inputs=len(new), engine=o.engine, workers=o.workers, model=settings.model,
                                backend=settings.backend, dtype=settings.precision, max_error_rate=o.max_error_rate)
        if on_plan is not None:
            on_plan(len(pending), sum(len(u.items) for u in pending))

        def collect(res: S.UnitResult) -> None:
            summary.encoded += res.images
            summary.failed += res.errors
            if on_result is not None:
                on_result(res)

        in_driver = vae if o.engine == "local" and o.workers == 1 else None
        del vae  # worker processes and actors build their own
        t0 = time.perf_counter()
        if o.engine == "ray":
            from vaepack.data.ray_engine import run_ray

            run_ray(pending, job, o.workers, collect, address=o.ray_address)
        else:
            from vaepack.data.local import run_local

            run_local(pending, job, o.workers, collect, vae=in_driver)
        summary.seconds = time.perf_counter() - t0
        summary.images_per_s = summary.encoded / summary.seconds if summary.seconds > 0 and summary.encoded else 0.0
        idx = S.rebuild_index(out, units, fp)
        done_inputs = sum(len(u.items) for u in units if u.id in set(idx.done))
        summary.shards, summary.images, summary.errors = len(idx.done), len(idx.rows), len(idx.errors)
        summary.error_rate = summary.errors / done_inputs if done_inputs else 0.0
        return summary
