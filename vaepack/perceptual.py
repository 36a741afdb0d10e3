"""Weight-free perceptual indices next to PSNR/SSIM: HaarPSI and GMSD, on float images in [0, 1].

PSNR rewards blur and SSIM barely sees texture loss, so a decoder that invents plausible detail
(diffusion decoders) or a remapped encode is not judged by them alone. Both indices below need no
downloaded weights and correlate with human ratings far better than PSNR on TID2013/CSIQ/LIVE
(HaarPSI: Reisenhofer et al. 2018, Table 3; GMSD: Xue et al. 2014, Table III).

- ``haarpsi`` (Reisenhofer, Bosse, Kutyniok & Wiegand, "A Haar wavelet-based perceptual similarity
  index for image quality assessment", Signal Processing: Image Communication 61, 2018): in (0, 1],
  **higher is better**, exactly 1 for identical images. Follows the authors' reference code
  (HaarPSI.m): images on the 0..255 scale converted to YIQ (Y = .299 R + .587 G + .114 B), both
  subsampled 2x (2x2 mean), Haar filters of 2, 4 and 8 px on Y (horizontal and vertical); the local
  similarity is (2 a b + C) / (a^2 + b^2 + C) of the magnitudes at the two finest scales (averaged),
  weighted by the larger coarsest-scale magnitude of the two images; I and Q add a third,
  2x2-mean-based similarity weighted by the mean of the two luminance weights; the weighted mean of
  sigmoid(alpha * similarity) is mapped back with the logit and squared. C = 30, alpha = 4.2 (paper
  Sec. 3). Checked against the value the authors' MATLAB code gives on TID2013 I01 vs i01_01_5
  (0.71706527, quoted by piq's tests): ours is 0.71706527 (piq 0.7170365).
- ``gmsd`` (Xue, Zhang, Mou & Bovik, "Gradient magnitude similarity deviation: a highly efficient
  perceptual image quality index", IEEE TIP 23(2), 2014): >= 0, **lower is better**, exactly 0 for
  identical images. Luminance Y (as above, 0..255), 2x2 mean + 2x subsampling, Prewitt gradients
  (3x3, /3), gradient magnitude similarity (2 m_r m_d + T) / (m_r^2 + m_d^2 + T) with T = 170, and
  its standard deviation over the map, divided by N-1 as the authors' MATLAB code does (``std2``;
  the paper's Eq. 8 writes 1/N, a relative difference of 1/(2N): under 1e-5 from 256x256 px up; a
  one-pixel map, images of at most 2x2 px, has deviation 0). Checked against the MATLAB values quoted
  by piq's tests: goldhill JPEG 0.138012587 and TID2013 i01_01_5 0.094124656, ours 0.138012587 and
  0.094124656 (piq itself divides by N: 0.1380115, 0.0941237).

Conventions (shared with vaepack.metrics): inputs are (3, H, W) or (N, 3, H, W) tensors or numpy
arrays in [0, 1] (one channel = grayscale: Y only, HaarPSI without its chroma term); computed in
float64 on the CPU; per image, ``reduction="mean"`` averages over the batch, ``"none"`` gives a list.
Both indices are symmetric in their arguments.

Borders and small images: the reference code filters with MATLAB ``conv2(..., 'same')``, i.e. zero
padding, and so do we (bit-for-bit the same alignment for the even-sized Haar filters). That defines
both indices at **every** size, 1x1 px included, so no image is left out: identical images give 1
(HaarPSI) and 0 (GMSD) at any size. But below 16x16 px for HaarPSI (its 8 px coarsest filter at
half resolution) and 6x6 px for GMSD (the 3x3 Prewitt filter at half resolution) the zero border
covers most of each filter's support, so such values are comparable only with each other
(``SMALL_BELOW`` holds the two sizes; piq refuses HaarPSI under 16 px instead). A pair with no
luminance structure at all (both images black) has no HaarPSI weights; its score is then the plain
mean of the local terms (1 for identical images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vaepack.errors import ImageError
from vaepack.metrics import _prep, _reduce

HAARPSI_C = 30.0  # paper Sec. 3 (0..255 scale): chosen on the training split of LIVE/TID2008
HAARPSI_ALPHA = 4.2
HAARPSI_SCALES = 3  # Haar filters of 2, 4, 8 px at half resolution; the third gives the weights
GMSD_T = 170.0  # paper Sec. III-C (0..255 scale)
SMALL_BELOW = {"haarpsi": 16, "gmsd": 6}  # px per side under which the zero border dominates (see above)
KEYS = ("haarpsi", "gmsd")
HIGHER_IS_BETTER = {"haarpsi": True, "gmsd": False}

# RGB -> YIQ (NTSC), the matrix of the reference code (and of MATLAB's rgb2ntsc, to 3 decimals)
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))

__all__ = ["haarpsi", "gmsd", "perceptual_metrics", "KEYS", "HIGHER_IS_BETTER", "SMALL_BELOW", "HAARPSI_C",
           "HAARPSI_ALPHA", "GMSD_T"]


def _yiq255(x: torch.Tensor, chroma: bool) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> YIQ (or Y alone) on the 0..255 scale the constants are tuned for."""
    c = x.shape[1]
    if c == 1:
        return x * 255.0
    if c != 3:
        raise ImageError(f"perceptual indices need 1 (gray) or 3 (RGB) channels, got {c}")
    m = torch.tensor(_YIQ if chroma else _YIQ[:1], dtype=x.dtype)
    return torch.einsum("kc,nchw->nkhw", m, x) * 255.0


