"""vaepack.metrics against scikit-image (the reference implementation) and MS-SSIM sanity checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vaepack import metrics as M
from vaepack.errors import ImageError

skm = pytest.importorskip("skimage.metrics")

DEV = Path("/work/shared/data/dev")


def _np(x: torch.Tensor) -> np.ndarray:
    return x.permute(1, 2, 0).double().numpy()


def _sk_ssim(a, b) -> float:
    return skm.structural_similarity(_np(a), _np(b), gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1, channel_axis=2)


def _pairs():
    g = torch.Generator().manual_seed(0)
    out = []
    a = torch.rand(3, 40, 57, generator=g)
    out.append(("random", a, torch.rand(3, 40, 57, generator=g)))
    out.append(("noisy", a, (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)))
    out.append(("min-size", torch.rand(3, 11, 11, generator=g), torch.rand(3, 11, 11, generator=g)))
    if DEV.is_dir():
        from vaepack.io import load_image

        for i, p in enumerate(sorted(DEV.glob("*.png"))[:3]):
            x = load_image(p)[:, :96, :128]
            for sigma in (0.01, 0.05):
                noise = sigma * torch.randn(x.shape, generator=g)
                out.append((f"{p.name}-{sigma}", x, (x + noise).clamp(0, 1)))
            # A blur-like distortion (structure change, no noise) as well.
            y = torch.nn.functional.avg_pool2d(x[None], 3, 1, 1, count_include_pad=False)[0]
            out.append((f"{p.name}-blur", x, y))
    return out


@pytest.mark.parametrize("name,a,b", _pairs(), ids=lambda v: v if isinstance(v, str) else "")
def test_against_skimage(name, a, b):
    assert M.mse(a, b) == pytest.approx(skm.mean_squared_error(_np(a), _np(b)), rel=1e-9, abs=1e-12)
    assert M.psnr(a, b) == pytest.approx(skm.peak_signal_noise_ratio(_np(a), _np(b), data_range=1), abs=1e-6)
    assert abs(M.ssim(a, b) - _sk_ssim(a, b)) < 1e-4


def test_batch_reduction():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 3, 24, 24, generator=g), torch.rand(3, 3, 24, 24, generator=g)
    per = M.ssim(a, b, reduction="none")
    assert len(per) == 3
    for i in range(3):
        assert per[i] == pytest.approx(_sk_ssim(a[i], b[i]), abs=1e-4)
    assert M.ssim(a, b) == pytest.approx(sum(per) / 3)
    assert M.psnr(a, b) == pytest.approx(sum(M.psnr(a, b, reduction="none")) / 3)


def test_identical_images():
    x = torch.rand(3, 64, 64)
    assert M.mse(x, x) == 0.0
    assert M.psnr(x, x) == math.inf
    assert M.json_psnr(M.psnr(x, x)) == M.PSNR_CAP_DB == 100.0
    assert M.json_psnr(31.5) == 31.5
    d = M.image_metrics(x, x)
    assert set(d) == {"mse", "psnr", "ssim", "ms_ssim"}
    assert d["ssim"] == pytest.approx(1.0) and d["ms_ssim"] == pytest.approx(1.0)
    json.dumps({k: M.json_psnr(v) if k == "psnr" else v for k, v in d.items()}, allow_nan=False)


def test_ms_ssim_monotone_in_noise():
    g = torch.Generator().manual_seed(2)
    if DEV.is_dir():
        from vaepack.io import load_image

        x = load_image(sorted(DEV.glob("*.png"))[0])[:, :192, :192]
    else:
        x = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 192, 192, generator=g), 5, 1, 2)[0]
    noise = torch.randn(x.shape, generator=g)
    vals = [M.ms_ssim(x, (x + s * noise).clamp(0, 1)) for s in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert vals[0] == pytest.approx(1.0)
    assert all(v1 > v2 for v1, v2 in zip(vals, vals[1:])), vals
    assert all(0.0 <= v <= 1.0 + 1e-12 for v in vals)


def test_ms_ssim_scales_for_small_images():
    assert M.ms_ssim_scales(256, 256) == 5
    assert M.ms_ssim_scales(176, 300) == 5
    assert M.ms_ssim_scales(175, 300) == 4
    assert M.ms_ssim_scales(11, 11) == 1
    x = torch.rand(3, 11, 11)
    y = (x + 0.1).clamp(0, 1)
    # One scale with weight renormalized to 1 is plain SSIM (clamped at 0).
    assert M.ms_ssim(x, y) == pytest.approx(max(M.ssim(x, y), 0.0))
    with pytest.raises(ImageError):
        M.ms_ssim_scales(10, 100)


def test_bad_input():
    with pytest.raises(ImageError):
        M.psnr(torch.rand(3, 16, 16), torch.rand(3, 16, 17))
    with pytest.raises(ImageError):
        M.ssim(torch.rand(3, 8, 8), torch.rand(3, 8, 8))
    with pytest.raises(ImageError):
        M.mse(torch.rand(16, 16), torch.rand(16, 16))
