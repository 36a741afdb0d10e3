"""Image quality metrics: MSE, PSNR, SSIM and MS-SSIM on float images in [0, 1].

Inputs are torch tensors (or numpy arrays) of shape (3, H, W) or (N, 3, H, W), values in [0, 1],
data range 1. Everything is computed in float64 on the CPU, because the reference we check against
(scikit-image) works in float64 and a float32 SSIM drifts by ~1e-5 on smooth photos.

Conventions (the JSON/CLI layers rely on these; see benchmarks/README.md):

- ``psnr`` of identical images is ``float('inf')`` (MSE 0). JSON cannot hold inf, so writers call
  ``json_psnr`` which maps inf to ``PSNR_CAP_DB`` = 100.0 dB (an MSE of 1e-10, far below one 8-bit
  quantization step, so no real round trip reaches it) and finite values are passed through.
- Batches: every metric is computed per image; ``reduction="mean"`` (default) returns the mean over
  the batch as a float, ``reduction="none"`` returns a list with one float per image. For PSNR the
  mean is over per-image PSNR (the usual way papers report it), not the PSNR of the pooled MSE.
- ``ssim`` matches ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=...)``: 11x11 Gaussian window (radius
  int(3.5*1.5+0.5)=5, i.e. scipy's default truncate=3.5), K1=0.01, K2=0.03, per-channel SSIM maps
  averaged over the interior only. skimage filters with reflective padding and then drops the
  5-pixel border of the SSIM map; the interior never touches the padding, so a "valid" convolution
  gives the same numbers exactly (no padding needed). Images must be at least 11x11.
- ``ms_ssim`` follows Wang, Simoncelli & Bovik 2003: 5 scales with weights
  (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), contrast-structure at the first four scales and full
  SSIM at the coarsest, 2x2 average pooling between scales (an odd trailing row/column is dropped).
  Each scale needs the 11-pixel window to fit, so images whose short side is under 11*2**4 = 176
  use the largest number of scales that fits, with the first weights renormalized to sum 1
  (``ms_ssim_scales`` tells how many). Negative cs/SSIM values are clamped to 0 before the power,
  as in the common implementations, so the result is real. Per-channel values are combined over
  scales first and then averaged over channels.
- ``ms_ssim_loss`` is the differentiable training-loss form (1 - MS-SSIM, the input's dtype, per
  image over all channels); the numbers above are the reported metric.
- Images under 11x11 pixels: MSE and PSNR are defined, SSIM and MS-SSIM are not (the window does not
  fit). ``ssim``/``ms_ssim`` raise ImageError; ``image_metrics`` returns the defined metrics only and
  ``unavailable_metrics`` names the missing ones with the reason (the CLI reports both).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from vaepack.errors import ImageError

PSNR_CAP_DB = 100.0
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
K1, K2 = 0.01, 0.03
SIGMA = 1.5
WIN = 11  # 2 * int(3.5 * SIGMA + 0.5) + 1, the window skimage derives from sigma=1.5

__all__ = ["mse", "psnr", "ssim", "ms_ssim", "ms_ssim_scales", "ms_ssim_loss", "gaussian_window",
           "image_metrics", "unavailable_metrics", "json_psnr", "PSNR_CAP_DB", "MS_SSIM_WEIGHTS"]


def _prep(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images as float64 (N, C, H, W) CPU tensors, after checking they are comparable."""
    ts = []
    for x in (a, b):
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise ImageError(f"metrics need tensors or numpy arrays, got {type(x).__name__}")
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4:
            raise ImageError(f"metrics need (C,H,W) or (N,C,H,W) images, got shape {tuple(x.shape)}")
        ts.append(x.detach().to("cpu", torch.float64))
    if ts[0].shape != ts[1].shape:
        raise ImageError(f"cannot compare images of shapes {tuple(ts[0].shape)} and {tuple(ts[1].shape)}")
    return ts[0], ts[1]


def _reduce(per_image: torch.Tensor, reduction: str):
    vals = [float(v) for v in per_image]
    if reduction == "none":
        return vals
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return float(sum(vals) / len(vals))


def mse(a, b, reduction: str = "mean"):
    """Mean squared error per image (over channels and pixels)."""
    x, y = _prep(a, b)
    return _reduce((x - y).pow(2).flatten(1).mean(1), reduction)


def psnr(a, b, reduction: str = "mean"):
    """PSNR in dB with data range 1: 10*log10(1/MSE); ``inf`` for identical images."""
    per = mse(a, b, reduction="none")
    vals = [math.inf if m == 0 else 10.0 * math.log10(1.0 / m) for m in per]
    if reduction == "none":
        return vals
    return _reduce(torch.tensor(vals, dtype=torch.float64), reduction)


