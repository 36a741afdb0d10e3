"""HaarPSI and GMSD (vaepack.perceptual): the authors' reference code re-done naively here (numpy,
explicit MATLAB conv2 'same'), recorded reference values, identical images, noise monotonicity,
and every image size (the zero-padded definition)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vaepack import perceptual as P
from vaepack.errors import ImageError


# --------------------------------------------------------------------------- the reference code, naively
def conv2_same(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """MATLAB conv2(a, k, 'same'), straight from its definition: the full convolution (zero outside
    a), then its central part starting at floor(size(k)/2)."""
    h, w = a.shape
    kh, kw = k.shape
    full = np.zeros((h + kh - 1, w + kw - 1))
    for u in range(kh):
        for v in range(kw):
            full[u:u + h, v:v + w] += k[u, v] * a
    return full[kh // 2:kh // 2 + h, kw // 2:kw // 2 + w]


def subsample(a: np.ndarray) -> np.ndarray:
    return conv2_same(a, np.ones((2, 2)) / 4)[::2, ::2]


def yiq(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = rgb * 255.0
    return (0.299 * r + 0.587 * g + 0.114 * b, 0.596 * r - 0.274 * g - 0.322 * b, 0.211 * r - 0.523 * g + 0.312 * b)


def ref_haarpsi(x: np.ndarray, y: np.ndarray, c: float = 30.0, alpha: float = 4.2) -> float:
    """HaarPSI.m for RGB images (3, H, W) in [0, 1], with preprocessing (2x subsampling)."""
    (yx, ix, qx), (yy, iy, qy) = ([subsample(ch) for ch in yiq(im)] for im in (x, y))

    def haar(a):
        out = []
        for ori in range(2):
            for k in (1, 2, 3):
                f = 2.0 ** -k * np.ones((2 ** k, 2 ** k))
                f[: 2 ** (k - 1)] *= -1
                out.append(conv2_same(a, f if ori == 0 else f.T))
        return out  # [h1, h2, h3, v1, v2, v3]

    cx, cy = haar(yx), haar(yy)
    sim = lambda a, b: (2 * a * b + c) / (a * a + b * b + c)  # noqa: E731
    weights, local = [], []
    for ori in range(2):
        weights.append(np.maximum(np.abs(cx[3 * ori + 2]), np.abs(cy[3 * ori + 2])))
        local.append(sum(sim(np.abs(cx[3 * ori + k]), np.abs(cy[3 * ori + k])) for k in (0, 1)) / 2)
    box = np.ones((2, 2)) / 4
    si = sim(np.abs(conv2_same(ix, box)), np.abs(conv2_same(iy, box)))
    sq = sim(np.abs(conv2_same(qx, box)), np.abs(conv2_same(qy, box)))
    local.append((si + sq) / 2)
    weights.append((weights[0] + weights[1]) / 2)
    sig = 1 / (1 + np.exp(-alpha * np.stack(local)))
    w = np.stack(weights)
    score = (sig * w).sum() / w.sum()
    return float((np.log(score / (1 - score)) / alpha) ** 2)


def ref_gmsd(x: np.ndarray, y: np.ndarray, t: float = 170.0) -> float:
    """GMSD.m: luminance, 2x subsampling, Prewitt, std2 of the GMS map."""
    dx = np.array([[1.0, 0, -1]] * 3) / 3
    mags = []
    for im in (x, y):
        lum = subsample(yiq(im)[0])
        mags.append(np.sqrt(conv2_same(lum, dx) ** 2 + conv2_same(lum, dx.T) ** 2))
    gms = (2 * mags[0] * mags[1] + t) / (mags[0] ** 2 + mags[1] ** 2 + t)
    return float(np.std(gms, ddof=1))


def formula_pair(h: int = 40, w: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic photo-like pair (no RNG, so the recorded values never move)."""
    i = torch.arange(h, dtype=torch.float64).view(h, 1)
    j = torch.arange(w, dtype=torch.float64).view(1, w)
    x = torch.stack([0.5 + 0.4 * torch.sin(i / 3 + j / 5), 0.5 + 0.3 * torch.cos(i * j / 40), (i + j) / (h + w)])
    y = (x + 0.08 * torch.sin(7 * i + 3 * j) * torch.cos(5 * j)).clamp(0, 1)
    return x, y


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("h,w,seed", [(40, 48, 0), (19, 23, 1), (17, 16, 2), (7, 9, 3), (2, 3, 4)])
def test_matches_the_reference_code(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, h, w, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert P.haarpsi(y, x) == pytest.approx(ref_haarpsi(x.numpy(), y.numpy()), abs=1e-12)
    assert P.gmsd(y, x) == pytest.approx(ref_gmsd(x.numpy(), y.numpy()), abs=1e-12)


def test_recorded_reference_values():
    """Values of a fixed pair. piq 0.8.0 (float64 input) gives HaarPSI 0.9578863688 and GMSD
    0.0102395237, which divides by N instead of the MATLAB code's N-1: times sqrt(N/(N-1)), N = 480
    (the 20x24 half-resolution map), that is 0.0102502066. The authors' MATLAB values on piq's test
    images (TID2013 I01 vs i01_01_5: HaarPSI 0.71706527, GMSD 0.094124656; goldhill JPEG: GMSD
    0.138012587) are matched to 8 digits (checked by hand; the images are not shipped here)."""
    x, y = formula_pair()
    assert P.haarpsi(y, x) == pytest.approx(0.9578863700371806, abs=1e-12)
    assert P.haarpsi(y, x) == pytest.approx(0.9578863688, abs=2e-9)  # piq
    assert P.gmsd(y, x) == pytest.approx(0.01025020659758865, abs=1e-14)
    assert P.gmsd(y, x) == pytest.approx(0.0102395237 * math.sqrt(480 / 479), abs=1e-10)  # piq, rescaled
    # grayscale: the luminance alone, HaarPSI without its chroma term
    assert P.haarpsi(y[:1], x[:1]) == pytest.approx(0.9653758378640537, abs=1e-12)
    assert P.gmsd(y[:1], x[:1]) == pytest.approx(0.006470312093127585, abs=1e-14)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 2), (5, 5), (9, 13), (16, 16), (40, 48)])
