"""encode, decode, roundtrip: images <-> latent files through a model, with remap, tiling and backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from vaepack.cli.common import (BackendOpt, DeviceOpt, ForceOpt, JsonOpt, KeepOpt, MaxPixOpt, ModelOpt, RunDtypeOpt,
                                TileBudgetOpt, TileOverlapOpt, TileSizeOpt, finish, finite, image_loader,
                                note, ran, ran_over, run_each, stdout_console, tile_options)
from vaepack.errors import UsageError, VaepackError

PresetOpt = typer.Option(None, "--preset", help="Options saved by `vaepack tune --save-preset NAME` (model, decoder, "
                         "scale, steps, backend, dtype); options given here win.")


def _with_preset(ctx: typer.Context, preset: Optional[str], command: str, **values) -> dict:
    """``values`` with the options the command line left at their defaults filled from ``preset``."""
    from vaepack.presets import apply_preset

    given = {k for k in values
             if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
    return apply_preset(preset, command, values, given)


def encode(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(..., help="Image files, directories or glob patterns."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Output file (one input) or directory (several)."),
    model: str = ModelOpt,
    scale: float = typer.Option(1.0, "--scale", "-s", help="Resolution remap: upsample by this factor before "
                                "encoding (decode undoes it). 1.5 helps distilled students (Chu et al. 2026)."),
    filter: str = typer.Option("bilinear", "--filter", help="Resize filter: bilinear, bicubic, nearest, area."),
    fmt: str = typer.Option("vaepack", "--format", help="vaepack (.latent.safetensors) or comfyui (.latent)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images of equal size per forward pass."),
    dtype: Optional[str] = RunDtypeOpt, device: str = DeviceOpt, backend: str = BackendOpt, force: bool = ForceOpt,
    keep_going: bool = KeepOpt,
    tile_budget: Optional[int] = TileBudgetOpt, tile_size: int = TileSizeOpt, tile_overlap: int = TileOverlapOpt,
    max_pixels: Optional[int] = MaxPixOpt, as_json: bool = JsonOpt, preset: Optional[str] = PresetOpt,
    base_only: bool = typer.Option(False, "--base-only", help="DA-VAE models: write only the base-space latent of "
                                   "the half-size image (= its base model at --scale 0.5 with the DA filter)."),
):
    """Encode images to latent files (records the remap so `decode` restores the original size)."""
    o = _with_preset(ctx, preset, "encode", model=model, scale=scale, backend=backend, dtype=dtype)
    model, scale, backend, dtype = o["model"], o["scale"], o["backend"], o["dtype"]
    from vaepack import latents as L
    from vaepack.io import check_output, expand_inputs, group_by_size, output_paths
    from vaepack.pipeline import FILTERS, base_vae, encode_batch, encode_tiles
    from vaepack.runtime import load_vae

    if fmt not in ("vaepack", "comfyui"):
        raise UsageError(f"unknown --format '{fmt}' (vaepack or comfyui)")
    if filter not in FILTERS:
        raise UsageError(f"unknown --filter '{filter}' (choose {', '.join(FILTERS)})")
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    tiles = tile_options(tile_budget, tile_size, tile_overlap)
    paths = expand_inputs(inputs)
    suffix = ".latent" if fmt == "comfyui" else ".latent.safetensors"
    outs = output_paths(paths, output, suffix)
    if fmt == "comfyui" and not base_only:  # before loading anything
        from vaepack.manifest import get_model

        L.check_comfyui(get_model(model).space)
    vae = load_vae(model, parts=("encoder",), device=device, dtype=dtype, backend=backend)
    if base_only:  # the base encoder inside the DA encoder, at half the scale, with the DA's own filter
        vae, filter = base_vae(vae)
        scale, model = scale / 2, vae.entry.id
    pad_multiple = L.pad_multiple(vae.space, fmt)

    def one_group(group):
        if isinstance(group[0][1], VaepackError):
            raise group[0][1]
        for p, _ in group:
            check_output(outs[p], force)
        recs = encode_batch(vae, [x for _, x in group], scale, filter, tiles, [str(p) for p, _ in group],
                            model_id=model, pad_multiple=pad_multiple)
        res = []
        for (p, _), rec in zip(group, recs):
            L.save_latent(outs[p], rec, fmt=fmt)
            rt = {"backend": rec.backend, "dtype": rec.dtype}  # tiled images run the torch module
            res.append({"input": str(p), "output": str(outs[p]), "latent_shape": list(rec.latent.shape),
                        "orig_size": list(rec.orig_size), "scaled_size": list(rec.scaled_size), **rt})
            if not as_json:
                note(f"{p} -> {outs[p]}  latent {tuple(rec.latent.shape[1:])}  ({ran(rt)})")
        return res

    def alone(x) -> bool:
        return encode_tiles(vae, x.shape[-2], x.shape[-1], scale, tiles, pad_multiple)

    groups = group_by_size(paths, batch_size, image_loader(max_pixels), alone)  # lazy: one group in memory at a time
    rep = run_each(groups, one_group, keep_going, "encode", key=lambda g: str(g[0][0]), total=len(paths))
    finish(rep, as_json, {"model": vae.entry.id, "scale": scale,
                           **ran_over([{k: r[k] for k in ("backend", "dtype")} for r in rep.ok],
                                       vae.runtime("encoder"))})



def _decoder_vae(model: Optional[str], decoder: Optional[str], rec_model: str, device: str, dtype: Optional[str],
                 steps: Optional[int], seed: Optional[int], backend: str = "torch"):
    from vaepack.runtime import load_vae

    vae = load_vae(decoder or model or rec_model, parts=("decoder",), device=device, dtype=dtype, backend=backend)
    vae.set_sampler(steps, seed)
    return vae


def decode(
    ctx: typer.Context,
    latents: list[str] = typer.Argument(..., help="Latent files (.latent.safetensors or ComfyUI .latent)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output image (one input) or directory."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Decoder model (default: the one that "
                                        "wrote the latent)."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="Decoder model of the same latent space, "
                                          "e.g. `eps` for the diffusion decoder."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (diffusion decoders)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Noise seed (diffusion decoders)."),
    native: bool = typer.Option(False, "--native", help="Keep the decoded resolution (no crop/downsample)."),
    dtype: Optional[str] = RunDtypeOpt, device: str = DeviceOpt, backend: str = BackendOpt, force: bool = ForceOpt,
    keep_going: bool = KeepOpt,
    tile_budget: Optional[int] = TileBudgetOpt, tile_size: int = TileSizeOpt, tile_overlap: int = TileOverlapOpt,
    as_json: bool = JsonOpt,
    mismatch_ok: bool = typer.Option(False, "--force-space", help="Decode a latent from another latent "
                                     "space/convention anyway."),
    preset: Optional[str] = PresetOpt,
):
    """Decode latent files to images, restoring the original size by default."""
    o = _with_preset(ctx, preset, "decode", model=model, decoder=decoder, steps=steps, backend=backend, dtype=dtype)
    decoder, steps, backend, dtype = o["decoder"], o["steps"], o["backend"], o["dtype"]
    from vaepack.io import check_output, expand_inputs, output_paths, save_image
    from vaepack.latents import load_latent
    from vaepack.pipeline import decode_image, decode_runtime, is_base_preview

    tiles = tile_options(tile_budget, tile_size, tile_overlap)
    paths = [Path(p) for p in latents] if not any(any(c in p for c in "*?[") for p in latents) else \
        expand_inputs(latents)
    outs = output_paths(paths, output, ".recon.png")
    cache: dict[str, Any] = {}

    def one(p: Path):
        check_output(outs[p], force)
        rec = load_latent(p, default_model=model or decoder)
        key = decoder or model or rec.model
        if key not in cache:
            cache[key] = _decoder_vae(model, decoder, rec.model, device, dtype, steps, seed, backend)
        # 8-bit, strip by strip: a tiled decode never holds the float image
        im = decode_image(cache[key], rec, native=native, tiles=tiles, force=mismatch_ok, path=str(p))
        save_image(outs[p], im, force=force)
        rt = decode_runtime(cache[key], rec, tiles)
        preview = is_base_preview(rec, cache[key])
        if not as_json:
            note(f"{p} -> {outs[p]}  {im.size[0]}x{im.size[1]}  ({ran(rt)})")
            if preview:
                note(f"{p}: a '{rec.space}' latent decoded by the '{cache[key].space.name}' decoder: its base channels "
                     f"only, a half-size preview (decode with '{rec.model}' for the full image)")
        return {"input": str(p), "output": str(outs[p]), "size": list(im.size), **rt,
                **({"preview": "base channels, half size"} if preview else {})}

    rep = run_each(paths, one, keep_going, "decode")
    finish(rep, as_json)


# --------------------------------------------------------------------------- roundtrip
def roundtrip(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(..., help="Image files, directories or glob patterns."),
    model: str = ModelOpt,
    decoder: Optional[str] = typer.Option(None, "--decoder", help="Decoder model (default: --model's)."),
    scale: float = typer.Option(1.0, "--scale", "-s", help="Resolution remap factor (see encode)."),
    filter: str = typer.Option("bilinear", "--filter"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (diffusion decoders)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Noise seed (diffusion decoders)."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Write a side-by-side image (original | "
                                           "reconstruction); a directory when there are several inputs."),
    save: Optional[Path] = typer.Option(None, "--save", help="Write reconstructions (file or directory)."),
    dtype: Optional[str] = RunDtypeOpt, device: str = DeviceOpt, backend: str = BackendOpt, force: bool = ForceOpt,
    keep_going: bool = KeepOpt,
    tile_budget: Optional[int] = TileBudgetOpt, tile_size: int = TileSizeOpt, tile_overlap: int = TileOverlapOpt,
    max_pixels: Optional[int] = MaxPixOpt, as_json: bool = JsonOpt, preset: Optional[str] = PresetOpt,
):
    """Encode + decode and report PSNR, MSE, SSIM, MS-SSIM and the perceptual HaarPSI/GMSD against the input."""
    o = _with_preset(ctx, preset, "roundtrip", model=model, decoder=decoder, scale=scale, steps=steps, backend=backend,
                     dtype=dtype)
    model, decoder, scale, steps, backend, dtype = (o[k] for k in ("model", "decoder", "scale", "steps", "backend",
                                                                   "dtype"))
    from vaepack.io import check_output, expand_inputs, image_float, output_paths, save_image
    from vaepack.metrics import image_metrics, mean_of_rows, unavailable_metrics
    from vaepack.perceptual import perceptual_metrics
    from vaepack.pipeline import decode_record, decode_runtime, encode_tensor, other_detail_writer
    from vaepack.plots import save_compare
    from vaepack.runtime import load_vae

    tiles = tile_options(tile_budget, tile_size, tile_overlap)
    paths = expand_inputs(inputs)
    cmp_outs = output_paths(paths, compare, ".compare.png") if compare else {}
    rec_outs = output_paths(paths, save, ".recon.png") if save else {}
    from vaepack.manifest import get_model

    e_entry, d_entry = get_model(model), get_model(decoder or model)
    if e_entry.space.base and d_entry.space.name != e_entry.space.name:  # before loading anything
        raise UsageError(f"'{d_entry.id}' decodes only the base channels of '{e_entry.id}' latents (a half-size "
                         "preview), which cannot be compared with the input",
                         hint=f"use `vaepack encode --model {model}` + `vaepack decode --decoder {d_entry.id}` for a preview")
    if other_detail_writer(model, d_entry):
        raise UsageError(f"'{d_entry.id}' cannot read the detail channels of '{e_entry.id}' latents (each model of "
                         f"the '{e_entry.space.name}' space has its own)", hint="drop --decoder, or pick the same model")
    enc = load_vae(model, parts=("encoder",), device=device, dtype=dtype, backend=backend)
    dec = _decoder_vae(None, decoder or model, model, device, dtype, steps, seed, backend)
    load = image_loader(max_pixels)
    unlabeled: list[str] = []  # say once that --compare images are unlabeled without matplotlib

    def one(p: Path):
        for o in (cmp_outs.get(p), rec_outs.get(p)):
            if o is not None:
                check_output(o, force)
        x8 = load(p)  # uint8: a tiled encode reads it tile by tile
        rec = encode_tensor(enc, x8, scale, filter, tiles, str(p), model_id=model)
        y = decode_record(dec, rec, tiles=tiles, path=str(p))
        x = image_float(x8)  # the metrics compare whole float images
        rt = {"encoder": {"backend": rec.backend, "dtype": rec.dtype}, "decoder": decode_runtime(dec, rec, tiles)}
        m = image_metrics(y, x)  # SSIM/MS-SSIM are left out of images under 11x11 px, with the reason:
        gaps = unavailable_metrics(x.shape[-2], x.shape[-1])
        m.update(perceptual_metrics(y, x))  # HaarPSI/GMSD: defined at every size
        why = save_compare(cmp_outs[p], x, y, m["psnr"], force=force) if p in cmp_outs else None
        if why and not unlabeled:
            unlabeled.append(why)
            note(f"--compare images are unlabeled: {why}")
        if p in rec_outs:
            save_image(rec_outs[p], y, force=force)
        return {"input": str(p), "size": [x.shape[-1], x.shape[-2]], **{k: finite(float(v)) for k, v in m.items()},
                **({"unavailable": gaps} if gaps else {}), "runtime": rt}

    rep = run_each(paths, one, keep_going, "roundtrip")
    mean = mean_of_rows(rep.ok, keys=("psnr", "mse", "ssim", "ms_ssim", "haarpsi", "gmsd"))
    if not as_json and rep.ok:
        from rich.table import Table

        runs = sorted({ran(r["runtime"][part]) for r in rep.ok for part in ("encoder", "decoder")})
        t = Table(title=f"{enc.entry.id} -> {dec.entry.id}, scale {scale:g} ({', '.join(runs)})")
        t.add_column("image")
        for k in ("PSNR dB", "MSE x1e-4", "SSIM", "MS-SSIM", "HaarPSI", "GMSD"):
            t.add_column(k, justify="right")

        def fmt(r):
            def f(k, d=2, mul=1.0):
                return "-" if k not in r else "inf" if r[k] is None else f"{r[k] * mul:.{d}f}"
            return [f("psnr"), f("mse", 2, 1e4), f("ssim", 4), f("ms_ssim", 4), f("haarpsi", 4), f("gmsd", 4)]
        for r in rep.ok:
            t.add_row(Path(r["input"]).name, *fmt(r))
            for reason in r.get("unavailable", {}).values():
                note(f"{r['input']}: {reason}")
        if len(rep.ok) > 1:
            t.add_row("mean", *fmt(mean))
        stdout_console().print(t)
    finish(rep, as_json, {"encoder": enc.entry.id, "decoder": dec.entry.id, "scale": scale, "mean": mean,
                           "runtime": {part: ran_over([r["runtime"][part] for r in rep.ok], v.runtime(part))
                                       for part, v in (("encoder", enc), ("decoder", dec))}})