def _subsample(x: torch.Tensor) -> torch.Tensor:
    """The reference code's 2x subsampling: ``conv2(x, ones(2)/4, 'same')`` then every other pixel,
    i.e. 2x2 means with a zero row/column added to an odd size."""
    h, w = x.shape[-2:]
    return F.avg_pool2d(F.pad(x, (0, w % 2, 0, h % 2)), 2)


class _Boxes:
    """Sums of x over axis-aligned boxes around every pixel, zero outside the image, from one
    integral image: O(1) per pixel whatever the box size (float64 conv2d has no fast CPU kernel, and
    the 8x8 Haar filter made HaarPSI of a 6 MP photo take 9 s)."""

    def __init__(self, x: torch.Tensor, pad: int):
        self.p, (self.h, self.w) = pad, x.shape[-2:]
        s = F.pad(x, (pad, pad, pad, pad)).cumsum(-2).cumsum(-1)
        self.s = F.pad(s, (1, 0, 1, 0))  # s[a, b] = sum of the padded x[:a, :b]

    def __call__(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Per pixel (i, j): the sum of x[i+r0 .. i+r1, j+c0 .. j+c1] (inclusive)."""
        s, p, h, w = self.s, self.p, self.h, self.w
        a, b, c, d = r0 + p, r1 + p + 1, c0 + p, c1 + p + 1
        return (s[..., b:b + h, d:d + w] - s[..., a:a + h, d:d + w] - s[..., b:b + h, c:c + w]
                + s[..., a:a + h, c:c + w])


def _haar_magnitudes(lum: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """|coefficients| of the reference code's Haar filters on (N, 1, H, W): (orientation, scale k) ->
    map. The filter at scale k is 2^-k * ones(2^k, 2^k) with its top half negated (orientation 0) or
    its transpose (1), applied as MATLAB ``conv2(.., 'same')``: for an even size s the output at i
    covers inputs i-s/2+1 .. i+s/2, so the coefficient is 2^-k times the difference of the two
    half-boxes i-s/2+1 .. i and i+1 .. i+s/2 (the sign, which the kernel flip decides, drops out)."""
    box = _Boxes(lum, 2 ** (HAARPSI_SCALES - 1))
    out = {}
    for k in range(1, HAARPSI_SCALES + 1):
        h = 2 ** (k - 1)  # half the filter size
        lo, hi, full = (-h + 1, 0), (1, h), (-h + 1, h)
        out[0, k] = ((box(*lo, *full) - box(*hi, *full)) * 2.0 ** -k).abs()
        out[1, k] = ((box(*full, *lo) - box(*full, *hi)) * 2.0 ** -k).abs()
    return out


def _similarity(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    return (2 * a * b + c) / (a * a + b * b + c)


def _haarpsi(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image HaarPSI of (N, C, H, W) float64 images in [0, 1] -> (N,)."""
    chroma = x.shape[1] == 3
    xs, ys = _subsample(_yiq255(x, chroma)), _subsample(_yiq255(y, chroma))
    cx, cy = _haar_magnitudes(xs[:, :1]), _haar_magnitudes(ys[:, :1])
    sims, weights = [], []
    for o in (0, 1):
        weights.append(torch.maximum(cx[o, HAARPSI_SCALES], cy[o, HAARPSI_SCALES]))
        sims.append(sum(_similarity(cx[o, k], cy[o, k], HAARPSI_C) for k in range(1, HAARPSI_SCALES))
                    / (HAARPSI_SCALES - 1))
    if chroma:  # |conv2(I, ones(2)/4, 'same')|: the mean of pixels i..i+1, j..j+1
        ix, iy = (_Boxes(im[:, 1:], 1)(0, 1, 0, 1).abs() / 4 for im in (xs, ys))
        sims.append(_similarity(ix, iy, HAARPSI_C).mean(1, keepdim=True))  # I and Q averaged
        weights.append((weights[0] + weights[1]) / 2)
    s, w = torch.cat(sims, 1), torch.cat(weights, 1)
    total = w.flatten(1).sum(1)
    w = torch.where(total.view(-1, 1, 1, 1) > 0, w, torch.ones_like(w))  # both black: plain mean
    score = (torch.sigmoid(HAARPSI_ALPHA * s) * w).flatten(1).sum(1) / w.flatten(1).sum(1)
    return (torch.log(score / (1 - score)) / HAARPSI_ALPHA) ** 2


def _gmsd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image GMSD of (N, C, H, W) float64 images in [0, 1] -> (N,)."""
    mags = []
    for im in (x, y):
        box = _Boxes(_subsample(_yiq255(im, chroma=False)), 1)
        # Prewitt [1 0 -1; 1 0 -1; 1 0 -1] / 3 and its transpose, zero padded ('same')
        gx = (box(-1, 1, -1, -1) - box(-1, 1, 1, 1)) / 3
        gy = (box(-1, -1, -1, 1) - box(1, 1, -1, 1)) / 3
        mags.append(torch.sqrt(gx * gx + gy * gy))
    gms = _similarity(mags[0], mags[1], GMSD_T).flatten(1)
    n = gms.shape[1]
    if n == 1:  # a 1-pixel map (images of at most 2x2 px) has no deviation
        return torch.zeros(gms.shape[0], dtype=gms.dtype)
    return ((gms - gms.mean(1, keepdim=True)).pow(2).sum(1) / (n - 1)).sqrt()  # std2, as the MATLAB code


def haarpsi(a, b, reduction: str = "mean"):
    """HaarPSI in (0, 1], higher is better, 1 for identical images (see the module docstring)."""
    x, y = _prep(a, b)
    return _reduce(_haarpsi(x, y), reduction)


def gmsd(a, b, reduction: str = "mean"):
    """GMSD >= 0, lower is better, 0 for identical images (see the module docstring)."""
    x, y = _prep(a, b)
    return _reduce(_gmsd(x, y), reduction)


def perceptual_metrics(a, b) -> dict[str, float]:
    """Both indices (batch means) as plain floats: ``{"haarpsi": ..., "gmsd": ...}``. Defined at every
    image size (see the module docstring), so unlike SSIM nothing is ever left out."""
    x, y = _prep(a, b)
    out = {"haarpsi": _reduce(_haarpsi(x, y), "mean"), "gmsd": _reduce(_gmsd(x, y), "mean")}
    for k, v in out.items():
        if not math.isfinite(v):  # cannot happen for images in [0, 1]; refuse rather than write NaN
            raise ImageError(f"{k} is not finite ({v}); are the images in [0, 1]?")
    return out
