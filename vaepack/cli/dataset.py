"""``vaepack dataset``: encode a training set into resumable latent shards; info; verify."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vaepack.cli.common import (BackendOpt, DeviceOpt, JsonOpt, MaxPixOpt, ModelOpt, RunDtypeOpt, TileBudgetOpt,
                                TileOverlapOpt, TileSizeOpt, emit_json, human_size, note, stderr_console)

dataset_app = typer.Typer(no_args_is_help=True, help="Cache the latents of a training set: resumable, sharded, "
                          "bucketed (local worker processes or Ray Data).")
MAX_LISTED = 10  # failed inputs printed one per line; the rest are in OUT/errors.jsonl


class _Progress:
    """A rich bar over the pending inputs with images/s (on a terminal only; logs get the summary)."""

    def __init__(self, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        err = stderr_console()
        self.prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                             TimeRemainingColumn(), console=err, disable=not err.is_terminal, transient=True)
        self.task = None
        self.images = 0

    def plan(self, units: int, inputs: int) -> None:
        import time

        self.t0 = time.perf_counter()
        self.task = self.prog.add_task("encode", total=inputs, rate="")

    def result(self, res) -> None:
        import time

        self.images += res.images
        rate = self.images / max(1e-9, time.perf_counter() - self.t0)
        self.prog.update(self.task, advance=res.images + len(res.errors), rate=f"{rate:.1f} images/s")


@dataset_app.command("encode")
def encode(
    src: str = typer.Argument(..., help="A folder (walked recursively), a glob, or a .txt/.parquet list of paths."),
    out: Path = typer.Argument(..., help="The dataset folder (created; a rerun resumes it)."),
    model: str = ModelOpt,
    scale: float = typer.Option(1.0, "--scale", "-s", help="Resolution remap before encoding (as `vaepack encode`)."),
    filter: str = typer.Option("bilinear", "--filter", help="Resize filter (remap and buckets): bilinear, bicubic, "
                               "nearest, area."),
    backend: str = BackendOpt, dtype: Optional[str] = RunDtypeOpt, device: str = DeviceOpt,
    batch_size: int = typer.Option(8, "--batch-size", help="Images of one shape per forward pass."),
    buckets: str = typer.Option("none", "--buckets", help="none (keep each image's size, padded as `encode` pads) "
                                "or aspect-ratio buckets max-area=1048576,step=64,min=256,max=2048 (resize to "
                                "cover, center crop)."),
    flip: bool = typer.Option(False, "--flip", help="Also store the latent of the mirrored image."),
    engine: str = typer.Option("local", "--engine", help="local (worker processes) or ray (Ray Data; "
                               "pip install 'vaepack[ray]')."),
    workers: int = typer.Option(1, "--workers", "-w", help="Worker processes (local) or actors (ray)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to join (default: "
                                              "$RAY_ADDRESS, else a local Ray on this machine's cores)."),
    shard_size: int = typer.Option(64, "--shard-size", help="Images per shard (one unit of work)."),
    max_error_rate: float = typer.Option(0.05, "--max-error-rate", help="Exit 1 when more than this fraction "
                                         "of the inputs are bad images (they are skipped and listed either way)."),
    force: bool = typer.Option(False, "--force", help="Discard what OUT holds and encode everything again "
                               "(needed when model, weights, scale, buckets, backend or precision changed)."),
    append: bool = typer.Option(False, "--append", help="Add inputs of SRC that are not in OUT's plan yet."),
    hash: bool = typer.Option(False, "--hash", help="Record each input's sha256 (and refuse changed files)."),
    tile_budget: Optional[int] = TileBudgetOpt, tile_size: int = TileSizeOpt, tile_overlap: int = TileOverlapOpt,
    max_pixels: Optional[int] = MaxPixOpt, as_json: bool = JsonOpt,
):
    """Encode SRC into latent shards in OUT (a rerun resumes; bad images are skipped and listed)."""
    from vaepack.data.job import EncodeOptions, encode_dataset

    o = EncodeOptions(model=model, scale=scale, filter=filter, backend=backend, dtype=dtype, device=device,
                      batch_size=batch_size, buckets=buckets, flip=flip, engine=engine, workers=workers,
                      ray_address=ray_address, shard_size=shard_size, max_error_rate=max_error_rate, force=force,
                      append=append, hash=hash, tile_budget=tile_budget, tile_size=tile_size,
                      tile_overlap=tile_overlap, max_pixels=max_pixels)
    bar = _Progress(f"dataset encode ({engine}, {workers} worker{'s' if workers != 1 else ''})")
    with bar.prog:
        s = encode_dataset(src, out, o, on_result=bar.result, on_plan=bar.plan)
    if as_json:
        emit_json(s.as_dict())
    else:
        for f in s.failed[:MAX_LISTED]:
            note(f"skipped ({f['error_type']}) {f['error']}")
        if len(s.failed) > MAX_LISTED:
            note(f"... and {len(s.failed) - MAX_LISTED} more (all in {Path(out) / 'errors.jsonl'})")
        note(f"{out}: encoded {s.encoded} images in {s.units_encoded} shards ({s.seconds:.1f} s, "
             f"{s.images_per_s:.2f} images/s, {s.backend} {s.dtype}); skipped {s.skipped} already done; "
             f"{len(s.failed)} failed. Dataset: {s.images} latents in {s.shards}/{s.units} shards, {s.errors} bad "
             f"inputs; fingerprint {s.fingerprint[:12]}")
    if s.new_inputs:
        note(f"note: {s.new_inputs} inputs of {src} are not in the dataset's plan (rerun with --append to add them)")
    if s.too_many_errors:
        note(f"error: {s.errors} bad inputs ({s.error_rate:.1%}) exceed --max-error-rate {max_error_rate:g}")
        raise typer.Exit(1)


@dataset_app.command("info")
def info(out: Path = typer.Argument(..., help="A dataset folder."), as_json: bool = JsonOpt):
    """Settings, fingerprint and counts of a dataset."""
    from vaepack.data.shards import dataset_info

    d = dataset_info(out)
    if as_json:
        emit_json(d)
        return
    s = d["settings"]
    print(f"{out}: {d['model']} ({s['backend']} {s['precision']}), scale {s['scale']:g} {s['filter']}, "
          f"buckets {s['buckets']}{', flip' if s['flip'] else ''}; fingerprint {d['fingerprint'][:12]}")
    print(f"  shards {d['units_done']}/{d['units']} done, {d['inputs']} inputs, "
          f"{d['images'] if d['index'] else '?'} latents, {d['errors'] if d['index'] else '?'} bad inputs, "
          f"{human_size(d['bytes'])}" + ("" if d["index"] else " (no index yet: rerun the encode to finish it)"))
    if d["shapes"]:
        print("  sizes (w x h: latents): " + ", ".join(f"{k}: {v}" for k, v in list(d["shapes"].items())[:12])
              + (" ..." if len(d["shapes"]) > 12 else ""))


@dataset_app.command("verify")
def verify(out: Path = typer.Argument(..., help="A dataset folder."), as_json: bool = JsonOpt):
    """Re-read every shard: hashes, fingerprint, tensors, counts and the index. Exit 1 on any problem."""
    from vaepack.data.shards import verify_dataset

    v = verify_dataset(out)
    if as_json:
        emit_json(v)
    else:
        for p in v["problems"]:
            note(f"{Path(out) / p['file']}: {p['error']}")
        if v["missing_units"]:
            note(f"{len(v['missing_units'])} shards not done yet (rerun the encode to resume): "
                 + ", ".join(map(str, v["missing_units"][:10])) + (" ..." if len(v["missing_units"]) > 10 else ""))
        print(f"{out}: {'ok' if v['ok'] else 'NOT OK'}: {v['units_done']}/{v['units']} shards, {v['images']} latents, "
              f"{v['errors']} bad inputs, fingerprint {v['fingerprint'][:12]} ({v['seconds']:.1f} s)")
    if not v["ok"]:
        raise typer.Exit(1)
