"""The distillation paper's measurements as functions (Chu et al. 2026, arXiv 2603.14536).

* ``sweep``: Table I / Fig. 3 -- reconstruction quality per input scale (upsample before encoding,
  downsample the reconstruction back), per model, as mean +- std over images.
* ``latent_stats``: Fig. 5 / Fig. 6 -- latent mean and std per input resolution for a student and
  its teacher, and the Gaussian KL (Eq. 2) and Jensen-Shannon divergence between them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from vaepack.errors import UsageError, VaepackError
from vaepack.io import center_crop, expand_inputs, load_image
from vaepack.metrics import image_metrics
from vaepack.pipeline import TileOptions, decode_record, encode_tensor, resize

METRICS = ("mse", "psnr", "ssim", "ms_ssim")
Progress = Callable[[str], None]


def _mean_std(v: list[float]) -> tuple[float, float]:
    v = [x for x in v if math.isfinite(x)]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / len(v))


def _images(inputs: list[str], keep_going: bool = False) -> list[tuple[Path, torch.Tensor]]:
    out, errors = [], []
    for p in expand_inputs(inputs):
        try:
            out.append((p, load_image(p)))
        except VaepackError as e:
            if not keep_going:
                raise
            errors.append(str(e))
    if not out:
        raise UsageError("no readable images" + (f" ({errors[0]})" if errors else ""))
    return out


def sweep(inputs: list[str], models: list[str], scales: list[float], decoder: str | None = None,
          device: str | None = None, dtype: str = "fp32", filter: str = "bilinear",
          progress: Progress | None = None, crop: int | None = None) -> dict:
    """Per (model, scale): MSE, PSNR, SSIM, MS-SSIM mean and std over the images (paper Table I).

    ``crop``: measure the centered ``crop`` px window of each image instead of the whole image."""
    if not scales or any(not (s > 0) for s in scales):
        raise UsageError("--scales needs positive numbers")
    if crop is not None and crop < 16:
        raise UsageError(f"--crop must be at least 16 px, got {crop}")
    from vaepack.runtime import load_vae  # here, so importing analysis imports no backend

    images = [(p, center_crop(x, crop)) for p, x in _images(inputs)]
    never_tile = TileOptions(budget=0)
    rows = []
    for mid in models:
        enc = load_vae(mid, parts=("encoder",), device=device, dtype=dtype)
        dec_id = decoder or mid
        if "decoder" not in enc.entry.parts and decoder is None:
            raise UsageError(f"model '{mid}' has no decoder; pass --decoder")
        dec = load_vae(dec_id, parts=("decoder",), device=device, dtype=dtype)
        for s in scales:
            per = {k: [] for k in METRICS}
            for p, x in images:
                rec = encode_tensor(enc, x, s, filter, never_tile, str(p))
                y = decode_record(dec, rec, tiles=never_tile, path=str(p))
                for k, v in image_metrics(y, x).items():
                    per[k].append(float(v))
            row = {"model": enc.entry.id, "decoder": dec.entry.id, "scale": s, "images": len(images)}
            for k in METRICS:
                row[k], row[k + "_std"] = _mean_std(per[k])
            rows.append(row)
            if progress:
                progress(f"{mid} x{s:g}: PSNR {row['psnr']:.2f} dB")
    return {"kind": "sweep", "images": [str(p) for p, _ in images], "filter": filter, "dtype": dtype, "crop": crop,
            "rows": rows}


def gaussian_kl(mu_t: float, sd_t: float, mu_s: float, sd_s: float) -> float:
    """KL(T || S) of two 1-D Gaussians, the paper's Eq. 2."""
    return math.log(sd_s / sd_t) + (sd_t ** 2 + (mu_t - mu_s) ** 2) / (2 * sd_s ** 2) - 0.5


def gaussian_js(mu_t: float, sd_t: float, mu_s: float, sd_s: float, n: int = 20001) -> float:
    """Jensen-Shannon divergence (nats) of two 1-D Gaussians; no closed form, so integrate
    0.5 KL(T||M) + 0.5 KL(S||M), M = (T + S) / 2, on a fine grid covering both densities."""
    lo = min(mu_t - 12 * sd_t, mu_s - 12 * sd_s)
    hi = max(mu_t + 12 * sd_t, mu_s + 12 * sd_s)
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    dx = (hi - lo) / (n - 1)

    def pdf(mu, sd):
        return torch.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))

    p, q = pdf(mu_t, sd_t), pdf(mu_s, sd_s)
    m = 0.5 * (p + q)
    eps = 1e-300
    kl_pm = torch.sum(p * (torch.log(p + eps) - torch.log(m + eps))) * dx
    kl_qm = torch.sum(q * (torch.log(q + eps) - torch.log(m + eps))) * dx
    return float(0.5 * (kl_pm + kl_qm))


