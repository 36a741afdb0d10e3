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
    # Blocks per stage, None = upstream: encoder (1, 3, 3, 3) at H, H/2, H/4, H/8; decoder (3, 3, 3, 1) at
    # h, 2h, 4h, 8h. vaepack's depth-pruned students (warm-started from the teacher, vaepack.train.
    # warmstart.tae_from_teacher) drop blocks.
    blocks: tuple[int, ...] | None = None
    # Encoder stem: "conv" (upstream: full-resolution conv, full-resolution stage, stride-2 conv) or
    # "s2d": 2x2 space-to-depth + one conv straight to H/2 (needs blocks[0] == 0); its conv can start
    # as the exact composition of the teacher's two stem convs.
    stem: str = "conv"

    def __post_init__(self):
        if self.kind not in ("f8", "f32"):
            raise ValueError(f"TAE kind must be 'f8' or 'f32', got {self.kind!r}")
        if self.blocks is not None:
            b = tuple(int(n) for n in self.blocks)
            object.__setattr__(self, "blocks", b)  # YAML gives a list; keep the config hashable
            if len(b) != 4 or min(b) < 0:
                raise ValueError(f"TAE blocks must be 4 counts >= 0 (one per stage), got {list(self.blocks)}")
        if self.stem not in ("conv", "s2d"):
            raise ValueError(f"TAE stem must be 'conv' or 's2d', got {self.stem!r}")
        if self.stem == "s2d" and (self.kind != "f8" or self.stage_blocks("encoder")[0] != 0):
            raise ValueError("TAE stem 's2d' needs kind 'f8' and no full-resolution blocks (blocks[0] == 0)")

    def stage_blocks(self, part: str) -> tuple[int, ...]:
        return self.blocks or ((1, 3, 3, 3) if part == "encoder" else (3, 3, 3, 1))

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


def _encoder_layers(cfg: TAEConfig) -> list[tuple[str, nn.Module]]:
    """(role, module) per index; roles name the same layer across depth-pruned configs ("s1.b0" = first
    block of stage 1), which is how a pruned student is warm-started from its teacher."""
    c, nb = cfg.width, cfg.stage_blocks("encoder")
    if cfg.stem == "s2d":
        layers: list[tuple[str, nn.Module]] = [("s2d", nn.PixelUnshuffle(2)), ("s2d.conv", conv(12, c))]
    elif cfg.kind == "f8":
        layers = [("stem", conv(3, c))]
    else:  # f32: two stride-2 convs to H/4 first, then the f8 tail
        layers = [("stem.0", conv(3, c // 2, stride=2)), ("stem.1", nn.ReLU()), ("stem.2", conv(c // 2, c, stride=2)),
                  ("stem.3", nn.ReLU())]
    layers += [(f"s0.b{j}", Block(c)) for j in range(nb[0])]
    for stage in range(1, 4):
        gn = cfg.midblock_gn and stage == 3
        if not (stage == 1 and cfg.stem == "s2d"):
            layers.append((f"s{stage}.down", conv(c, c, stride=2, bias=False)))
        layers += [(f"s{stage}.b{j}", Block(c, gn)) for j in range(nb[stage])]
    layers.append(("out", conv(c, cfg.latent_channels)))
    return layers


def _decoder_layers(cfg: TAEConfig) -> list[tuple[str, nn.Module]]:
    if cfg.kind != "f8":
        raise ValueError("only f8 TAE decoders exist")
    if cfg.stem != "conv":
        raise ValueError("the TAE decoder has no stem option")
    c, nb = cfg.width, cfg.stage_blocks("decoder")
    layers: list[tuple[str, nn.Module]] = [("clamp", Clamp()), ("in", conv(cfg.latent_channels, c)), ("in.act", nn.ReLU())]
    for stage in range(4):
        gn = cfg.midblock_gn and stage == 0
        layers += [(f"s{stage}.b{j}", Block(c, gn)) for j in range(nb[stage])]
        if stage < 3:
            layers += [(f"s{stage}.up", nn.Upsample(scale_factor=2)), (f"s{stage}.conv", conv(c, c, bias=False))]
    layers.append(("out", conv(c, 3)))
    return layers


def encoder(cfg: TAEConfig) -> nn.Sequential:
    return nn.Sequential(*(m for _, m in _encoder_layers(cfg)))


def decoder(cfg: TAEConfig) -> nn.Sequential:
    return nn.Sequential(*(m for _, m in _decoder_layers(cfg)))


def roles(part: str, cfg: TAEConfig) -> list[str]:
    """The role of each ``nn.Sequential`` index of ``build(part, cfg)`` (see ``_encoder_layers``)."""
    return [r for r, _ in (_encoder_layers(cfg) if part == "encoder" else _decoder_layers(cfg))]


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
