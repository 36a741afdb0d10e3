"""tune: the fastest configuration that meets a quality target on your images (vaepack.tune)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vaepack.cli.common import DeviceOpt, ForceOpt, JsonOpt, csv_list, emit_json, note, stderr_console, stdout_console


def tune(
    images: list[str] = typer.Argument(..., help="Images, directories or globs to measure quality on."),
    target_psnr: Optional[float] = typer.Option(None, "--target-psnr", help="Recommend the fastest point with at "
                                                "least this mean round-trip PSNR (dB)."),
    target_ssim: Optional[float] = typer.Option(None, "--target-ssim", help="... or at least this mean SSIM."),
    max_ms: Optional[float] = typer.Option(None, "--max-ms", help="Recommend the best quality within this latency "
                                           "per image (ms); with a target, the fastest point meeting it within it."),
    part: str = typer.Option("roundtrip", "--part", help="Time the roundtrip, or the encoder alone (latent caching)."),
    models: str = typer.Option("default,taef2", "--models", help="MODEL[:DECODER][@NFE], comma-separated "
                               "(e.g. default,taef2,taef2:eps@1)."),
    scales: str = typer.Option("1,1.25,1.5,2", "--scales", help="Remap scales."),
    backends: Optional[str] = typer.Option(None, "--backends", help="Comma-separated (default: the installed ones)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16, int8 (default: fp32, bf16 "
                                            "where the CPU has it natively, int8 where calibrated)."),
    size: int = typer.Option(512, "--size", help="Side of the square image latency is measured at (px)."),
    budget_minutes: float = typer.Option(10.0, "--budget-minutes", help="Bound on the search (the points finished "
                                         "by then are kept)."),
    repeat: int = typer.Option(3, "--repeat", help="Timed round trips per candidate (median)."),
    warmup: int = typer.Option(1, "--warmup"),
    device: str = DeviceOpt, as_json: bool = JsonOpt,
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Quality vs latency PNG with the frontier."),
    save_preset: Optional[str] = typer.Option(None, "--save-preset", help="Store the recommendation as a preset "
                                              "for encode/decode/roundtrip --preset NAME."),
    force: bool = ForceOpt,
):
    """Measure quality and latency of model/scale/backend/precision candidates; print the Pareto frontier and
    recommend the fastest point meeting the target."""
    from vaepack import tune as T
    from vaepack.files import command_line
    from vaepack.io import check_output

    if plot_out is not None:  # before the minutes of measuring
        from vaepack.plots import require_matplotlib

        check_output(plot_out, force)
        require_matplotlib()
    if save_preset:
        from vaepack.errors import OutputExistsError
        from vaepack.presets import preset_path

        if preset_path(save_preset).exists() and not force:
            raise OutputExistsError(f"preset '{save_preset}' exists", path=str(preset_path(save_preset)),
                                    hint="use --force to replace it")
    cfg = T.TuneConfig(images=list(images), models=csv_list(models), scales=csv_list(scales, float),
                       backends=csv_list(backends) if backends else None,
                       precisions=csv_list(precision) if precision else None, size=size, part=part,
                       target_psnr=target_psnr, target_ssim=target_ssim, max_ms=max_ms,
                       budget_minutes=budget_minutes, warmup=warmup, repeat=repeat,
                       device=None if device == "auto" else device)
    with _Progress() as progress:
        res = T.run_tune(cfg, progress=progress)
    if plot_out is not None and any(p["status"] == "ok" for p in res["points"]):
        T.plot_frontier(res, plot_out)
        note(f"wrote {plot_out}")
    saved = None
    if save_preset and res["recommended"]:
        from vaepack.presets import save_preset as save

        saved = save(T.preset_of(res, save_preset, command_line()), force=force)
    if as_json:
        emit_json(res)
    else:
        _print(res)
    if saved:
        note(f"saved preset '{save_preset}' ({saved}): vaepack roundtrip IMAGES --preset {save_preset}")
    elif save_preset:
        note(f"no preset saved: {res['recommended_reason']}")
    if res["interrupted"]:
        stderr_console().print("interrupted: the points above are the ones finished")
        raise typer.Exit(130)
    if save_preset and not saved:
        raise typer.Exit(1)


class _Progress:
    """One line per measurement on stderr (greppable logs) and, on a terminal, a progress bar under them."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        err = stderr_console()
        self.bar = Progress(TextColumn("tune"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                            disable=not err.is_terminal, transient=True)
        self.bar.__enter__()
        self.task = None
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def __call__(self, phase: str, p, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task("tune", total=total)
        self.bar.update(self.task, completed=done)
        c = p.cand
        what = f"[{done}/{total}] {phase:7s} {c.label}"
        if p.status in ("skipped", "pruned"):
            line = f"{what}: {p.status} ({p.reason})"
        elif phase == "timing":
            line = f"{what}: {p.latency_ms:.0f} ms (first call)"
        elif phase == "latency":
            line = f"{what}: {p.latency_ms:.0f} ms" + (" (one call: slower than its group's best, no more rounds)"
                                                       if p.runs == -1 else f" (median of {p.runs})")
        else:
            q = p.quality
            line = (f"{what}: PSNR {q.get('psnr', float('nan')):.2f} dB, SSIM {q.get('ssim') or float('nan'):.4f}, "
                    f"HaarPSI {q.get('haarpsi', float('nan')):.4f} ({p.images} images)")
        if self.bar.disable:
            note(line)
        else:
            self.bar.console.print(line, markup=False, highlight=False)


def _print(res: dict) -> None:
    from rich.table import Table

    from vaepack.tune import Candidate

    rec = res["recommended"] or {}
    t = Table(title=f"Pareto frontier ({res['metric'].upper()} vs latency per image at {res['config']['size']} px, "
                    f"{res['config']['part']})")
    for col in ("model", "scale", "backend", "precision", "ms/image", "PSNR dB", "SSIM", "HaarPSI", "GMSD", ""):
        t.add_column(col, justify="right" if col not in ("model", "backend", "precision", "") else "left")

    def f(v, nd=2):
        return "-" if v is None else f"{v:.{nd}f}"

    for p in sorted((p for p in res["points"] if p["frontier"]), key=lambda p: p["latency_ms"]):
        chosen = all(rec.get(k) == p[k] for k in ("model", "decoder", "nfe", "scale", "backend", "precision"))
        t.add_row(Candidate(p["model"], p["decoder"], p["nfe"], 1, "", "").pair, f"{p['scale']:g}", p["backend"],
                  p["precision"], f(p["latency_ms"], 0), f(p["psnr"]), f(p["ssim"], 4), f(p["haarpsi"], 4),
                  f(p["gmsd"], 4), "<- recommended" if chosen else "")
    out = stdout_console()
    out.print(t)
    counts: dict[str, int] = {}
    for p in res["points"]:
        counts[p["status"]] = counts.get(p["status"], 0) + 1
    out.print(f"{len(res['points'])} candidates: " + ", ".join(f"{n} {s}" for s, n in counts.items())
              + f"; {res['elapsed_s']:.0f} s" + (" (budget ran out)" if res["budget_exhausted"] else ""))
    if rec:
        cmd = (f"vaepack roundtrip IMAGES --model {rec['model']}"
               + (f" --decoder {rec['decoder']}" if rec["decoder"] != rec["model"] else "")
               + f" --scale {rec['scale']:g} --backend {rec['backend']} --dtype {rec['precision']}"
               + (f" --steps {rec['nfe']}" if rec["nfe"] is not None else ""))
        out.print(f"recommended: {rec['model']} x{rec['scale']:g} {rec['backend']} {rec['precision']}: "
                  f"{rec['latency_ms']:.0f} ms/image, PSNR {f(rec['psnr'])} dB, SSIM {f(rec['ssim'], 4)}\n  {cmd}")
    else:
        out.print(f"no recommendation: {res['recommended_reason']}")
