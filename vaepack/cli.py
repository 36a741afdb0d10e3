"""The ``vaepack`` command: a thin shell over the library.

Each command parses options, calls the library and prints. A VaepackError becomes one line on
stderr and its exit code (1, or 2 for usage errors); nothing else is caught, so a real bug keeps its
traceback. ``--json`` prints machine-readable output on stdout.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer

from vaepack.errors import UsageError, VaepackError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fast, honest image VAEs: encode, decode, distill, export, benchmark.")
weights_app = typer.Typer(no_args_is_help=True, help="List, pull, verify and locate model weights.")
app.add_typer(weights_app, name="weights")


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout():
    from rich.console import Console

    c = Console(highlight=False)
    if not c.is_terminal:  # piped/logged: don't squeeze tables into 80 columns
        c = Console(highlight=False, width=160)
    return c


def _note(msg: str) -> None:
    """A plain progress line on stderr (no wrapping, so logs stay greppable)."""
    print(msg, file=sys.stderr)


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, float):
        return None
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _finite(v: float) -> float | None:
    """JSON has no Infinity: identical images (PSNR = inf) are written as null."""
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def _csv(s: str | None, conv: Callable = str) -> list:
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


def _run_each(items: Iterable, fn: Callable[[Any], dict | list[dict]], keep_going: bool, label: str,
              key: Callable[[Any], str] = str, total: int | None = None) -> BatchReport:
    """Run ``fn`` per item with a progress bar; stop at the first error unless ``keep_going``.

    ``items`` may be a generator when ``total`` (progress units; a list item counts its length) is given.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    rep = BatchReport()
    err = _stderr()
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
                _note(f"error: {e}")
            prog.advance(task, len(it) if isinstance(it, list) else 1)
    return rep


def _runtime(vae, part: str) -> dict:
    """Which backend and precision actually ran a part (--backend auto decides per model)."""
    return {"backend": vae.parts[part].backend, "dtype": vae.precision(part)}


def _ran(vae, part: str) -> str:
    return "{backend} {dtype}".format(**_runtime(vae, part))


def _finish(rep: BatchReport, as_json: bool, extra: dict | None = None) -> None:
    if as_json:
        _emit_json({"ok": rep.ok, "failed": rep.failed, **(extra or {})})
    if rep.failed:
        if len(rep.ok) + len(rep.failed) > 1:
            _note(f"{rep.summary()}; failed: " + ", ".join(f["input"] for f in rep.failed))
        raise typer.Exit(1)


def _group_by_size(paths: list[Path], batch_size: int, load: Callable[[Path], Any]):
    """Yield lists of (path, image) with equal sizes, at most ``batch_size`` long, in input order.

    A path that fails to load is yielded alone as (path, error) so the caller reports it per file.
    """
    group: list = []
    for p in paths:
        try:
            x = load(p)
        except VaepackError as e:
            if group:
                yield group
                group = []
            yield [(p, e)]
            continue
        if group and (len(group) >= batch_size or group[0][1].shape != x.shape):
            yield group
            group = []
        group.append((p, x))
    if group:
        yield group


# --------------------------------------------------------------------------- shared options
def _tiles(tile_budget: Optional[int], tile_size: int, tile_overlap: int):
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
BackendOpt = typer.Option("auto", "--backend", help="auto (default: the fastest installed CPU path within 0.1 dB "
                          "of fp32), torch, onnxruntime, openvino or tensorrt.")
ForceOpt = typer.Option(False, "--force", help="Overwrite existing outputs.")
KeepOpt = typer.Option(False, "--keep-going", help="Continue past bad inputs and print a summary.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output on stdout.")
TileBudgetOpt = typer.Option(None, "--tile-budget", help="Pixels per pass before tiling (0 = never tile).")
TileSizeOpt = typer.Option(512, "--tile-size", help="Tile edge in image pixels.")
TileOverlapOpt = typer.Option(64, "--tile-overlap", help="Tile overlap in image pixels.")
MaxPixOpt = typer.Option(None, "--max-pixels", help="Refuse larger images (decompression-bomb guard).")


def _loader(max_pixels: Optional[int]):
    from vaepack.io import load_image

    return lambda p: load_image(p, max_pixels=max_pixels)


