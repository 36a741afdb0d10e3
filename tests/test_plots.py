"""Charts (vaepack.plots, matplotlib) and the labeled --compare image: every chart is written, and
without matplotlib `--plot` is one line with the install hint while `--compare` falls back to the
unlabeled image and says so once. No model runs except TAEF2 on two 64 px images."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vaepack import analysis, plots
from vaepack.bench import report, schema

MPL = ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg",
       "matplotlib.pyplot")


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make every `import matplotlib...` fail, as on an install without the plot extra."""
    for name in MPL:
        monkeypatch.setitem(sys.modules, name, None)


def _png(path) -> tuple[int, int]:
    im = Image.open(path)
    assert im.format == "PNG"
    return im.size


def bench_result(quality: bool = True) -> dict:
    rows = []
    for backend, prec in (("torch", "fp32"), ("openvino", "bf16")):
        for part in ("encoder", "decoder"):
            for scale in (1.0, 1.5):
                lat = 10.0 * scale * (0.5 if backend == "openvino" else 1)
                rows.append(schema.empty_row(
                    model="taef2", part=part, network="taef2", decoder="taef2", backend=backend, precision=prec,
                    device="cpu", size=64, scale=scale, batch=1, runs=3, latency_ms_median=lat,
                    latency_ms_p90=lat * 1.1, latency_ms_min=lat * 0.9, throughput_img_s=1e3 / lat,
                    params=1000, flops_per_image=1e6, psnr=28.0 + scale if quality else None,
                    haarpsi=0.8 if quality else None, quality_images=2 if quality else None))
    rows.append(schema.empty_row(model="taef2", part="encoder", network="taef2", backend="tensorrt",
                                 precision="fp32", device="cpu", size=64, scale=1.0, batch=1,
                                 status="skipped", reason="no GPU"))
    return {"kind": "bench", "machine": {"cpu": "Test CPU", "threads": 2}, "rows": rows}


def rd_result() -> dict:
    rows = [{"codec": "latent", "variant": v, "quality_setting": None, "model": "taef2", "decoder": "taef2",
             "scale": 1.0, "bpp": b, "psnr": p, "ssim": 0.9, "ms_ssim": 0.95, "haarpsi": h, "gmsd": 0.05,
             "images": 2} for v, b, p, h in (("fp16", 4.0, 30.0, 0.9), ("q8", 1.0, 29.5, 0.88))]
    rows += [{"codec": "jpeg", "variant": f"q{q}", "quality_setting": q, "model": None, "decoder": None,
              "scale": None, "bpp": q / 40, "psnr": 25 + q / 10, "ssim": 0.9, "ms_ssim": 0.9, "images": 2}
             for q in (10, 50, 90)]  # no haarpsi: an older file; the HaarPSI panel leaves it out
    return {"kind": "rd", "machine": {"cpu": "Test CPU", "threads": 2}, "rows": rows}


def test_every_chart_is_written(tmp_path):
    report.plot(bench_result(), tmp_path / "bench.png")  # bars + PSNR vs remap scale
    report.plot(bench_result(quality=False), tmp_path / "backends.png")  # bars only
    report.plot(rd_result(), tmp_path / "rd.png")
    sweep = {"images": ["a", "b"], "crop": None, "rows": [
        {"model": m, "decoder": "taef2", "scale": s, "psnr": 25 + s + (m == "taef2"), "psnr_std": 1.0}
        for m in ("default", "taef2") for s in (0.5, 1, 1.5, 2)]}
    analysis.plot_sweep(sweep, tmp_path / "sweep.png")
    stats = {"student": "default", "teacher": "taef2", "rows": [
        {"size": s, "student_mean": 0.01, "student_std": 1.0, "teacher_mean": 0.02, "teacher_std": 1.1,
         "kl": 0.01 * 64 / s, "js": 0.003 * 64 / s} for s in (64, 128, 256)]}
    analysis.plot_stats(stats, tmp_path / "stats.png")
    sizes = {name: _png(tmp_path / f"{name}.png") for name in ("bench", "backends", "rd", "sweep", "stats")}
    assert all(w >= 500 and h >= 250 for w, h in sizes.values()), sizes
    assert sizes["bench"][0] > sizes["backends"][0]  # the quality panel sits beside the bars
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temp files


def test_line_chart_marks_points_and_puts_ticks_at_measured_values(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plots._draw_lines(ax, [plots.Series("a", [(1.25, 2.0), (1, 1.0), (2, 3.0)])], "scale (x)", "PSNR (dB)", "t")
    (line,) = ax.get_lines()
    assert line.get_marker() == "o" and list(line.get_xdata()) == [1, 1.25, 2]  # sorted, each point marked
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "1.25", "2"]
    assert ax.get_xlabel() == "scale (x)" and ax.get_ylabel() == "PSNR (dB)" and ax.get_legend() is not None


def test_plot_without_matplotlib_is_one_line_with_the_hint(no_matplotlib, tmp_path, run_cli, clean_error):
    with pytest.raises(Exception, match=r"pip install 'vaepack\[plot\]'"):
        report.plot(bench_result(), tmp_path / "x.png")
    # the commands refuse before measuring anything (no model is loaded: the model id is not even looked up)
    for args in (("bench", "--models", "taef2", "--sizes", "16", "--repeat", "1", "--plot", tmp_path / "b.png"),
                 ("sweep", tmp_path, "--plot", tmp_path / "s.png"),
                 ("latent-stats", tmp_path, "--plot", tmp_path / "l.png")):
        code, out, err = run_cli(*args)
        assert code == 1
        clean_error(err, "matplotlib", "pip install 'vaepack[plot]'")
    assert not list(tmp_path.glob("*.png"))


def test_compare_image_is_labeled_with_exact_pixels(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 30, 40, generator=g)
    y = (x + 0.05).clamp(0, 1)
    assert plots.save_compare(tmp_path / "c.png", x, y, 31.234) is None
    k, band = plots.compare_layout(30, 40)
    a = np.asarray(Image.open(tmp_path / "c.png"))
    assert a.shape == (30 * k + band, 80 * k, 3)
    q = (torch.cat([x, y], -1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(a[band::k, ::k], q)  # both images, pixel for pixel (enlarged k x)
    assert (a[:band] < 128).any()  # the caption band holds text
    big = torch.rand(3, 100, 700, generator=g)
    assert plots.save_compare(tmp_path / "big.jpg", big, big, float("inf")) is None
    assert Image.open(tmp_path / "big.jpg").format == "JPEG" and Image.open(tmp_path / "big.jpg").size == (1400, 130)


def test_compare_falls_back_to_unlabeled_without_matplotlib(no_matplotlib, tmp_path, run_cli, shared_weights,
                                                             one_thread):
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    d.mkdir()
    for i in range(2):
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    code, out, err = run_cli("roundtrip", d, "-m", "taef2", "--backend", "torch", "--compare", tmp_path / "cmp",
                             "--json")
    assert code == 0, err
    assert err.count("unlabeled") == 1 and "pip install 'vaepack[plot]'" in err  # said once, not per image
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["0.compare.png", "1.compare.png"]
    assert Image.open(tmp_path / "cmp" / "0.compare.png").size == (128, 48)  # the plain side-by-side
    rep = json.loads(out)
    for r in rep["ok"]:
        assert 0 < r["haarpsi"] < 1 and r["gmsd"] > 0  # the perceptual indices are in the JSON ...
    assert rep["mean"]["haarpsi"] == pytest.approx(sum(r["haarpsi"] for r in rep["ok"]) / 2)  # ... and the mean
