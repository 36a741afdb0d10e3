"""sweep, latent-stats: the paper-000 measurements (quality vs input scale, latent statistics vs resolution)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vaepack.cli.common import (DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, ModelOpt, csv_list, emit_json, nan_to_none,
                                note)


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
    force: bool = ForceOpt,
):
    """Quality vs input scale per model, mean ± std over images (Chu et al. 2026, Table I)."""
    from vaepack import analysis as A
    from vaepack.io import check_output

    if plot_out:
        check_output(plot_out, force)  # before the minutes of measuring
        _plots_available()

    models = [model] + ([teacher] if teacher else [])
    res = A.sweep(inputs, models, csv_list(scales, float), decoder=decoder, device=device, dtype=dtype, filter=filter,
                  progress=note, crop=crop)  # stderr, so --json on stdout stays clean
    _report(res, as_json, plot_out, A.plot_sweep, A.sweep_markdown)


def latent_stats(
    inputs: list[str] = typer.Argument(..., help="Images, directories or globs."),
    model: str = ModelOpt,
    teacher: str = typer.Option("taef2", "--teacher"),
    sizes: str = typer.Option("64,128,256,384,512,768,1024", "--sizes"),
    dtype: str = DtypeOpt, device: str = DeviceOpt, as_json: bool = JsonOpt,
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Statistics vs resolution PNG (Fig. 5/6)."),
    force: bool = ForceOpt,
):
    """Latent mean/std per resolution for student and teacher, with Gaussian KL (Eq. 2) and JS."""
    from vaepack import analysis as A
    from vaepack.io import check_output

    if plot_out:
        check_output(plot_out, force)
        _plots_available()

    res = A.latent_stats(inputs, model, teacher, csv_list(sizes, int), device=device, dtype=dtype,
                         progress=note)  # stderr, so --json on stdout stays clean
    _report(res, as_json, plot_out, A.plot_stats, A.stats_markdown)


def _plots_available() -> None:
    from vaepack.plots import require_matplotlib

    require_matplotlib()  # matplotlib's install hint before the minutes of measuring


def _report(res: dict, as_json: bool, plot_out: Optional[Path], plot, markdown) -> None:
    """The plot (if asked), then JSON on stdout (NaN as null) or the Markdown table."""
    if plot_out:
        plot(res, plot_out)
    if as_json:
        emit_json(nan_to_none(res))
    else:
        print(markdown(res))