def json_psnr(value: float) -> float:
    """PSNR as stored in JSON: inf (identical images) becomes ``PSNR_CAP_DB``."""
    return PSNR_CAP_DB if math.isinf(value) and value > 0 else float(value)


def gaussian_window(dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The 1-D SSIM window: WIN = 11 taps, sigma 1.5, summing to 1, computed in ``dtype`` (so a
    float32 window is bit-identical to one built in float32, as the training loss always did)."""
    t = torch.arange(WIN, dtype=dtype, device=device) - WIN // 2
    g = torch.exp(-0.5 * (t / SIGMA) ** 2)
    return g / g.sum()


def _gauss_1d() -> list[float]:
    return gaussian_window(torch.float64).tolist()


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian, valid region only: (..., H, W) -> (..., H-10, W-10).

    Written as 11 in-place shifted multiply-adds per axis: float64 conv2d has no fast CPU kernel
    (~7x slower here), and out-of-place adds spend most of their time allocating temporaries.
    """
    g = _gauss_1d()
    h, w = x.shape[-2:]
    oh, ow = h - WIN + 1, w - WIN + 1
    acc = x[..., 0:oh, :] * g[0]
    for k in range(1, WIN):
        acc.add_(x[..., k:k + oh, :], alpha=g[k])
    out = acc[..., 0:ow] * g[0]
    for k in range(1, WIN):
        out.add_(acc[..., k:k + ow], alpha=g[k])
    return out


def _ssim_cs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (image, channel) mean SSIM and mean contrast-structure term, each shaped (N, C)."""
    h, w = x.shape[-2:]
    if h < WIN or w < WIN:
        raise ImageError(f"SSIM needs images of at least {WIN}x{WIN} pixels, got {w}x{h}")
    # One batched blur of the five moment images instead of five calls.
    ux, uy, uxx, uyy, uxy = _blur(torch.stack([x, y, x * x, y * y, x * y]))
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy  # population covariance (cov_norm 1)
    c1, c2 = K1 ** 2, K2 ** 2
    cs_map = (2 * vxy + c2) / (vx + vy + c2)
    s_map = (2 * ux * uy + c1) / (ux * ux + uy * uy + c1) * cs_map
    return s_map.mean((-2, -1)), cs_map.mean((-2, -1))


def ssim(a, b, reduction: str = "mean"):
    """Mean SSIM, per channel and averaged over channels (skimage's gaussian_weights=True variant)."""
    x, y = _prep(a, b)
    s, _ = _ssim_cs(x, y)
    return _reduce(s.mean(1), reduction)


def ms_ssim_scales(height: int, width: int, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """How many MS-SSIM scales an HxW image supports (the window must fit at the coarsest one)."""
    k = 0
    h, w = height, width
    while k < max_scales and h >= WIN and w >= WIN:
        k += 1
        h, w = h // 2, w // 2
    if k == 0:
        raise ImageError(f"MS-SSIM needs images of at least {WIN}x{WIN} pixels, got {width}x{height}")
    return k


def ms_ssim(a, b, reduction: str = "mean", weights=MS_SSIM_WEIGHTS):
    """Multi-scale SSIM (Wang et al. 2003); fewer, renormalized scales for small images."""
    x, y = _prep(a, b)
    k = ms_ssim_scales(x.shape[-2], x.shape[-1], len(weights))
    w = torch.tensor(weights[:k], dtype=torch.float64)
    w = w / w.sum()
    vals = []
    for i in range(k):
        s, cs = _ssim_cs(x, y)
        vals.append((s if i == k - 1 else cs).clamp_min(0))
        if i < k - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stack = torch.stack(vals)  # (k, N, C)
    per_channel = torch.prod(stack ** w.view(k, 1, 1), dim=0)
    return _reduce(per_channel.mean(1), reduction)


def _ssim_cs_conv(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable SSIM and contrast-structure means per image, each shaped (N,): the same window,
    constants and valid region as ``_ssim_cs``, in the input's dtype, as a separable grouped conv2d
    (fast in float32, unlike the float64 shifted adds), averaged over channels and pixels together."""
    c = x.shape[1]
    g = gaussian_window(x.dtype, x.device).view(1, 1, 1, WIN).repeat(c, 1, 1, 1)

    def blur(a: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(a, g, groups=c), g.transpose(-1, -2), groups=c)

    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    c1, c2 = K1 ** 2, K2 ** 2
    cs = (2 * vxy + c2) / (vx + vy + c2)
    s = (2 * ux * uy + c1) / (ux * ux + uy * uy + c1) * cs
    return s.flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - MS-SSIM as a differentiable training loss on (N, C, H, W) images in [0, 1] (a scalar).

    Same scales, weights and renormalization as ``ms_ssim``, but in the input's dtype with gradients,
    per image over all channels at once, and cs/SSIM clamped to 1e-6 rather than 0 (the power's
    gradient is infinite at 0). A loss, not the reported metric: ``ms_ssim`` is the float64 reference.
    """
    k = ms_ssim_scales(x.shape[-2], x.shape[-1])
    w = torch.tensor(MS_SSIM_WEIGHTS[:k], dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    w = w / w.sum()
    vals = []
    for i in range(k):
        s, cs = _ssim_cs_conv(x, y)
        vals.append((s if i == k - 1 else cs).clamp_min(1e-6))
        if i < k - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return 1 - torch.prod(torch.stack(vals) ** w.view(-1, 1), dim=0).mean()


def unavailable_metrics(height: int, width: int) -> dict[str, str]:
    """Metrics of ``image_metrics`` that are not defined for HxW images, each with the reason
    (empty for images of at least 11x11 pixels)."""
    if height >= WIN and width >= WIN:
        return {}
    why = f"needs images of at least {WIN}x{WIN} pixels (its Gaussian window), got {width}x{height}"
    return {"ssim": f"SSIM {why}", "ms_ssim": f"MS-SSIM {why}"}


def image_metrics(a, b) -> dict[str, float]:
    """The metrics defined for these images (batch means) as plain floats: ``mse`` and ``psnr``
    always, ``ssim`` and ``ms_ssim`` unless ``unavailable_metrics`` names them (images under 11x11).
    ``psnr`` may be ``inf``, see ``json_psnr``."""
    x, y = _prep(a, b)
    out = {"mse": mse(x, y), "psnr": psnr(x, y)}
    if not unavailable_metrics(x.shape[-2], x.shape[-1]):
        out.update(ssim=ssim(x, y), ms_ssim=ms_ssim(x, y))
    return out


def mean_of_rows(rows: list[dict], keys=("psnr", "mse", "ssim", "ms_ssim")) -> dict:
    """Mean of per-image metric rows (JSON form: None = infinite PSNR; a metric left out of a row is
    unavailable for that image). Each metric is averaged over the rows that report it, infinite values
    left out unless all are; a metric no row reports is listed under ``unavailable`` with the reason."""
    mean: dict = {}
    for k in keys:
        have = [r[k] for r in rows if k in r]
        finite = [v for v in have if v is not None]
        if have:
            mean[k] = sum(finite) / len(finite) if finite else None
        elif rows:
            mean.setdefault("unavailable", {})[k] = rows[0].get("unavailable", {}).get(k, "not measured")
    return mean


# --------------------------------------------------------------------------- latent agreement
@torch.no_grad()
def latent_agreement(preds: list[torch.Tensor], targets: list[torch.Tensor]) -> dict[str, float]:
    """How close predicted latents are to reference latents of the same images (issue 14's bridge
    measurements). Latents (C, h, w) or (1, C, h, w), any sizes per pair.

    - ``rel_mse``: MSE over all elements of all pairs / variance of all target elements (pooled, so
      big images weigh by their size; 0 = exact, 1 = as bad as predicting the mean);
    - ``cosine``: cosine similarity of each flattened pair, averaged over pairs;
    - ``mean_gap`` / ``std_gap``: per-channel |mean(pred) - mean(target)| and |std(pred) - std(target)|
      over all positions of all pairs, averaged over channels (distribution shift a model would see).
    """
    if not preds or len(preds) != len(targets):
        raise ValueError("latent_agreement needs as many predictions as targets (at least one)")
    p = [x.detach().double().reshape(x.shape[-3], -1) for x in preds]
    t = [x.detach().double().reshape(x.shape[-3], -1) for x in targets]
    if any(a.shape != b.shape for a, b in zip(p, t)):
        raise ValueError("prediction and target latents differ in shape")
    pc, tc = torch.cat(p, 1), torch.cat(t, 1)
    cos = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() for a, b in zip(p, t)]
    return {"rel_mse": ((pc - tc) ** 2).mean().item() / tc.var().item(),
            "cosine": sum(cos) / len(cos),
            "mean_gap": (pc.mean(1) - tc.mean(1)).abs().mean().item(),
            "std_gap": (pc.std(1) - tc.std(1)).abs().mean().item()}