def test_identical_images_give_the_documented_values_at_every_size(h, w):
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    assert P.haarpsi(x, x, reduction="none") == pytest.approx([1.0, 1.0], abs=1e-12)
    assert P.gmsd(x, x, reduction="none") == [0.0, 0.0]
    black = torch.zeros(3, h, w)  # no luminance structure at all: the unweighted mean, still 1
    assert P.haarpsi(black, black) == pytest.approx(1.0, abs=1e-12) and P.gmsd(black, black) == 0.0
    assert set(P.perceptual_metrics(x, x)) == set(P.KEYS)


def test_monotone_under_added_noise():
    x, _ = formula_pair(64, 64)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h, g = [], []
    for sigma in (0.0, 0.01, 0.03, 0.1, 0.3):
        y = (x + sigma * noise).clamp(0, 1)
        h.append(P.haarpsi(y, x))
        g.append(P.gmsd(y, x))
    assert h[0] == pytest.approx(1.0) and g[0] == 0.0
    assert all(a > b for a, b in zip(h, h[1:])), h  # higher is better
    assert all(a < b for a, b in zip(g, g[1:])), g  # lower is better
    assert P.HIGHER_IS_BETTER == {"haarpsi": True, "gmsd": False}


def test_symmetric_batched_and_numpy():
    x, y = formula_pair()
    assert P.haarpsi(x, y) == pytest.approx(P.haarpsi(y, x), abs=1e-14)
    assert P.gmsd(x, y) == pytest.approx(P.gmsd(y, x), abs=1e-14)
    per = P.haarpsi(torch.stack([y, x]), torch.stack([x, x]), reduction="none")
    assert per[0] == pytest.approx(P.haarpsi(y, x)) and per[1] == pytest.approx(1.0)
    assert P.gmsd(y.numpy(), x.numpy()) == pytest.approx(P.gmsd(y, x))
    m = P.perceptual_metrics(y.float(), x.float())
    assert m["haarpsi"] == pytest.approx(P.haarpsi(y, x), abs=1e-6)
    assert m["gmsd"] == pytest.approx(P.gmsd(y, x), abs=1e-6)


def test_bad_input():
    with pytest.raises(ImageError, match="channels"):
        P.haarpsi(torch.rand(4, 8, 8), torch.rand(4, 8, 8))
    with pytest.raises(ImageError, match="shapes"):
        P.gmsd(torch.rand(3, 8, 8), torch.rand(3, 8, 9))
