"""sweep (paper Table I) and latent-stats (paper Eq. 2, Fig. 5/6) produce their documented fields."""

from __future__ import annotations

import json
import math

import pytest

from vaepack.analysis import gaussian_js, gaussian_kl


def test_gaussian_kl_matches_eq2_and_js_bounds():
    assert gaussian_kl(0.0, 1.0, 0.0, 1.0) == 0.0
    # Eq. 2 by hand: log(2/1) + (1 + 1) / (2*4) - 1/2
    assert gaussian_kl(0.0, 1.0, 1.0, 2.0) == pytest.approx(math.log(2) + 2 / 8 - 0.5)
    assert gaussian_js(0.0, 1.0, 0.0, 1.0) == pytest.approx(0.0, abs=1e-9)
    # JS is symmetric and bounded by ln 2 (disjoint distributions).
    assert gaussian_js(0.0, 1.0, 1.0, 2.0) == pytest.approx(gaussian_js(1.0, 2.0, 0.0, 1.0), rel=1e-6)
    assert gaussian_js(0.0, 1.0, 100.0, 1.0) == pytest.approx(math.log(2), rel=1e-4)


@pytest.fixture
def two_crops(tmp_path, shared_weights, dev_photo):
    from PIL import Image

    im = Image.open(dev_photo).convert("RGB")
    paths = []
    for i, box in enumerate([(0, 0, 96, 80), (100, 60, 196, 140)]):
        p = tmp_path / f"crop{i}.png"
        im.crop(box).save(p)
        paths.append(p)
    return paths


def test_sweep_fields_and_scale_effect(run_cli, two_crops, one_thread):
    code, out, err = run_cli("sweep", *two_crops, "--model", "taef2", "--scales", "1,2", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [r["scale"] for r in res["rows"]] == [1.0, 2.0]
    for r in res["rows"]:
        for k in ("mse", "psnr", "ssim", "ms_ssim"):
            assert r[k] is not None and r[k + "_std"] is not None and r[k + "_std"] >= 0
        assert r["images"] == 2 and r["model"] == "taef2" and r["decoder"] == "taef2"
        assert 15 < r["psnr"] < 60 and 0 < r["ssim"] <= 1
    # Upsampling before encoding and downsampling back cannot make TAEF2 worse on photos by much,
    # and in practice improves it: the remap is a quality knob (paper Table I, teacher column).
    assert res["rows"][1]["psnr"] > res["rows"][0]["psnr"] - 0.5


def test_sweep_crop_measures_the_center_window(run_cli, two_crops, one_thread):
    from vaepack.analysis import sweep

    full = sweep([str(p) for p in two_crops], ["taef2"], [1.0])
    code, out, err = run_cli("sweep", *two_crops, "--model", "taef2", "--scales", "1", "--crop", "48", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["crop"] == 48 and full["crop"] is None and res["rows"][0]["images"] == 2
    assert res["rows"][0]["psnr"] != pytest.approx(full["rows"][0]["psnr"], abs=1e-6)  # a different window was measured
    code, _, err = run_cli("sweep", *two_crops, "--model", "taef2", "--crop", "8")
    assert code == 2 and "--crop" in err


def test_latent_stats_fields(run_cli, two_crops, one_thread, tmp_path):
    plot = tmp_path / "stats.png"
    code, out, err = run_cli("latent-stats", *two_crops, "--model", "taef2", "--teacher", "taef2",
                             "--sizes", "64,128", "--json", "--plot", plot)
    assert code == 0, err
    res = json.loads(out)
    assert [r["size"] for r in res["rows"]] == [64, 128]
    for r in res["rows"]:
        # Same model on both sides: identical statistics, zero divergence.
        assert r["student_mean"] == pytest.approx(r["teacher_mean"])
        assert r["kl"] == pytest.approx(0.0, abs=1e-9) and r["js"] == pytest.approx(0.0, abs=1e-9)
        assert r["teacher_std"] > 0
    assert plot.stat().st_size > 0


def test_latent_stats_refuses_other_space(run_cli, two_crops, clean_error):
    code, out, err = run_cli("latent-stats", *two_crops, "--model", "taesana", "--teacher", "taef2", "--sizes", "64")
    assert code == 2
    clean_error(err, "different latent spaces")
