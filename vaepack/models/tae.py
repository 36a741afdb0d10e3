"""Tiny AutoEncoders (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2, TAESana), after madebyollin/taesd.

Upstream weights are ``nn.Sequential`` state dicts keyed by layer index, so both the encoder and the
decoder are ``nn.Sequential`` with the same indices (see shared/reference/architectures.md, section 1).
Images are in [0, 1]; latents are raw (already in the parent VAE's diffusion space, no scale factor).
The decoder returns its raw (unclamped) output; clamping to [0, 1] happens in the one VAE wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TAEConfig:
    kind: str = "f8"  # "f8" (encoder or decoder) or "f32" (TAESana-style encoder)
    latent_channels: int = 4
    width: int = 64
    # TAEF2 adds a pooled GroupNorm path to the blocks of the encoder's last stage and the
    # decoder's first stage ("midblock GN").
    midblock_gn: bool = False

    def __post_init__(self):
        if self.kind not in ("f8", "f32"):
            raise ValueError(f"TAE kind must be 'f8' or 'f32', got {self.kind!r}")

    @property
    def factor(self) -> int:
        return 8 if self.kind == "f8" else 32


def conv(n_in: int, n_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class Clamp(nn.Module):
    """Soft clamp of decoder inputs to about +-3, as upstream (tanh(x/3)*3)."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, c: int, gn_pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv(c, c), nn.ReLU(), conv(c, c), nn.ReLU(), conv(c, c))
        self.pool = (
            nn.Sequential(
                nn.Conv2d(c, 4 * c, 1, bias=False),
                nn.GroupNorm(4, 4 * c),
                nn.ReLU(),
                nn.Conv2d(4 * c, c, 1, bias=False),
            )
            if gn_pool
            else None
        )
        self.fuse = nn.ReLU()

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)


def encoder(cfg: TAEConfig) -> nn.Sequential:
    c = cfg.width
    if cfg.kind == "f8":
        layers: list[nn.Module] = [conv(3, c), Block(c)]
    else:  # f32: two stride-2 convs to H/4 first, then the f8 tail
        layers = [conv(3, c // 2, stride=2), nn.ReLU(), conv(c // 2, c, stride=2), nn.ReLU(), Block(c)]
    for stage in range(3):
        gn = cfg.midblock_gn and stage == 2
        layers += [conv(c, c, stride=2, bias=False), Block(c, gn), Block(c, gn), Block(c, gn)]
    layers.append(conv(c, cfg.latent_channels))
    return nn.Sequential(*layers)


def decoder(cfg: TAEConfig) -> nn.Sequential:
    if cfg.kind != "f8":
        raise ValueError("only f8 TAE decoders exist")
    c = cfg.width
    layers: list[nn.Module] = [Clamp(), conv(cfg.latent_channels, c), nn.ReLU()]
    for stage in range(3):
        gn = cfg.midblock_gn and stage == 0
        layers += [Block(c, gn), Block(c, gn), Block(c, gn), nn.Upsample(scale_factor=2), conv(c, c, bias=False)]
    layers += [Block(c), conv(c, 3)]
    return nn.Sequential(*layers)


CONFIGS = {"encoder": TAEConfig, "decoder": TAEConfig}


def tile_split(part: str, module: nn.Sequential) -> tuple[nn.Module, nn.Module]:
    """Split for tiled inference: the GN-pooled blocks need whole-image statistics, so the encoder
    tiles everything before its first GN block (that tail runs at H/8) and the decoder runs
    everything up to its last GN block (at latent resolution) whole and tiles the rest."""
    gn = [i for i, m in enumerate(module) if isinstance(m, Block) and m.pool is not None]
    if not gn:
        return (module, nn.Identity()) if part == "encoder" else (nn.Identity(), module)
    k = gn[0] if part == "encoder" else gn[-1] + 1
    return module[:k], module[k:]


def build(part: str, cfg: TAEConfig) -> nn.Module:
    return encoder(cfg) if part == "encoder" else decoder(cfg)


def convert_state_dict(part: str, sd: dict[str, torch.Tensor], cfg: TAEConfig) -> dict[str, torch.Tensor]:
    """Accept the upstream ``nn.Sequential`` layout and the diffusers ``AutoencoderTiny`` layout.

    diffusers keys are ``encoder.layers.{i}.*`` and ``decoder.layers.{i-1}.*`` (its decoder has no
    Clamp module at index 0).
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith(f"{part}.layers."):
            idx, rest = k[len(f"{part}.layers."):].split(".", 1)
            i = int(idx) + (1 if part == "decoder" else 0)
            k = f"{i}.{rest}"
        elif k.startswith(("encoder.", "decoder.")):
            continue  # the other part of a combined file
        out[k] = v
    return out

# The one encode/decode contract (vaepack/vae.py): TAE networks see [0, 1] images and their raw
# latents already are diffusion-space latents of the parent VAE.
IMAGE_RANGE = "0,1"
NATIVE_IS_DIFFUSION = True
