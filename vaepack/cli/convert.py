"""``vaepack convert``: latent files of one VAE space -> another (pixel path or a shipped Bridge)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vaepack.cli.common import (BackendOpt, DeviceOpt, ForceOpt, JsonOpt, KeepOpt, RunDtypeOpt, TileBudgetOpt,
                                TileOverlapOpt, TileSizeOpt, finish, note, ran, run_each, tile_options)
from vaepack.errors import UsageError

LATENT_SUFFIXES = (".latent.safetensors", ".latent", ".safetensors")


def latent_inputs(items: list[str]) -> list[Path]:
    """Files as given (a missing one fails on its own, so --keep-going can skip it), glob patterns, and
    directories (their latent files, sorted)."""
    from vaepack.io import expand_inputs

    return expand_inputs(items, lambda d: sorted(q for q in d.iterdir() if q.is_file() and q.name.endswith(LATENT_SUFFIXES)),
                         "latent files")


def convert(
    latents: list[str] = typer.Argument(..., help="Latent files (.latent.safetensors or ComfyUI .latent), "
                                        "directories or glob patterns."),
    to: str = typer.Option(..., "--to", help="Target model: its encoder's latent space is written."),
    output: Path = typer.Option(..., "--output", "-o", help="Output file (one input) or directory."),
    via: str = typer.Option("auto", "--via", help="pixel (decode, re-encode), bridge (a shipped Bridge), or auto "
                            "(a bridge when the manifest has one for the pair, else pixel)."),
    bridge: Optional[str] = typer.Option(None, "--bridge", help="Bridge id from weights_manifest.yaml."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Source model for bare latents without "
                                        "vaepack metadata (and the pixel path's decoder, of the file's space)."),
    dtype: Optional[str] = RunDtypeOpt, device: str = DeviceOpt, backend: str = BackendOpt, force: bool = ForceOpt,
    keep_going: bool = KeepOpt,
    tile_budget: Optional[int] = TileBudgetOpt, tile_size: int = TileSizeOpt, tile_overlap: int = TileOverlapOpt,
    as_json: bool = JsonOpt,
):
    """Convert latent files into another model's latent space (the output records source and path taken)."""
    from vaepack.convert import Converter
    from vaepack.io import check_output, output_paths
    from vaepack.latents import load_latent, save_latent

    tiles = tile_options(tile_budget, tile_size, tile_overlap)
    paths = latent_inputs(latents)
    outs = output_paths(paths, output, ".latent.safetensors")
    conv = Converter(to, via=via, bridge=bridge, model=model, backend=backend, dtype=dtype, device=device, tiles=tiles)

    def one(p: Path):
        if outs[p].resolve() == p.resolve():
            raise UsageError(f"{p}: the output would overwrite the input", hint="use another -o")
        check_output(outs[p], force)
        rec = conv.convert(load_latent(p, default_model=model), p)
        save_latent(outs[p], rec)  # atomic: a failed conversion leaves no file
        pv = rec.provenance
        row = {"input": str(p), "output": str(outs[p]), "via": pv["via"], "bridge": pv.get("bridge"),
               "source_model": pv["source_model"], "target_model": rec.model, "latent_shape": list(rec.latent.shape),
               "backend": rec.backend, "dtype": rec.dtype}
        if not as_json:
            how = f"bridge {row['bridge']}" if row["bridge"] else "pixel"
            note(f"{p} -> {outs[p]}  {row['source_model']} -> {rec.model} via {how}  latent "
                 f"{tuple(rec.latent.shape[1:])}  ({ran(row)})")
        return row

    rep = run_each(paths, one, keep_going, "convert")
    finish(rep, as_json, {"to": conv.target.id})
