"""Benchmark results as Markdown and PNG charts, drawn with Pillow (no plotting dependency).

``line_chart``/``bar_chart`` return a PIL image and ``save_png`` writes one atomically; the paper
measurements of ``vaepack.analysis`` draw their figures with the same functions.
"""

from __future__ import annotations

import math
from pathlib import Path

from vaepack.errors import UsageError

# matplotlib's "tab10" colours, so the charts read like the usual plots
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


# =========================================================================== markdown
def _fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def to_markdown(result: dict) -> str:
    """A Markdown report: machine line, then one table row per result row."""
    m = result["machine"]
    git = m.get("git") or {}
    head = (f"<!-- vaepack bench schema {result['schema_version']} -->\n"
            f"**{result['kind']}** {result['created_utc']} - {m['cpu']}, {m['threads']} threads"
            f"{', GPU ' + m['gpu']['name'] if m.get('gpu') else ''} - torch {m['torch']}, vaepack {m['vaepack']}"
            f"{', commit ' + git['commit'][:10] + (' (dirty)' if git.get('dirty') else '') if git else ''}"
            f"{', load ' + ' '.join(f'{x:.1f}' for x in m['loadavg']) if m.get('loadavg') else ''}"
            f"{'  **INTERRUPTED (partial)**' if result['interrupted'] else ''}\n\n")
    if result["kind"] == "rd":
        cols = ["codec", "model", "variant", "scale", "bpp", "PSNR", "SSIM", "MS-SSIM", "images"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in result["rows"]:
            who = "-" if r["codec"] != "latent" else (
                r["model"] if r.get("decoder") in (None, r["model"]) else f"{r['model']}>{r['decoder']}")
            lines.append("| " + " | ".join([r["codec"], who, r["variant"], _fmt(r["scale"]), _fmt(r["bpp"], 3),
                                            _fmt(r["psnr"]), _fmt(r["ssim"], 4), _fmt(r["ms_ssim"], 4),
                                            str(r["images"])]) + " |")
        return head + "\n".join(lines) + "\n"
    cols = ["model", "part", "backend", "prec", "size", "scale", "batch", "nfe", "median ms", "p90 ms", "img/s",
            "params (M)", "MB", "GFLOP/img", "GFLOP/s", "peak MB", "PSNR", "SSIM", "MS-SSIM", "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        name = r["network"] if r["network"] == r["model"] else f"{r['model']}>{r['network']}"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append("| " + " | ".join([
            name, r["part"], r["backend"], r["precision"], str(r["size"]), f"{r['scale']:g}", str(r["batch"]),
            _fmt(r["nfe"]), _fmt(r["latency_ms_median"]), _fmt(r["latency_ms_p90"]), _fmt(r["throughput_img_s"]),
            _fmt(r["params"] / 1e6 if r["params"] is not None else None, 3), _fmt(r["param_mb"]),
            _fmt(r["flops_per_image"] / 1e9 if r["flops_per_image"] is not None else None),
            _fmt(r["gflops_per_s"], 1), _fmt(r["peak_mem_mb"], 1), _fmt(r["psnr"]), _fmt(r["ssim"], 4),
            _fmt(r["ms_ssim"], 4), status.replace("|", "/")]) + " |")
    return head + "\n".join(lines) + "\n"


# =========================================================================== charts
def plot(result: dict, path) -> None:
    """Draw a PNG: throughput bars for a bench result, PSNR-vs-bpp curves for an rd result."""
    if result["kind"] == "rd":
        series: dict[str, list[tuple[float, float]]] = {}
        for r in result["rows"]:
            key = r["codec"] if r["codec"] != "latent" else f"{r['model']} {r['variant']}"
            series.setdefault(key, []).append((r["bpp"], r["psnr"]))
        img = line_chart(series, "bits per pixel", "PSNR (dB)", "rate-distortion (mean over images)")
    else:
        ok = [r for r in result["rows"] if r["status"] == "ok"]
        if not ok:
            raise UsageError("nothing to plot: no row finished")
        labels = [f"{r['network']} {r['part'][:3]} {r['backend']} {r['precision']} {r['size']}px x{r['scale']:g} "
                  f"b{r['batch']}" + (f" nfe{r['nfe']}" if r["nfe"] else "") for r in ok]
        img = bar_chart(labels, [r["throughput_img_s"] for r in ok], "throughput (images/s)")
    save_png(img, path)


def save_png(img, path) -> None:
    """Write a PIL image as PNG atomically (a crash never leaves half a file)."""
    from vaepack.io import atomic_output

    with atomic_output(Path(path)) as tmp:
        img.save(tmp, format="PNG")


def bar_chart(labels: list[str], values: list[float], title: str):
    """Horizontal bars, one per label, scaled to the largest value and annotated with it."""
    from PIL import Image, ImageDraw

    row_h, left, right, top = 18, 8 + 6 * max(len(s) for s in labels), 90, 30
    width = left + 420 + right
    img = Image.new("RGB", (width, top + row_h * len(labels) + 10), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 8), title, fill="black")
    vmax = max(values) or 1.0
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = top + i * row_h
        d.text((8, y + 3), lab, fill="black")
        d.rectangle([left, y + 2, left + int(420 * v / vmax), y + row_h - 3], fill=PALETTE[i % len(PALETTE)])
        d.text((left + int(420 * v / vmax) + 4, y + 3), f"{v:.3g}", fill="black")
    return img


def line_chart(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str):
    """One line (points sorted by x) per named series of (x, y); x starts at 0, the legend is on
    the right."""
    from PIL import Image, ImageDraw

    w, h, l, r, t, b = 760, 480, 60, 200, 44, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    x0, x1 = 0.0, max(p[0] for p in pts) * 1.05 or 1.0
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    y0, y1 = math.floor(y0 - 0.5), math.ceil(y1 + 0.5)

    def xy(p):
        return (l + (p[0] - x0) / (x1 - x0) * (w - l - r), h - b - (p[1] - y0) / (y1 - y0) * (h - t - b))

    d.rectangle([l, t, w - r, h - b], outline="black")
    for k in range(6):
        xv, yv = x0 + (x1 - x0) * k / 5, y0 + (y1 - y0) * k / 5
        px, py = xy((xv, yv))
        d.text((px - 10, h - b + 4), f"{xv:.2g}", fill="black")
        d.text((4, py - 6), f"{yv:.1f}", fill="black")
    d.text((l, 6), title, fill="black")
    d.text(((w - r) // 2, h - 16), xlabel, fill="black")
    d.text((4, t - 14), ylabel, fill="black")
    for i, (name, s) in enumerate(series.items()):
        col = PALETTE[i % len(PALETTE)]
        s = sorted(s)
        if len(s) > 1:
            d.line([xy(p) for p in s], fill=col, width=2)
        for p in s:
            cx, cy = xy(p)
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=col)
        d.text((w - r + 10, t + 16 * i), name, fill=col)
    return img