# --------------------------------------------------------------------------- encode
@app.command()
def encode(
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
    max_pixels: Optional[int] = MaxPixOpt, as_json: bool = JsonOpt,
):
    """Encode images to latent files (records the remap so `decode` restores the original size)."""
    from vaepack import latents as L
    from vaepack.io import expand_inputs
    from vaepack.pipeline import FILTERS, encode_batch
    from vaepack.vae import load_vae

    if fmt not in ("vaepack", "comfyui"):
        raise UsageError(f"unknown --format '{fmt}' (vaepack or comfyui)")
    if filter not in FILTERS:
        raise UsageError(f"unknown --filter '{filter}' (choose {', '.join(FILTERS)})")
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    tiles = _tiles(tile_budget, tile_size, tile_overlap)
    paths = expand_inputs(inputs)
    suffix = ".latent" if fmt == "comfyui" else ".latent.safetensors"
    outs = _output_paths(paths, output, suffix)
    vae = load_vae(model, parts=("encoder",), device=device, dtype=dtype, backend=backend)
    # ComfyUI keeps FLUX.2 latents 2x2-packed: pad so that the latent size is even.
    pad_multiple = 2 * vae.factor if fmt == "comfyui" and vae.space.norm == "flux2_bn" else None

    def one_group(group):
        if isinstance(group[0][1], VaepackError):
            raise group[0][1]
        for p, _ in group:
            from vaepack.io import check_output

            check_output(outs[p], force)
        recs = encode_batch(vae, [x for _, x in group], scale, filter, tiles, [str(p) for p, _ in group],
                            model_id=model, pad_multiple=pad_multiple)
        res = []
        for (p, _), rec in zip(group, recs):
            L.save_latent(outs[p], rec, fmt=fmt)
            res.append({"input": str(p), "output": str(outs[p]), "latent_shape": list(rec.latent.shape),
                        "orig_size": list(rec.orig_size), "scaled_size": list(rec.scaled_size)})
            if not as_json:
                _note(f"{p} -> {outs[p]}  latent {tuple(rec.latent.shape[1:])}  ({_ran(vae, 'encoder')})")
        return res

    groups = _group_by_size(paths, batch_size, _loader(max_pixels))  # lazy: one group in memory at a time
    rep = _run_each(groups, one_group, keep_going, "encode", key=lambda g: str(g[0][0]), total=len(paths))
    _finish(rep, as_json, {"model": vae.entry.id, "scale": scale, **_runtime(vae, "encoder")})


def _output_paths(paths: list[Path], output: Optional[Path], suffix: str) -> dict[Path, Path]:
    """One input + -o FILE -> that file; several inputs -> -o is a directory (default: beside inputs)."""
    def name(p: Path) -> str:
        stem = p.name
        for s in (".latent.safetensors", ".safetensors", ".latent"):
            if stem.endswith(s):
                stem = stem[: -len(s)]
                break
        else:
            stem = p.stem
        return stem + suffix

    if output is not None and len(paths) == 1 and not output.is_dir():
        return {paths[0]: output}
    if output is not None and output.exists() and not output.is_dir():
        raise UsageError(f"{output}: -o must be a directory when there are several inputs")
    outs = {p: (output / name(p) if output is not None else p.with_name(name(p))) for p in paths}
    if len(set(outs.values())) != len(outs):
        raise UsageError("several inputs map to the same output name; give them distinct names")
    return outs


# --------------------------------------------------------------------------- decode
def _decoder_vae(model: Optional[str], decoder: Optional[str], rec_model: str, device: str, dtype: Optional[str],
                 steps: Optional[int], seed: Optional[int], backend: str = "torch"):
    from vaepack.vae import load_vae

    name = decoder or model or rec_model
    vae = load_vae(name, parts=("decoder",), device=device, dtype=dtype, backend=backend)
    mod = vae.parts["decoder"].module
    if steps is not None or seed is not None:
        if not vae.sampling:
            raise UsageError(f"--steps/--seed apply to diffusion decoders; '{vae.entry.id}' is deterministic")
        if steps is not None:
            if steps < 1:
                raise UsageError("--steps must be >= 1")
            mod.steps = steps
        if seed is not None:
            mod.seed = seed
    return vae


@app.command()
def decode(
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
):
    """Decode latent files to images, restoring the original size by default."""
    from vaepack.io import check_output, expand_inputs, save_image
    from vaepack.latents import load_latent
    from vaepack.pipeline import decode_record

    tiles = _tiles(tile_budget, tile_size, tile_overlap)
    paths = [Path(p) for p in latents] if not any(any(c in p for c in "*?[") for p in latents) else \
        expand_inputs(latents)
    outs = _output_paths(paths, output, ".recon.png")
    cache: dict[str, Any] = {}

    def one(p: Path):
        check_output(outs[p], force)
        rec = load_latent(p, default_model=model or decoder)
        key = decoder or model or rec.model
        if key not in cache:
            cache[key] = _decoder_vae(model, decoder, rec.model, device, dtype, steps, seed, backend)
        y = decode_record(cache[key], rec, native=native, tiles=tiles, force=mismatch_ok, path=str(p))
        save_image(outs[p], y, force=force)
        if not as_json:
            _note(f"{p} -> {outs[p]}  {y.shape[-1]}x{y.shape[-2]}  ({_ran(cache[key], 'decoder')})")
        return {"input": str(p), "output": str(outs[p]), "size": [y.shape[-1], y.shape[-2]],
                **_runtime(cache[key], "decoder")}

    rep = _run_each(paths, one, keep_going, "decode")
    _finish(rep, as_json)


