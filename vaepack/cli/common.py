"""What every command shares: console output, --json, the batch runner (one line per failed input,
--keep-going), and the common options. Nothing here knows about a particular command."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer

from vaepack.errors import UsageError, VaepackError


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def stdout_console():
    from rich.console import Console

    c = Console(highlight=False)
    if not c.is_terminal:  # piped/logged: don't squeeze tables into 80 columns
        c = Console(highlight=False, width=160)
    return c


def note(msg: str) -> None:
    """A plain progress line on stderr (no wrapping, so logs stay greppable)."""
    print(msg, file=sys.stderr)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, float):
        return None
    if isinstance(o, Path):
        return str(o)
    return str(o)


def finite(v: float) -> float | None:
    """JSON has no Infinity: identical images (PSNR = inf) are written as null."""
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def csv_list(s: str | None, conv: Callable = str) -> list:
    if s is None:
        return []
    try:
        return [conv(p.strip()) for p in s.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"cannot parse the list '{s}'") from None



# --------------------------------------------------------------------------- batch runner
@dataclass
class BatchReport:
    ok: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.ok)} ok, {len(self.failed)} failed"


def run_each(items: Iterable, fn: Callable[[Any], dict | list[dict]], keep_going: bool, label: str,
              key: Callable[[Any], str] = str, total: int | None = None) -> BatchReport:
    """Run ``fn`` per item with a progress bar; stop at the first error unless ``keep_going``.

    ``items`` may be a generator when ``total`` (progress units; a list item counts its length) is given.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    rep = BatchReport()
    err = stderr_console()
    total = len(items) if total is None else total
    show = total > 3 and err.is_terminal
    prog = Progress(TextColumn(f"{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, disable=not show, transient=True)
    with prog:
        task = prog.add_task(label, total=total)
        for it in items:
            try:
                res = fn(it)
                rep.ok += res if isinstance(res, list) else [res]
            except VaepackError as e:
                rep.failed.append({"input": key(it), "error": str(e)})
                if not keep_going:
                    raise
                note(f"error: {e}")
            prog.advance(task, len(it) if isinstance(it, list) else 1)
    return rep



def ran(rt: dict) -> str:
    return "{backend} {dtype}".format(**rt)


def ran_over(rts: list[dict], loaded: dict) -> dict:
    """What ran over a batch (a tiled image runs torch where a runner is loaded): one value per key
    when the items agree, else the distinct values in order, comma-separated; ``loaded`` if none ran."""
    if not rts:
        return loaded
    return {k: ", ".join(dict.fromkeys(r[k] for r in rts)) for k in ("backend", "dtype")}


def finish(rep: BatchReport, as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        emit_json({"ok": rep.ok, "failed": rep.failed, **(extra or {})})
    if rep.failed:
        if len(rep.ok) + len(rep.failed) > 1:
            note(f"{rep.summary()}; failed: " + ", ".join(f["input"] for f in rep.failed))
        raise typer.Exit(1)



# --------------------------------------------------------------------------- shared options
def tile_options(tile_budget: Optional[int], tile_size: int, tile_overlap: int):
    from vaepack.pipeline import TileOptions

    if tile_size < 8 or tile_overlap < 0 or tile_overlap >= tile_size:
        raise UsageError("--tile-size must be >= 8 and --tile-overlap in [0, tile-size)")
    return TileOptions(budget=tile_budget, tile=tile_size, overlap=tile_overlap)


ModelOpt = typer.Option("default", "--model", "-m", help="Model id or alias from weights_manifest.yaml.")
DtypeOpt = typer.Option("fp32", "--dtype", help="fp32, bf16 (autocast + channels_last on CPU) or fp16.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
# encode/decode/roundtrip: --backend auto (the default) takes the fastest installed CPU path that keeps the
# model's round-trip quality (vaepack.runtime.best_cpu_choice: OpenVINO if `vaepack[openvino]` is installed,
# else torch; bf16 only where the manifest does not mark the model bf16_safe: false); torch on CUDA.
RunDtypeOpt = typer.Option(None, "--dtype", help="fp32, bf16 (autocast + channels_last on CPU), fp16 or int8 "
                           "(openvino/onnxruntime); default: the --backend auto choice, else fp32.")
BackendOpt = typer.Option("auto", "--backend", help="auto (default: the fastest installed CPU path at a precision "
                          "that meets the auto policy, vaepack/policy.py), torch, onnxruntime, openvino or tensorrt.")
ForceOpt = typer.Option(False, "--force", help="Overwrite existing outputs.")
KeepOpt = typer.Option(False, "--keep-going", help="Continue past bad inputs and print a summary.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output on stdout.")
TileBudgetOpt = typer.Option(None, "--tile-budget", help="Pixels per pass before tiling (0 = never tile).")
TileSizeOpt = typer.Option(512, "--tile-size", help="Tile edge in image pixels.")
TileOverlapOpt = typer.Option(64, "--tile-overlap", help="Tile overlap in image pixels.")
MaxPixOpt = typer.Option(None, "--max-pixels", help="Refuse larger images (decompression-bomb guard).")


def image_loader(max_pixels: Optional[int]):
    from vaepack.io import load_image

    # uint8 where the file is 8-bit: a quarter of float32, and large images are encoded from it tile by tile
    return lambda p: load_image(p, max_pixels=max_pixels, uint8=True)



def human_size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)



def nan_to_none(o):
    if isinstance(o, float):
        return finite(o)
    if isinstance(o, dict):
        return {k: nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list):
        return [nan_to_none(v) for v in o]
    return o

