"""The eps decoder's perceptual loss and time-conditioned discriminator (paper 004, 3.2).

* Perceptual matching on x0_hat (Eq. 10, Table 4 (d)): LPIPS when the ``lpips`` package *and* its
  backbone weights are already on disk (never downloaded), else the documented substitute
  0.84 * (1 - MS-SSIM) + 0.16 * L1 (the mix of Zhao et al., "Loss functions for image restoration
  with neural networks", 2017), computed on [0, 1] images with ``vaepack.metrics.ms_ssim_loss``.
* Adversarial denoising-trajectory matching (Eq. 11-12, Table 4 (e)): ``TimeDiscriminator`` sees
  concat(x_0, x_t) as real and concat(x0_hat, x_t) as fake, with AdaGN time conditioning.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.errors import UsageError
from vaepack.metrics import ms_ssim_loss
from vaepack.models.eps_unet import timestep_embedding


def find_lpips(device: torch.device) -> nn.Module | None:
    """An LPIPS module if the ``lpips`` package and its backbone weights are already on disk."""
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError:
        return None
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    for net, pat in (("vgg", "vgg16-*.pth"), ("alex", "alexnet-*.pth")):
        if ckpt.is_dir() and any(ckpt.glob(pat)):
            try:
                return lpips.LPIPS(net=net, verbose=False).to(device).eval().requires_grad_(False)
            except Exception:  # noqa: BLE001 - any failure means "not usable offline"
                return None
    return None


class Perceptual(nn.Module):
    """LPIPS when available, else 0.84 (1 - MS-SSIM) + 0.16 L1 on [0, 1] images (see module doc)."""

    def __init__(self, kind: str, device: torch.device):
        super().__init__()
        self.lpips = find_lpips(device) if kind in ("auto", "lpips") else None
        if kind == "lpips" and self.lpips is None:
            raise UsageError("--perceptual lpips needs the `lpips` package and its VGG/AlexNet weights "
                             "in the torch hub cache; use --perceptual auto for the MS-SSIM+L1 substitute")
        self.kind = "lpips" if self.lpips is not None else "msssim_l1"

    def forward(self, x_pm1: torch.Tensor, y_pm1: torch.Tensor) -> torch.Tensor:
        if self.lpips is not None:
            return self.lpips(x_pm1, y_pm1).mean()
        x01, y01 = (x_pm1.float() + 1) / 2, (y_pm1.float() + 1) / 2
        return 0.84 * ms_ssim_loss(x01, y01) + 0.16 * (x01 - y01).abs().mean()


class TimeDiscriminator(nn.Module):
    """Patch discriminator D(x_0, x_t, t) with AdaGN time conditioning [3.2, Eq. 12]."""

    def __init__(self, width: int = 32, levels: int = 3, cin: int = 6):
        super().__init__()
        self.width = width
        temb = 4 * width
        self.time = nn.Sequential(nn.Linear(width, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(cin, width, 3, padding=1)
        self.convs, self.norms, self.embs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c = width
        for _ in range(levels):
            self.convs.append(nn.Conv2d(c, 2 * c, 4, stride=2, padding=1))
            c *= 2
            self.norms.append(nn.GroupNorm(8, c))
            self.embs.append(nn.Linear(temb, 2 * c))
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x0: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.time(timestep_embedding(t, self.width))
        h = F.leaky_relu(self.conv_in(torch.cat([x0, x_in], dim=1)), 0.2)
        for conv, norm, emb in zip(self.convs, self.norms, self.embs):
            scale, shift = emb(e)[:, :, None, None].chunk(2, dim=1)
            h = F.leaky_relu(norm(conv(h)) * (1 + scale) + shift, 0.2)
        return self.conv_out(h)
