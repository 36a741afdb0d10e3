"""LatentFlow: a small, resolution-agnostic velocity model on VAE latents (issue 15).

It is the yardstick of ``vaepack modelability`` ("how easy is this latent space to model", the offline
stand-in for the generation FID of papers 002/003) and the "real"/"fake" score networks of the
distribution-matching loss (paper 003, DMVAE; vaepack.train.dm).

Rectified flow in vaepack's convention (vaepack/samplers.py): x_t = (1 - t) x_0 + t eps, t = 1 is
noise, and the network predicts the velocity v = eps - x_0 from (x_t, t); x_0 is recovered as
x_t - t v. (DMVAE's code puts t = 1 at the data; everything here uses the package convention.)

Design, and why:

- Convolutions only (3x3 stem, residual blocks, 3x3 head), no attention and no positional input, so
  the same weights run on a 16x16 training crop and on a whole latent of any size.
- Time conditioning by adaptive GroupNorm (the DDPM/ADM recipe): a sinusoidal embedding of t ->
  MLP -> per block a (scale, shift) applied after the block's first normalization. Cheap, and it is
  what lets one network serve every noise level.
- Zero-initialized last conv of each block and of the head: the untrained network is the identity
  on its residual path and predicts v = 0, so short CPU runs start stable and every latent space
  starts from the same loss (E||eps - x_0||^2 per element = 2 for unit-variance latents).
- The default size (width 96, 4 blocks: 0.85M parameters at 32 channels) takes ~0.4 s per training
  step of 32 16x16 crops on one CPU thread (Xeon, fp32), so a modelability run fits in minutes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LatentFlowConfig:
    channels: int = 32  # latent channels (in and out)
    width: int = 96  # feature channels of every block
    blocks: int = 4  # residual blocks (2 convs each): receptive field 2 + 4 * blocks latent pixels
    time_dim: int = 128  # sinusoidal embedding size and time-MLP width
    groups: int = 8  # GroupNorm groups (must divide width)

    def __post_init__(self):
        for name in ("channels", "width", "blocks", "time_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LatentFlowConfig.{name} must be a positive integer, got {v!r}")
        if self.time_dim % 2:
            raise ValueError(f"LatentFlowConfig.time_dim must be even, got {self.time_dim}")
        if self.groups < 1 or self.width % self.groups:
            raise ValueError(f"LatentFlowConfig.groups ({self.groups}) must divide width ({self.width})")

    def as_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (B,) -> (B, dim). t is scaled by 1000 first so the lowest
    frequencies still resolve the small time differences a few-step sampler takes."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class FlowBlock(nn.Module):
    """GroupNorm -> (1 + scale, shift) from t -> SiLU -> conv -> GroupNorm -> SiLU -> conv, residual."""

    def __init__(self, width: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, width)
        self.film = nn.Linear(time_dim, 2 * width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # identity at init (see the module docstring)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm1(x) * (1 + scale) + shift
        h = self.conv1(F.silu(h))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class LatentFlow(nn.Module):
    """``forward(x_t, t) -> v``: x_t (B, C, H, W) for any H, W; t (B,) in [0, 1] (or a scalar)."""

    def __init__(self, config: LatentFlowConfig | None = None):
        super().__init__()
        self.config = config or LatentFlowConfig()
        c = self.config
        self.time_mlp = nn.Sequential(nn.Linear(c.time_dim, c.time_dim), nn.SiLU(), nn.Linear(c.time_dim, c.time_dim))
        self.stem = nn.Conv2d(c.channels, c.width, 3, padding=1)
        self.blocks = nn.ModuleList(FlowBlock(c.width, c.time_dim, c.groups) for _ in range(c.blocks))
        self.norm_out = nn.GroupNorm(c.groups, c.width)
        self.head = nn.Conv2d(c.width, c.channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # predicts v = 0 at init
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.channels:
            raise ValueError(f"LatentFlow takes (B, {self.config.channels}, H, W) latents, got {tuple(x.shape)}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = F.silu(self.time_mlp(timestep_embedding(t.reshape(-1), self.config.time_dim).to(x.dtype)))
        h = self.stem(x)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.head(F.silu(self.norm_out(h)))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["FlowBlock", "LatentFlow", "LatentFlowConfig", "parameter_count", "timestep_embedding"]
