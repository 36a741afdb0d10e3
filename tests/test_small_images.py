"""Images under SSIM's 11x11 window: the metrics that are defined are reported, SSIM and MS-SSIM are
named as unavailable with the reason (README, "roundtrip --json"), instead of failing the image."""

from __future__ import annotations

import json

import pytest
import torch

from vaepack import metrics as M
from vaepack.errors import ImageError


def test_unavailable_metrics_names_the_size():
    assert M.unavailable_metrics(11, 11) == {}
    gaps = M.unavailable_metrics(9, 13)
    assert set(gaps) == {"ssim", "ms_ssim"}
    assert all("11x11" in why and "13x9" in why for why in gaps.values())
    assert set(M.unavailable_metrics(64, 10)) == {"ssim", "ms_ssim"}


def test_image_metrics_of_a_small_image_keeps_mse_and_psnr():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 9, 13, generator=g)
    y = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    d = M.image_metrics(y, x)
    assert set(d) == {"mse", "psnr"}
    assert d["mse"] == pytest.approx(M.mse(y, x)) and d["psnr"] == pytest.approx(M.psnr(y, x))
    with pytest.raises(ImageError, match="11x11"):  # the metric itself still refuses, as documented
        M.ssim(y, x)
    big = M.image_metrics(torch.rand(3, 11, 11, generator=g), torch.rand(3, 11, 11, generator=g))
    assert list(big) == ["mse", "psnr", "ssim", "ms_ssim"]


def _photo(path, w, h, seed):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(path)
    return path


def test_roundtrip_json_of_a_small_photo(run_cli, tmp_path, one_thread):
    small = _photo(tmp_path / "small.png", 13, 9, 0)
    code, out, err = run_cli("roundtrip", small, "--backend", "torch", "--json")
    assert code == 0, err
    res = json.loads(out)
    (r,) = res["ok"]
    assert r["size"] == [13, 9] and r["mse"] > 0 and isinstance(r["psnr"], float)
    assert "ssim" not in r and "ms_ssim" not in r  # left out, never null (null means an infinite PSNR)
    assert set(r["unavailable"]) == {"ssim", "ms_ssim"} and "11x11" in r["unavailable"]["ssim"]
    assert res["mean"]["psnr"] == pytest.approx(r["psnr"]) and "ssim" not in res["mean"]
    assert res["mean"]["unavailable"] == r["unavailable"]


def test_roundtrip_mixes_small_and_normal_photos(run_cli, tmp_path, one_thread):
    small = _photo(tmp_path / "small.png", 13, 9, 0)
    big = _photo(tmp_path / "big.png", 24, 16, 1)
    code, out, err = run_cli("roundtrip", small, big, "--backend", "torch", "--json")
    assert code == 0, err
    res = json.loads(out)
    s, b = res["ok"]
    assert "unavailable" not in b and isinstance(b["ssim"], float)
    # each metric's mean is over the photos that report it
    assert res["mean"]["ssim"] == pytest.approx(b["ssim"])
    assert res["mean"]["psnr"] == pytest.approx((s["psnr"] + b["psnr"]) / 2)
    assert "unavailable" not in res["mean"]
    # the table marks the missing metrics and says why on stderr, naming the file
    code, out, err = run_cli("roundtrip", small, big, "--backend", "torch")
    assert code == 0, err
    assert "small.png" in out and "11x11" in err and str(small) in err
