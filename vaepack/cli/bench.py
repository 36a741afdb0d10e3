"""``vaepack bench``: latency, throughput, params, FLOPs, memory and quality tables."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from vaepack.cli.common import DeviceOpt, ForceOpt, csv_list, note, stderr_console
from vaepack.errors import UsageError


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
    force: bool = ForceOpt,
):
    """Latency, throughput, params, FLOPs, memory and quality per model/part/backend/precision/size."""
    from vaepack.io import check_output

    for out in (json_out if json_out is not None and str(json_out) != "-" else None, plot_out):
        if out is not None:
            check_output(out, force)  # before the minutes of measuring
    if plot_out is not None:
        from vaepack.plots import require_matplotlib

        require_matplotlib()  # the install hint now, not after the measuring

    from vaepack.bench.rd import run_rd
    from vaepack.bench.report import plot, to_markdown
    from vaepack.bench.run import run_bench
    from vaepack.bench.schema import save, to_json
    from vaepack.bench.suites import run_suite

    err = stderr_console()

    def progress(done, total, row):
        st = row.get("status")
        lat = row.get("latency_ms_median")
        what = f"{row.get('model')}/{row.get('part', row.get('codec', ''))} {row.get('backend', '')} " \
               f"{row.get('precision', '')} {row.get('size', '')} x{row.get('scale', '')} b{row.get('batch', '')}"
        note(f"[{done}/{total}] {what}: " + (f"{lat:.1f} ms" if st == "ok" and lat is not None else
                                               str(st if st != "ok" else "done")) +
              (f" ({row.get('reason')})" if row.get("reason") else ""))

    if suite:
        res = run_suite(suite, progress=progress)
    elif rd:
        if data is None:
            raise UsageError("--rd needs --data DIR")
        res = run_rd(csv_list(models), data, scales=csv_list(scales, float), decoder=decoder,
                     precision=csv_list(precision)[0] if precision else "fp32", device=device,
                     max_images=max_images, crop=crop, progress=progress)
    else:
        res = run_bench(csv_list(models), parts=csv_list(parts), backends=csv_list(backends), precisions=csv_list(precision),
                        scales=csv_list(scales, float), sizes=csv_list(sizes, int), batches=csv_list(batch, int),
                        data_dir=data, decoder=decoder, nfe=csv_list(nfe, int) or None, repeat=repeat,
                        warmup=warmup, device=device, threads=threads, max_images=max_images, crop=crop,
                        progress=progress)
    if json_out is not None:
        if str(json_out) == "-":
            sys.stdout.write(to_json(res) + "\n")
        else:
            save(res, json_out)
            note(f"wrote {json_out}")
    if markdown or json_out is None:
        sys.stdout.write(to_markdown(res) + "\n")
    if plot_out is not None:
        plot(res, plot_out)
        note(f"wrote {plot_out}")
    if res.get("interrupted"):
        err.print("interrupted: the rows above are the ones finished")
        raise typer.Exit(130)