# --------------------------------------------------------------------------- roundtrip
@app.command()
def roundtrip(
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
    max_pixels: Optional[int] = MaxPixOpt, as_json: bool = JsonOpt,
):
    """Encode + decode and report PSNR, MSE, SSIM and MS-SSIM against the input."""
    import torch

    from vaepack.io import check_output, expand_inputs, save_image
    from vaepack.metrics import image_metrics
    from vaepack.pipeline import decode_record, encode_tensor
    from vaepack.vae import load_vae

    tiles = _tiles(tile_budget, tile_size, tile_overlap)
    paths = expand_inputs(inputs)
    cmp_outs = _output_paths(paths, compare, ".compare.png") if compare else {}
    rec_outs = _output_paths(paths, save, ".recon.png") if save else {}
    enc = load_vae(model, parts=("encoder",), device=device, dtype=dtype, backend=backend)
    dec = _decoder_vae(None, decoder or model, model, device, dtype, steps, seed, backend)
    load = _loader(max_pixels)

    def one(p: Path):
        for o in (cmp_outs.get(p), rec_outs.get(p)):
            if o is not None:
                check_output(o, force)
        x = load(p)
        rec = encode_tensor(enc, x, scale, filter, tiles, str(p), model_id=model)
        y = decode_record(dec, rec, tiles=tiles, path=str(p))
        m = image_metrics(y, x)
        if p in cmp_outs:
            save_image(cmp_outs[p], torch.cat([x, y], dim=-1), force=force)
        if p in rec_outs:
            save_image(rec_outs[p], y, force=force)
        return {"input": str(p), "size": [x.shape[-1], x.shape[-2]], **{k: _finite(float(v)) for k, v in m.items()}}

    rep = _run_each(paths, one, keep_going, "roundtrip")
    keys = ("psnr", "mse", "ssim", "ms_ssim")
    mean = {k: (sum(r[k] for r in rep.ok if r[k] is not None) / max(1, sum(r[k] is not None for r in rep.ok)))
            for k in keys} if rep.ok else {}
    if not as_json and rep.ok:
        from rich.table import Table

        ran = sorted({_ran(enc, "encoder"), _ran(dec, "decoder")})
        t = Table(title=f"{enc.entry.id} -> {dec.entry.id}, scale {scale:g} ({', '.join(ran)})")
        t.add_column("image")
        for k in ("PSNR dB", "MSE x1e-4", "SSIM", "MS-SSIM"):
            t.add_column(k, justify="right")

        def fmt(r):
            def f(v, d=2, mul=1.0):
                return "inf" if v is None else f"{v * mul:.{d}f}"
            return [f(r["psnr"]), f(r["mse"], 2, 1e4), f(r["ssim"], 4), f(r["ms_ssim"], 4)]
        for r in rep.ok:
            t.add_row(Path(r["input"]).name, *fmt(r))
        if len(rep.ok) > 1:
            t.add_row("mean", *fmt(mean))
        _stdout().print(t)
    _finish(rep, as_json, {"encoder": enc.entry.id, "decoder": dec.entry.id, "scale": scale, "mean": mean,
                           "runtime": {"encoder": _runtime(enc, "encoder"), "decoder": _runtime(dec, "decoder")}})