def latent_stats(inputs: list[str], model: str, teacher: str, sizes: list[int], device: str | None = None,
                 dtype: str = "fp32", progress: Progress | None = None) -> dict:
    """Latent mean/std per input resolution (images resized to size x size) for student and teacher,
    with KL(T||S) (Eq. 2) and JS between the fitted Gaussians (Fig. 5 and 6)."""
    if not sizes or any(s < 8 for s in sizes):
        raise UsageError("--sizes needs sizes of at least 8 px")
    from vaepack.runtime import load_vae

    images = _images(inputs)
    stu = load_vae(model, parts=("encoder",), device=device, dtype=dtype)
    tea = load_vae(teacher, parts=("encoder",), device=device, dtype=dtype)
    if stu.space.name != tea.space.name:
        raise UsageError(f"'{stu.entry.id}' ({stu.space.name}) and '{tea.entry.id}' ({tea.space.name}) "
                         "live in different latent spaces; compare models of one space")
    rows = []
    for size in sizes:
        acc = {}
        for name, vae in (("student", stu), ("teacher", tea)):
            f = vae.factor
            side = max(f, size - size % f)
            s1 = s2 = n = 0.0
            for _, x in images:
                z = vae.encode(resize(x[None], (side, side), "bilinear")).double()
                s1 += float(z.sum())
                s2 += float((z * z).sum())
                n += z.numel()
            mu = s1 / n
            acc[name] = (mu, math.sqrt(max(s2 / n - mu * mu, 1e-20)))
        (mu_s, sd_s), (mu_t, sd_t) = acc["student"], acc["teacher"]
        rows.append({"size": size, "student_mean": mu_s, "student_std": sd_s, "teacher_mean": mu_t,
                     "teacher_std": sd_t, "kl": gaussian_kl(mu_t, sd_t, mu_s, sd_s),
                     "js": gaussian_js(mu_t, sd_t, mu_s, sd_s)})
        if progress:
            progress(f"{size}px: KL {rows[-1]['kl']:.4g}, JS {rows[-1]['js']:.4g}")
    return {"kind": "latent-stats", "student": stu.entry.id, "teacher": tea.entry.id,
            "images": [str(p) for p, _ in images], "rows": rows}


def sweep_markdown(res: dict) -> str:
    lines = ["| model | decoder | scale | MSE (x1e-4) | PSNR (dB) | SSIM | MS-SSIM |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['decoder']} | {r['scale']:g} | {r['mse'] * 1e4:.2f} ± {r['mse_std'] * 1e4:.2f} "
                     f"| {r['psnr']:.2f} ± {r['psnr_std']:.2f} | {r['ssim']:.4f} ± {r['ssim_std']:.4f} "
                     f"| {r['ms_ssim']:.4f} ± {r['ms_ssim_std']:.4f} |")
    return "\n".join(lines)


def stats_markdown(res: dict) -> str:
    lines = [f"student `{res['student']}`, teacher `{res['teacher']}`, {len(res['images'])} images", "",
             "| size | student mean | student std | teacher mean | teacher std | KL(T‖S) | JS |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['size']} | {r['student_mean']:.4f} | {r['student_std']:.4f} | {r['teacher_mean']:.4f} "
                     f"| {r['teacher_std']:.4f} | {r['kl']:.5f} | {r['js']:.5f} |")
    return "\n".join(lines)


UNITS = {"psnr": "PSNR (dB)", "mse": "MSE (pixel values in [0, 1])", "ssim": "SSIM", "ms_ssim": "MS-SSIM"}


def plot_sweep(res: dict, path: Path, metric: str = "psnr") -> None:
    """Metric vs scale, one line per (model, decoder), mean +- std over the images: the paper's Fig. 3
    (matplotlib, vaepack.plots)."""
    from vaepack.plots import Series, line_chart

    series: dict[str, Series] = {}
    for r in res["rows"]:
        s = series.setdefault(f"{r['model']} -> {r['decoder']}", Series(f"{r['model']} -> {r['decoder']}", [], []))
        s.points.append((r["scale"], r[metric]))
        s.errors.append(r.get(metric + "_std"))
    n = len(res["images"])
    crop = f", {res['crop']} px center crops" if res.get("crop") else ""
    line_chart(path, [(list(series.values()), "input scale (x image side, upsampled before encoding)",
                       UNITS.get(metric, metric), f"{UNITS.get(metric, metric).split(' (')[0]} vs input scale "
                       f"(mean \u00b1 std over {n} image{'s' if n != 1 else ''}{crop})")])


def plot_stats(res: dict, path: Path) -> None:
    """Latent mean/std per input size for student and teacher (Fig. 5), and KL/JS between the fitted
    Gaussians (Fig. 6), as two panels."""
    from vaepack.plots import Series, line_chart

    rows = res["rows"]
    size = "input size (px, square)"
    moments = [Series(f"{who} {what}", [(r["size"], r[f"{who}_{what}"]) for r in rows])
               for who in ("student", "teacher") for what in ("mean", "std")]
    div = [Series("KL(T\u2016S) (Eq. 2)", [(r["size"], r["kl"]) for r in rows]),
           Series("JS(T, S)", [(r["size"], r["js"]) for r in rows])]
    positive = all(r["kl"] > 0 and r["js"] > 0 for r in rows)
    line_chart(path, [(moments, size, "latent value (diffusion latent units)",
                       f"latent statistics: {res['student']} vs {res['teacher']}"),
                      (div, size, "divergence (nats)" + (", log scale" if positive else ""),
                       "divergence between the fitted Gaussians")], logy=[False, positive])
