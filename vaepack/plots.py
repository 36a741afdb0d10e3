"""Charts and the labeled ``--compare`` image, drawn with matplotlib (the optional ``plot`` extra).

matplotlib is imported only when a chart is drawn, through the object API with the Agg canvas (no
pyplot, so no global backend or figure state is touched and nothing needs a display). Without it,
``require_matplotlib`` raises one line naming the extra (``pip install 'vaepack[plot]'``); commands
call it before measuring so nobody waits minutes for the error. The ``--compare`` image is the one
exception: it falls back to the unlabeled side-by-side (``save_compare`` returns False and the CLI
says so once).

Every chart: a title, axis titles with units, ticks at round numbers (or at the measured x values
when there are few), a legend, each measured point marked, written atomically as PNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vaepack.errors import BackendUnavailableError

INSTALL_HINT = "pip install 'vaepack[plot]'"
DPI = 110
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")

__all__ = ["INSTALL_HINT", "require_matplotlib", "Series", "line_chart", "bar_chart", "save_compare",
           "compare_layout", "scatter_frontier"]


def require_matplotlib():
    """The ``Figure`` class, or BackendUnavailableError (one line with the install hint)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (Agg: no display)
        from matplotlib.figure import Figure
    except ImportError:
        raise BackendUnavailableError("plotting needs matplotlib", hint=INSTALL_HINT) from None
    return Figure


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = require_matplotlib()(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> None:
    from vaepack.io import atomic_output

    with atomic_output(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _fmt_tick(v: float) -> str:
    return f"{v:g}"


def _fmt_value(v: float) -> str:
    """A bar's value: 3 significant digits, never in e-notation for everyday magnitudes."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _measured_ticks(ax, xs: Sequence[float], log: bool = False) -> None:
    """Put x ticks at the measured values when there are few of them (scales 1/1.25/1.5/2, sizes
    64..1024), else leave matplotlib's round-number locator."""
    vals = sorted(set(float(x) for x in xs if x is not None and math.isfinite(x)))
    if 1 < len(vals) <= 8:
        from matplotlib.ticker import FixedLocator, NullLocator

        ax.xaxis.set_major_locator(FixedLocator(vals))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([_fmt_tick(v) for v in vals])
    elif log:
        from matplotlib.ticker import ScalarFormatter

        ax.xaxis.set_major_formatter(ScalarFormatter())


@dataclass
class Series:
    """One line of a chart: (x, y) points in x order, an optional +- error per point."""

    name: str
    points: list[tuple[float, float]]
    errors: list[float] | None = None


def _draw_lines(ax, series: list[Series], xlabel: str, ylabel: str, title: str, logx: bool = False,
                logy: bool = False, legend: bool = True) -> None:
    xs = []
    for i, s in enumerate(series):
        pts = [(x, y) for x, y in s.points if y is not None and math.isfinite(y)]
        if not pts:
            continue
        order = sorted(range(len(pts)), key=lambda k: pts[k][0])
        px, py = [pts[k][0] for k in order], [pts[k][1] for k in order]
        xs += px
        kw = dict(marker=MARKERS[i % len(MARKERS)], markersize=6, linewidth=1.6, label=s.name)
        if s.errors is not None:
            errs = [s.errors[k] if s.errors[k] is not None and math.isfinite(s.errors[k]) else 0.0 for k in order]
            ax.errorbar(px, py, yerr=errs, capsize=3, **kw)
        else:
            ax.plot(px, py, **kw)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    _measured_ticks(ax, xs, logx)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series and legend:
        if len(series) > 6:  # many lines: the legend goes beside the axes, not over the points
            ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=True)
        else:
            ax.legend(fontsize="small", frameon=True)


def line_chart(path, panels: list[tuple[list[Series], str, str, str]], suptitle: str | None = None,
               logy: Sequence[bool] | None = None) -> None:
    """Side-by-side line panels, each ``(series, x axis title, y axis title, panel title)``; every
    measured point is marked, error bars where a series has them."""
    names = [[s.name for s in p[0]] for p in panels]
    shared = len(panels) > 1 and all(n == names[0] for n in names)  # one legend, on the last panel
    wide = max((len(n) for n in names), default=0) > 6
    fig = _figure(6.4 * len(panels) + (2.6 if wide else 0), 4.4 + (0.12 * max(0, len(names[0]) - 24) if names else 0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for k, (ax, (series, xl, yl, title)) in enumerate(zip(axes, panels)):
        _draw_lines(ax, series, xl, yl, title, logy=bool(logy and logy[k]), legend=not shared or k == len(panels) - 1)
    if suptitle:
        fig.suptitle(suptitle)
    _save(fig, path)


def bar_chart(path, labels: list[str], values: list[float], xlabel: str, title: str,
              groups: list[str] | None = None, whiskers: list[float | None] | None = None,
              extra: tuple[list[Series], str, str, str] | None = None) -> None:
    """Horizontal bars, one per label (top to bottom in order), each annotated with its value,
    coloured by ``groups`` (one legend entry per group); ``whiskers`` draws an upper error (e.g.
    p90) per bar. ``extra``: a line panel beside the bars (see ``line_chart``)."""
    n = len(labels)
    fig = _figure(11.5 if extra else 8.5, max(2.6, 0.9 + 0.28 * n))
    if extra:
        gs = fig.add_gridspec(1, 2, width_ratios=(1.25, 1))
        ax, ax2 = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    else:
        ax, ax2 = fig.add_subplot(), None
    groups = groups or [""] * n
    names = list(dict.fromkeys(groups))
    colors = {g: f"C{i % 10}" for i, g in enumerate(names)}
    ys = list(range(n))[::-1]
    err = None
    if whiskers is not None:
        err = [[0.0] * n, [max(0.0, (w or v) - v) for w, v in zip(whiskers, values)]]
    ax.barh(ys, values, color=[colors[g] for g in groups], xerr=err, capsize=2 if err else 0,
            error_kw={"elinewidth": 0.8, "alpha": 0.7})
    tips = values if whiskers is None else [max(v, w or v) for v, w in zip(values, whiskers)]
    for y, v, tip in zip(ys, values, tips):  # the value right of the bar (and of its whisker)
        ax.annotate(_fmt_value(v), (tip, y), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize="small")
    ax.set_yticks(ys, labels, fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.margins(x=0.15)
    ax.grid(True, axis="x", alpha=0.3)
    if len(names) > 1 or names[0]:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=colors[g], label=g) for g in names], fontsize="small", loc="lower right")
    if extra:
        _draw_lines(ax2, *extra)
    _save(fig, path)


# --------------------------------------------------------------------------- the --compare image
MIN_PANEL = 320  # px: smaller images are enlarged (nearest neighbour, an integer factor) so the labels fit
BAND = 30  # px of caption band above the images


def compare_layout(height: int, width: int) -> tuple[int, int]:
    """(enlargement factor, caption band height in px) of the labeled compare image of an HxW image:
    the original sits at rows band.., columns 0..w*k-1, the reconstruction right of it."""
    return max(1, math.ceil(MIN_PANEL / max(1, width))), BAND


MAX_SIDE = 32768  # px: Agg refuses canvases from 2**16 px a side; larger pairs are written unlabeled


def save_compare(path, x, y, psnr: float | None = None, label: str = "reconstruction",
                 force: bool = True) -> str | None:
    """Write ``original | reconstruction`` (two (3, H, W) images in [0, 1] or uint8) as one image
    with a caption band naming each side and the PSNR. Pixels are copied 1:1 (enlarged by an integer
    factor for images under ``MIN_PANEL`` px wide); the format follows the suffix. Returns None, or
    why the plain unlabeled side-by-side was written instead (no matplotlib, or a pair wider or
    taller than ``MAX_SIDE`` px)."""
    import numpy as np
    import torch

    from vaepack.io import image_float, save_image, tensor_to_pil

    side = torch.cat([image_float(x).float(), image_float(y).float()], -1)
    h, w = x.shape[-2:]
    k, band = compare_layout(h, w)
    why = None
    try:
        require_matplotlib()
    except BackendUnavailableError:
        why = f"labels need matplotlib ({INSTALL_HINT})"
    if max(2 * w * k, h * k + band) > MAX_SIDE:
        why = f"labels are drawn on images up to {MAX_SIDE} px a side"
    if why:
        save_image(Path(path), side, force=force)
        return why
    from PIL import Image

    arr = np.asarray(tensor_to_pil(side))
    if k > 1:
        arr = arr.repeat(k, 0).repeat(k, 1)
    H, W = arr.shape[0] + band, arr.shape[1]
    fig = require_matplotlib()(figsize=(W / 100, H / 100), dpi=100)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.figimage(arr, xo=0, yo=0, origin="upper")  # unresampled, at the bottom-left corner
    right = label + (f" \u2014 PSNR {psnr:.2f} dB" if psnr is not None and math.isfinite(psnr)
                     else " \u2014 identical" if psnr is not None else "")
    for text, cx in (("original", 0.25), (right, 0.75)):
        fig.text(cx, 1 - band / 2 / H, text, ha="center", va="center", fontsize=11)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    save_image(Path(path), Image.fromarray(np.ascontiguousarray(rgb), "RGB"), force=force)
    return None


# --------------------------------------------------------------------------- the tune frontier
def scatter_frontier(path, points: list[dict], frontier: list[tuple[float, float]],
                     chosen: tuple[float, float, str] | None, xlabel: str, ylabel: str, title: str,
                     marker_order: list[str] | None = None, hline: tuple[float, str] | None = None,
                     vline: tuple[float, str] | None = None) -> None:
    """Measured points ``{"x", "y", "marker", "color", "label"}`` (one marker shape per ``marker``
    group, one colour per ``color`` group, ``label`` written beside each), the frontier as a dashed
    staircase, the chosen point starred, optional target lines. The x axis is logarithmic when the
    latencies span more than 5x."""
    fig = _figure(9.5, 5.6)
    ax = fig.add_subplot()
    order = marker_order or list(dict.fromkeys(p["marker"] for p in points))
    mk = {g: MARKERS[i % len(MARKERS)] for i, g in enumerate(order)}
    col = {g: f"C{i % 10}" for i, g in enumerate(dict.fromkeys(p["color"] for p in points))}
    for p in points:
        ax.scatter(p["x"], p["y"], marker=mk[p["marker"]], color=col[p["color"]], s=42, zorder=3)
        ax.annotate(p["label"], (p["x"], p["y"]), xytext=(4, 3), textcoords="offset points", fontsize="x-small")
    if frontier:
        f = sorted(frontier)
        ax.step([x for x, _ in f], [y for _, y in f], where="post", linestyle="--", color="0.35", linewidth=1.2,
                label="Pareto frontier", zorder=2)
    if chosen:
        ax.scatter(chosen[0], chosen[1], marker="*", s=320, facecolor="none", edgecolor="crimson", linewidth=1.8,
                   zorder=4, label=chosen[2])
    if hline:
        ax.axhline(hline[0], color="crimson", linestyle=":", linewidth=1, label=hline[1])
    if vline:
        ax.axvline(vline[0], color="crimson", linestyle="-.", linewidth=1, label=vline[1])
    xs = [p["x"] for p in points]
    if xs and max(xs) > 5 * min(xs):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # ticks at 1, 2, 3, 5, 7 x 10^k, written plainly (300, 500, not 10^2)
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0, 7.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    handles += [Line2D([], [], marker=m, linestyle="", color="0.3", label=g) for g, m in mk.items()]
    handles += [Line2D([], [], marker="s", linestyle="", color=c, label=g) for g, c in col.items()]
    ax.legend(handles=handles, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    _save(fig, path)