# --------------------------------------------------------------------------- weights
def _human(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@weights_app.command("list")
def weights_list(as_json: bool = JsonOpt):
    """Every model in weights_manifest.yaml, cached or not."""
    from vaepack import weights as W
    from vaepack.manifest import load_manifest

    man = load_manifest()
    rows = []
    for mid, e in man.models.items():
        st = W.status(e)
        size = sum(s.spec.size or 0 for s in st) if all(s.spec.size for s in st) else None
        rows.append({"id": mid, "aliases": list(e.aliases), "space": e.space.name, "parts": list(e.parts),
                     "families": sorted({p.family for p in e.parts.values()}), "license": e.license,
                     "size": size, "embedded": e.embedded,
                     "status": "embedded" if e.embedded else ("cached" if all(s.present for s in st) else
                                                              "partial" if any(s.present for s in st) else
                                                              "not cached"),
                     "description": e.description})
    if as_json:
        _emit_json({"manifest": str(man.path), "cache": str(W.weights_dir()), "models": rows})
        return
    from rich.table import Table

    t = Table(title=f"models ({man.path.name}); cache: {W.weights_dir()}")
    for c in ("id", "space", "parts", "family", "size", "status", "license"):
        t.add_column(c)
    for r in rows:
        ident = r["id"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else "")
        t.add_row(ident, r["space"], "+".join(r["parts"]), "+".join(r["families"]), _human(r["size"]),
                  r["status"], r["license"])
    _stdout().print(t)


@weights_app.command("pull")
def weights_pull(
    model: str = typer.Argument(..., help="Model id or alias."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
    clear_partial: bool = typer.Option(False, "--clear-partial", help="Delete partial downloads first "
                                       "instead of resuming them."),
    as_json: bool = JsonOpt,
):
    """Download a model's files (mirror first: VAEPACK_MIRROR), verify sha256, cache them."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from vaepack import weights as W
    from vaepack.manifest import get_model

    e = get_model(model)
    if clear_partial:
        W.clear_partial(e)
    err = _stderr()
    out = []
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err, disable=not err.is_terminal, transient=True) as prog:
        for f in W.model_files(e):
            task = prog.add_task(f.name, total=f.size)
            path = W.pull_file(f, progress=lambda d, t: prog.update(task, completed=d, total=t), force=force)
            out.append({"file": f.name, "path": str(path), "sha256": W.expected_sha256(f)})
            if not as_json:
                _note(f"{f.name}: ok ({path})")
    if as_json:
        _emit_json({"model": e.id, "files": out})


@weights_app.command("verify")
def weights_verify(model: Optional[str] = typer.Argument(None, help="Model id (default: every cached model)."),
                   as_json: bool = JsonOpt):
    """Re-hash cached files against the manifest; a mismatch is an error."""
    from vaepack import weights as W
    from vaepack.errors import WeightsError
    from vaepack.manifest import get_model, load_manifest

    entries = [get_model(model)] if model else list(load_manifest().models.values())
    results, bad = [], 0
    for e in entries:
        for s in W.status(e):
            if not s.present:
                if model:
                    results.append({"model": e.id, "file": s.spec.name, "status": "missing"})
                    bad += 1
                continue
            try:
                W.verify_file(s.spec, s.path)
                results.append({"model": e.id, "file": s.spec.name, "status": "ok"})
            except WeightsError as ex:
                results.append({"model": e.id, "file": s.spec.name, "status": "bad", "error": str(ex)})
                bad += 1
    if as_json:
        _emit_json({"files": results})
    else:
        for r in results:
            _note(f"{r['model']}/{r['file']}: {r['status']}" + (f" - {r['error']}" if "error" in r else ""))
        if not results:
            _note("nothing cached to verify")
    if bad:
        raise typer.Exit(1)


@weights_app.command("path")
def weights_path(model: str = typer.Argument(...), part: Optional[str] = typer.Option(None, "--part")):
    """Print the local path of a model's files (pulls nothing; exit 1 if missing)."""
    from vaepack import weights as W
    from vaepack.manifest import get_model

    e = get_model(model)
    parts = [e.part(part).part] if part else None  # an unknown --part is a usage error (exit 2)
    missing = False
    for f in W.model_files(e, parts):  # a file shared by encoder and decoder is listed once
        path = W.file_path(f)
        print(path)
        missing |= not path.is_file()
    if missing:
        _note(f"some files of '{e.id}' are not cached; run `vaepack weights pull {e.id}`")
        raise typer.Exit(1)


# --------------------------------------------------------------------------- training
def _train_progress(label: str):
    """A rich progress line (loss, steps/s) for the training loops; returns (context, callback)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = _stderr()
    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), console=err, disable=not err.is_terminal)
    task = prog.add_task(label, total=None, info="")

    def cb(d: dict):
        if d.get("phase") == "teacher":
            prog.update(task, completed=d["step"], total=d["total"], info="caching teacher outputs")
        else:
            prog.update(task, completed=d["step"], total=d.get("total"),
                        info=f"loss {d.get('loss', float('nan')):.4f}  {d.get('steps_per_s', 0):.2f} steps/s")
    return prog, cb


def _check_resume(out: Path, resume: bool) -> None:
    if (out / "checkpoint.pt").exists() and not resume:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")


@app.command()
def distill(
    teacher: str = typer.Option("taef2", "--teacher", help="Teacher model id (any encoder in the zoo)."),
    data: Path = typer.Option(..., "--data", help="Folder of training images (never the evaluation set)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoint, teacher cache, log, exported weights."),
    part: str = typer.Option("encoder", "--part", help="encoder (paper 000 student) or decoder (small TAE "
                             "decoder distilled from the teacher's decoder + a pixel loss)."),
    family: str = typer.Option("student", "--family", help="Encoder: student (paper 000, section III-B) or tae "
                               "(a TAE encoder, e.g. the teacher depth-pruned: --config '{\"blocks\": [0,2,3,3], \"stem\": \"s2d\"}')."),
    width: int = typer.Option(32, "--width", help="Student width (channels after the stem)."),
    config: str = typer.Option("{}", "--config", help="JSON: more StudentConfig / TAEConfig fields."),
    schedule: str = typer.Option("128:10000,256:10000", "--schedule", help="CROP:STEPS stages (paper: 128 then 256)."),
    batch: int = typer.Option(64, "--batch"),
    lr: float = typer.Option(7.5e-4, "--lr", help="Adam learning rate (paper: 7.5e-4)."),
    pixel_weight: float = typer.Option(1.0, "--pixel-weight", help="Decoder: weight of the L1 loss to the image."),
    init_from_teacher: bool = typer.Option(True, "--init-from-teacher/--random-init",
                                           help="TAE students (decoders, --family tae encoders): warm start from the "
                                           "teacher (fewer blocks: its first blocks per stage; narrower: its strongest channels)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop cleanly after N minutes."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Total wall-clock budget over "
                                                    "all resumed sessions; LR decay and stages follow it."),
    ckpt_every: int = typer.Option(200, "--ckpt-every"),
    seed: int = typer.Option(0, "--seed"),
    device: str = DeviceOpt,
    threads: Optional[int] = typer.Option(None, "--threads"),
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="CPU: bf16 autocast + channels_last."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Reuse another run's teacher_cache.pt."),
    init: Optional[Path] = typer.Option(None, "--init", help="Warm start from a .safetensors of the same "
                                        "architecture; a shipped BatchNorm-folded student gets its BatchNorms back from data statistics)."),
    views_per_image: int = typer.Option(1, "--views-per-image", min=1, help="Teacher-cached random windows per image."),
):
    """Distill a compact encoder (Chu et al. 2026: Huber beta 0.15, Adam 7.5e-4, 128 then 256 px) or decoder."""
    import shlex

    from vaepack import distill as D
    from vaepack.loader import make_config
    from vaepack.vae import TeacherDecoder, TeacherEncoder, load_vae

    if part not in ("encoder", "decoder"):
        raise UsageError(f"--part must be encoder or decoder, got '{part}'")
    sched = D._parse_schedule(schedule)
    try:
        extra = json.loads(config)
        assert isinstance(extra, dict)
    except (ValueError, AssertionError):
        raise UsageError(f"--config must be a JSON object, got {config!r}") from None
    D.list_images(data)  # bad --data fails before any model loads
    _check_resume(out, resume)
    tvae = load_vae(teacher, parts=("encoder", "decoder") if part == "decoder" else ("encoder",), device=device)
    if family not in ("student", "tae") or (family != "student" and part == "decoder"):
        raise UsageError(f"--family must be student or tae (encoders only), got '{family}'")
    warm = init_from_teacher and init is None and (part == "decoder" or family == "tae")
    if warm and tvae.entry.part(part).family != "tae":
        raise UsageError(f"--init-from-teacher needs a TAE-family teacher {part}; '{tvae.entry.id}' is "
                         f"'{tvae.entry.part(part).family}' (use --random-init)")
    tenc = TeacherEncoder(tvae, sample=True, seed=seed)
    tcfg = make_config(tvae.entry.part(part), tvae.entry.id) if warm else None  # the manifest states it
    cmd = "vaepack " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    common = dict(schedule=sched, batch=batch, lr=lr, max_minutes=max_minutes, ckpt_every=ckpt_every, seed=seed,
                  device=device, bf16=bf16, threads=threads, teacher_id=tvae.entry.id, command=cmd,
                  budget_minutes=budget_minutes, cache=cache, init=init, views_per_image=views_per_image)
    prog, cb = _train_progress(f"distill {part}")
    with prog:
        if part == "encoder":
            path = D.run_distill(tenc, data, out, width=width, student_config=extra, progress=cb, family=family,
                                 init_from_teacher=warm, teacher_config=tcfg, **common)
        else:
            path = D.run_distill_decoder(tenc, TeacherDecoder(tvae), data, out, width=width, decoder_config=extra,
                                         pixel_weight=pixel_weight, init_from_teacher=warm, teacher_config=tcfg,
                                         progress=cb, **common)
    if path.name == "checkpoint.pt":
        _note(f"stopped before the schedule ended; checkpoint {path} (rerun with --resume to continue); "
              f"`vaepack distill-export {out} -o FILE` exports it as it is")
    else:
        _note(f"done: {path}")


@app.command("distill-export")
def distill_export(
    run_dir: Path = typer.Argument(..., help="A `vaepack distill` run folder (holds checkpoint.pt)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .safetensors file."),
    raw: bool = typer.Option(False, "--raw", help="Export the raw student weights instead of their EMA."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher id for the metadata when the "
                                          "checkpoint does not record it (else 'unknown')."),
    data: Optional[str] = typer.Option(None, "--data", help="Training data folder for the metadata when the "
                                       "checkpoint does not record it."),
    force: bool = ForceOpt, as_json: bool = JsonOpt,
):
    """Export a distill run's current checkpoint (finished or not) as fp16 safetensors with provenance.

    Encoders are written BatchNorm-folded, like a finished run's own export.
    """
    import shlex

    from vaepack import distill as D
    from vaepack.io import check_output

    if output.is_dir():
        raise UsageError(f"{output}: -o must be a file, not a folder")
    check_output(output, force)
    cmd = "vaepack " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    info = D.export_checkpoint(run_dir, output, teacher_id=teacher, data_dir=data, command=cmd, use_ema=not raw)
    for key, given in info.pop("ignored").items():
        _note(f"warning: --{key.replace('_dir', '')} {given} ignored: the checkpoint records {info[key]}")
    res = {"run_dir": str(run_dir), **info, "weights": "student" if raw else "ema"}
    if as_json:
        _emit_json(res)
    else:
        _note(f"{run_dir} -> {info['output']}  ({info['part']}, {'raw' if raw else 'EMA'} weights at step {info['step']}"
              f"{'' if info['finished'] else ', run not finished'})")


@app.command("train-eps")
def train_eps(
    encoder: str = typer.Option("taef2", "--encoder", help="Frozen encoder whose latents the decoder learns."),
    data: Path = typer.Option(..., "--data", help="Folder of training images."),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoint, log, exported EMA weights)."),
    steps: int = typer.Option(2000, "--steps"),
    batch: int = typer.Option(8, "--batch"),
    crop: int = typer.Option(128, "--crop"),
    lr: float = typer.Option(5e-4, "--lr"),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the exported weights."),
    w_vel: float = typer.Option(1.0, "--w-vel", help="Velocity MSE weight."),
    w_perc: float = typer.Option(0.5, "--w-perc", help="Perceptual weight (LPIPS, or MS-SSIM + L1 without "
                                 "LPIPS weights; paper 0.5)."),
    w_adv: float = typer.Option(0.5, "--w-adv", help="Adversarial trajectory matching weight (paper 0.5)."),
    perceptual: str = typer.Option("auto", "--perceptual", help="auto, lpips or msssim_l1."),
    t_grid_frac: float = typer.Option(0.5, "--t-grid-frac", help="Share of t drawn on the sampler's grid "
                                      "(0 = the paper's logit-normal only)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes"),
    seed: int = typer.Option(0, "--seed"),
    device: str = DeviceOpt,
    cache: Optional[Path] = typer.Option(None, "--cache", help="Latent/reconstruction cache file to reuse."),
):
    """Train the eps-VAE diffusion decoder (Zhao et al.): rectified flow, gamma-scaled x_t, few-step Euler."""
    import shlex

    from vaepack.train_eps import run_train_eps

    _check_resume(out, resume)
    cmd = "vaepack " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    # run_train_eps reports progress as log lines (step, losses, steps/s): print them as they come.
    res = run_train_eps(encoder, data, out, steps=steps, batch=batch, crop=crop, lr=lr, ema=ema, resume=resume,
                        max_minutes=max_minutes, seed=seed, device=None if device == "auto" else device,
                        progress=_note, w_vel=w_vel, w_perc=w_perc, w_adv=w_adv, perceptual=perceptual,
                        t_grid_frac=t_grid_frac, cache_path=cache, command=cmd)
    _note(json.dumps(res, default=str))


# --------------------------------------------------------------------------- paper measurements
@app.command()
def sweep(
    inputs: list[str] = typer.Argument(..., help="Images, directories or globs."),
    model: str = ModelOpt,
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Also sweep this model (e.g. taef2)."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="Decode every model with this decoder."),
    scales: str = typer.Option("0.5,1,1.5,2,3,4", "--scales"),
    filter: str = typer.Option("bilinear", "--filter"),
    crop: Optional[int] = typer.Option(None, "--crop", help="Measure the centered N px window of each image "
                                       "(large scales of whole images cost minutes per image on a CPU)."),
    dtype: str = DtypeOpt, device: str = DeviceOpt, as_json: bool = JsonOpt,
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="PSNR vs scale PNG (the paper's Fig. 3)."),
):
    """Quality vs input scale per model, mean ± std over images (Chu et al. 2026, Table I)."""
    from vaepack import analysis as A

    models = [model] + ([teacher] if teacher else [])
    res = A.sweep(inputs, models, _csv(scales, float), decoder=decoder, device=device, dtype=dtype, filter=filter,
                  progress=_note, crop=crop)  # stderr, so --json on stdout stays clean
    if plot_out:
        A.plot_sweep(res, plot_out)
    if as_json:
        _emit_json(_nan_to_none(res))
    else:
        print(A.sweep_markdown(res))


@app.command("latent-stats")
def latent_stats(
    inputs: list[str] = typer.Argument(..., help="Images, directories or globs."),
    model: str = ModelOpt,
    teacher: str = typer.Option("taef2", "--teacher"),
    sizes: str = typer.Option("64,128,256,384,512,768,1024", "--sizes"),
    dtype: str = DtypeOpt, device: str = DeviceOpt, as_json: bool = JsonOpt,
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Statistics vs resolution PNG (Fig. 5/6)."),
):
    """Latent mean/std per resolution for student and teacher, with Gaussian KL (Eq. 2) and JS."""
    from vaepack import analysis as A

    res = A.latent_stats(inputs, model, teacher, _csv(sizes, int), device=device, dtype=dtype,
                         progress=_note)  # stderr, so --json on stdout stays clean
    if plot_out:
        A.plot_stats(res, plot_out)
    if as_json:
        _emit_json(_nan_to_none(res))
    else:
        print(A.stats_markdown(res))


def _nan_to_none(o):
    if isinstance(o, float):
        return _finite(o)
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_nan_to_none(v) for v in o]
    return o


# --------------------------------------------------------------------------- export
@app.command()
def export(
    model: str = typer.Argument("default", help="Model id or alias."),
    part: str = typer.Option("decoder", "--part", help="encoder, decoder or eps-step (diffusion decoders)."),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Write the ONNX graph (always, for --trt)."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT engine (needs tensorrt + CUDA)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16, bf16 or int8 (onnxruntime/OpenVINO)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="int8: images (folder/files/glob) to "
                                              "calibrate on, or a calibration JSON (default: the shipped one)."),
    calibration_images: int = typer.Option(64, "--calibration-images", help="int8: images used (one random crop each)."),
    calibration_scale: float = typer.Option(1.5, "--calibration-scale", help="int8: the --scale your encodes use."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: vaepack's)."),
    profile: str = typer.Option("hires-1024", "--profile", help="TensorRT profile name (export/profiles) or file."),
    raw: bool = typer.Option(False, "--raw", help="Leave the latent convention out of the graph (recorded in "
                             "the sidecar; runtimes apply it)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Real image for the parity check."),
    out_dir: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (default export/artifacts)."),
    as_json: bool = JsonOpt,
):
    """Export a model part to ONNX (+ sidecar JSON with convention, hashes, parity) and TensorRT."""
    from vaepack import export as X

    kw: dict = {"opset": opset} if opset else {}
    if calibration is not None:
        from vaepack import quantize as Q
        from vaepack.manifest import get_model

        if precision != "int8":
            raise UsageError("--calibration is for --precision int8")
        if not calibration.lower().endswith(".json"):
            _note(f"calibrating int8 on up to {calibration_images} images of {calibration}")
        kw["calibration"] = Q.prepare_calibration(get_model(model), "decoder" if part == "eps-step" else part,
                                                  calibration, count=calibration_images, scale=calibration_scale)
    if trt:
        res, engine = X.export_trt(model, part, profile=profile, precision=precision, out_dir=out_dir,
                                   include_convention=not raw, **kw)
    else:
        if not onnx:
            raise UsageError("nothing to do: give --onnx or --trt")
        res = X.export_onnx(model, part, out_dir=out_dir, precision=precision, include_convention=not raw,
                            image=image, **kw)
        engine = None
    if as_json:
        _emit_json({"onnx": str(res.onnx_path), "sidecar": str(res.sidecar_path), "engine": engine and str(engine),
                    "parity": res.parity})
        return
    for line in X.parity_summary(res.parity):
        _note(line)
    _note(f"wrote {res.onnx_path} and {res.sidecar_path.name}" + (f"; engine {engine}" if engine else ""))


# --------------------------------------------------------------------------- bench
@app.command()
def bench(
    models: str = typer.Option("default", "--models", help="Comma-separated model ids."),
    parts: str = typer.Option("encoder,decoder", "--parts"),
    backends: str = typer.Option("torch", "--backends", help="torch, onnxruntime, openvino, tensorrt."),
    precision: str = typer.Option("fp32", "--precision", help="Comma-separated: fp32, bf16, fp16, int8."),
    scales: str = typer.Option("1", "--scales"),
    sizes: str = typer.Option("256", "--sizes", help="Square input sizes in pixels."),
    batch: str = typer.Option("1", "--batch", help="Comma-separated batch sizes."),
    data: Optional[Path] = typer.Option(None, "--data", help="Image folder: adds round-trip PSNR/SSIM/MS-SSIM."),
    decoder: Optional[str] = typer.Option(None, "--decoder", help="Decoder for the round trip / decoder rows."),
    nfe: Optional[str] = typer.Option(None, "--nfe", help="Diffusion-decoder steps, comma-separated."),
    repeat: int = typer.Option(10, "--repeat", help="Timed runs per row (after warm-up)."),
    warmup: int = typer.Option(2, "--warmup"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Use at most N images of --data."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Center-crop --data images to N x N."),
    suite: Optional[str] = typer.Option(None, "--suite", help="Run a named suite from benchmarks/suites."),
    rd: bool = typer.Option(False, "--rd", help="Rate-distortion of latents vs JPEG/WebP (needs --data)."),
    device: str = DeviceOpt,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result JSON here ('-' = stdout)."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG chart."),
):
    """Latency, throughput, params, FLOPs, memory and quality per model/part/backend/precision/size."""
    from vaepack import bench as B

    err = _stderr()

    def progress(done, total, row):
        st = row.get("status")
        lat = row.get("latency_ms_median")
        what = f"{row.get('model')}/{row.get('part', row.get('codec', ''))} {row.get('backend', '')} " \
               f"{row.get('precision', '')} {row.get('size', '')} x{row.get('scale', '')} b{row.get('batch', '')}"
        _note(f"[{done}/{total}] {what}: " + (f"{lat:.1f} ms" if st == "ok" and lat is not None else
                                               str(st if st != "ok" else "done")) +
              (f" ({row.get('reason')})" if row.get("reason") else ""))

    if suite:
        res = B.run_suite(suite, progress=progress)
    elif rd:
        if data is None:
            raise UsageError("--rd needs --data DIR")
        res = B.run_rd(_csv(models), data, scales=_csv(scales, float), decoder=decoder,
                       precision=_csv(precision)[0] if precision else "fp32", device=device,
                       max_images=max_images, crop=crop, progress=progress)
    else:
        res = B.run_bench(_csv(models), parts=_csv(parts), backends=_csv(backends), precisions=_csv(precision),
                          scales=_csv(scales, float), sizes=_csv(sizes, int), batches=_csv(batch, int),
                          data_dir=data, decoder=decoder, nfe=_csv(nfe, int) or None, repeat=repeat,
                          warmup=warmup, device=device, threads=threads, max_images=max_images, crop=crop,
                          progress=progress)
    if json_out is not None:
        if str(json_out) == "-":
            sys.stdout.write(B.to_json(res) + "\n")
        else:
            B.save(res, json_out)
            _note(f"wrote {json_out}")
    if markdown or json_out is None:
        sys.stdout.write(B.to_markdown(res) + "\n")
    if plot_out is not None:
        B.plot(res, plot_out)
        _note(f"wrote {plot_out}")
    if res.get("interrupted"):
        err.print("interrupted: the rows above are the ones finished")
        raise typer.Exit(130)


# --------------------------------------------------------------------------- entry point
class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* sys.stderr (it may be swapped after setup: tests, embedding apps)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


class _LevelFormatter(logging.Formatter):
    """Warnings say so; informational lines (training progress logs) are printed as they are."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return f"{record.levelname.lower()}: {msg}" if record.levelno >= logging.WARNING else msg


def _setup_logging() -> None:
    log = logging.getLogger("vaepack")
    if not log.handlers:
        h = _StderrHandler()
        h.setFormatter(_LevelFormatter())
        log.addHandler(h)
        log.setLevel(logging.WARNING)
        log.propagate = False


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(exit, usage, abort) exception types. Recent typer vendors its own click (typer._click),
    whose exceptions are not click's: catch both, or a typo in an option becomes a traceback."""
    exits: tuple = (typer.Exit,)
    usage: tuple = (typer.TyperException,) if hasattr(typer, "TyperException") else ()
    aborts: tuple = (typer.Abort,)
    try:
        import click

        exits += (click.exceptions.Exit,)
        usage += (click.ClickException,)
        aborts += (click.exceptions.Abort,)
    except ImportError:
        pass
    return exits, usage, aborts


def main(argv: Iterable[str] | None = None) -> int:
    exits, usage, aborts = _click_exceptions()
    _setup_logging()
    try:
        rv = app(args=list(argv) if argv is not None else None, standalone_mode=False)
        # With standalone_mode=False click *returns* the code of a typer.Exit raised in a command.
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except VaepackError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except exits as e:
        return e.exit_code
    except usage as e:
        msg = e.format_message()
        if msg.strip():  # empty when the help was shown instead (no arguments at all)
            print(f"error: {msg}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except (KeyboardInterrupt, *aborts):
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
