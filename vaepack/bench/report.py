"""Benchmark results as Markdown tables and PNG charts (the charts through vaepack.plots, which
needs the optional matplotlib; ``plot`` raises the one-line install hint without it)."""

from __future__ import annotations

from vaepack.errors import UsageError


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
        cols = ["codec", "model", "variant", "scale", "bpp", "PSNR", "SSIM", "MS-SSIM", "HaarPSI", "GMSD", "images"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in result["rows"]:
            who = "-" if r["codec"] != "latent" else (
                r["model"] if r.get("decoder") in (None, r["model"]) else f"{r['model']}>{r['decoder']}")
            lines.append("| " + " | ".join([r["codec"], who, r["variant"], _fmt(r["scale"]), _fmt(r["bpp"], 3),
                                            _fmt(r["psnr"]), _fmt(r["ssim"], 4), _fmt(r["ms_ssim"], 4),
                                            _fmt(r.get("haarpsi"), 4), _fmt(r.get("gmsd"), 4),
                                            str(r["images"])]) + " |")
        return head + "\n".join(lines) + "\n"
    cols = ["model", "part", "backend", "prec", "size", "scale", "batch", "nfe", "median ms", "p90 ms", "img/s",
            "params (M)", "MB", "GFLOP/img", "GFLOP/s", "peak MB", "PSNR", "SSIM", "MS-SSIM", "HaarPSI", "GMSD",
            "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        name = _row_name(r)
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append("| " + " | ".join([
            name, r["part"], r["backend"], r["precision"], str(r["size"]), f"{r['scale']:g}", str(r["batch"]),
            _fmt(r["nfe"]), _fmt(r["latency_ms_median"]), _fmt(r["latency_ms_p90"]), _fmt(r["throughput_img_s"]),
            _fmt(r["params"] / 1e6 if r["params"] is not None else None, 3), _fmt(r["param_mb"]),
            _fmt(r["flops_per_image"] / 1e9 if r["flops_per_image"] is not None else None),
            _fmt(r["gflops_per_s"], 1), _fmt(r["peak_mem_mb"], 1), _fmt(r["psnr"]), _fmt(r["ssim"], 4),
            _fmt(r["ms_ssim"], 4), _fmt(r.get("haarpsi"), 4), _fmt(r.get("gmsd"), 4),
            status.replace("|", "/")]) + " |")
    return head + "\n".join(lines) + "\n"


# =========================================================================== charts
def _row_name(r: dict) -> str:
    return r["network"] if r["network"] == r["model"] else f"{r['model']}>{r['network']}"


def plot(result: dict, path) -> None:
    """Draw a PNG (matplotlib, vaepack.plots): PSNR and HaarPSI vs bits per pixel for an rd result;
    for a bench result, median latency per image per row (p90 whisker, one colour per backend and
    precision), and beside it PSNR vs remap scale when the rows carry quality at several scales."""
    from vaepack.plots import Series, bar_chart, line_chart, require_matplotlib

    require_matplotlib()
    if result["kind"] == "rd":
        panels = []
        for key, ylabel in (("psnr", "PSNR (dB)"), ("haarpsi", "HaarPSI (1 = identical)")):
            series: dict[str, list[tuple[float, float]]] = {}
            for r in result["rows"]:
                if r.get(key) is None:
                    continue
                name = r["codec"].upper() if r["codec"] != "latent" else (
                    f"{r['model']} {r['variant']}" + (f" x{r['scale']:g}" if r.get("scale") not in (None, 1.0) else ""))
                series.setdefault(name, []).append((r["bpp"], r[key]))
            if series:
                panels.append(([Series(k, v) for k, v in series.items()], "bits per pixel (bpp)", ylabel,
                               f"{ylabel.split(' ')[0]} vs rate"))
        line_chart(path, panels, suptitle=f"rate-distortion, mean over {result['rows'][0]['images']} images"
                   if result["rows"] else "rate-distortion")
        return
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    if not ok:
        raise UsageError("nothing to plot: no row finished")
    labels = [f"{_row_name(r)} {r['part'][:3]} {r['size']}px x{r['scale']:g} b{r['batch']}"
              + (f" nfe{r['nfe']}" if r["nfe"] else "") for r in ok]
    per_img = [r["latency_ms_median"] / r["batch"] for r in ok]
    p90 = [r["latency_ms_p90"] / r["batch"] if r.get("latency_ms_p90") is not None else None for r in ok]
    extra = None
    q = [r for r in ok if r.get("psnr") is not None]
    if q and len({r["scale"] for r in q}) > 1:
        series: dict[str, dict[float, float]] = {}
        for r in q:
            dec = r.get("decoder") or r["model"]
            name = (r["model"] if dec == r["model"] else f"{r['model']} > {dec}") + f" {r['precision']}" \
                + (f" nfe{r['nfe']}" if r["nfe"] else "")
            series.setdefault(name, {})[r["scale"]] = r["psnr"]
        extra = ([Series(k, sorted(v.items())) for k, v in series.items()], "remap scale (x image side)",
                 "round-trip PSNR (dB)", f"quality vs remap scale ({q[0]['quality_images']} images)")
    m = result["machine"]
    bar_chart(path, labels, per_img, "median latency per image (ms; whisker: p90)",
              f"latency per row: {m['cpu']}, {m['threads']} thread{'s' if m['threads'] != 1 else ''}",
              groups=[f"{r['backend']} {r['precision']}" for r in ok],
              whiskers=p90, extra=extra)
