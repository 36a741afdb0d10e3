"""AutoencoderKL family: SD 1.x / SDXL (f8c4), SD3 / FLUX.1 (f8c16) and FLUX.2 (f8c32) VAEs.

One architecture (shared/reference/architectures.md, section 2): ResNet down blocks, a mid block with
one single-head self-attention, GroupNorm + SiLU + conv out to the moments (mean, logvar) of a diagonal
Gaussian; the decoder mirrors it with nearest-neighbour upsampling.

Module key names follow the original (LDM / BFL) layout without the ``encoder.`` / ``decoder.``
prefix, so BFL files load almost as-is; diffusers files are renamed in ``convert_state_dict``.
Decoder level ``up[i]`` works at the same resolution as encoder level ``down[i]`` (that is why the
decoder runs ``up`` in reverse order, and why diffusers' ``up_blocks.i`` is our ``up[n-1-i]``).

Images are in [-1, 1] (``IMAGE_RANGE``). The encoder returns the raw mean m and the decoder takes a
raw latent: scale/shift and FLUX.2's BatchNorm normalization live in vaepack/latents.py, which reads
the statistics from ``module.bn.running_mean`` / ``module.bn.running_var`` (FLUX.2 only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Read by vaepack/vae.py: the network works on [-1, 1] images, and its latent is the raw VAE mean
# (diffusion space is reached through the space's convention in latents.py).
IMAGE_RANGE = "-1,1"
NATIVE_IS_DIFFUSION = False

# Every norm in this family uses eps 1e-6 (upstream value; not the torch default 1e-5).
NORM_EPS = 1e-6


@dataclass(frozen=True)
class KLConfig:
    latent_channels: int = 4
    block_out: tuple[int, ...] = (128, 256, 512, 512)  # channels per resolution level
    layers_per_block: int = 2  # ResNet blocks per encoder level (the decoder has one more)
    norm_groups: int = 32
    quant_conv: bool = True  # 1x1 quant_conv (encoder) / post_quant_conv (decoder) present
    flux2_bn: bool = False  # carry FLUX.2's BatchNorm statistics (4 * latent_channels of them)
    in_channels: int = 3  # image channels (also the decoder's output channels)
    mid_attention: bool = True  # diffusers' mid_block_add_attention; every released model has it

    def __post_init__(self):
        # The manifest is YAML, so block_out arrives as a list; keep the config hashable.
        object.__setattr__(self, "block_out", tuple(int(c) for c in self.block_out))
        if not self.block_out:
            raise ValueError("block_out must list at least one level")
        bad = [c for c in self.block_out if c % self.norm_groups]
        if bad:
            raise ValueError(f"block_out channels {bad} are not divisible by norm_groups={self.norm_groups}")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out) - 1)


def group_norm(cfg: KLConfig, c: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, c, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: KLConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # A 1x1 projection only where the width changes (the skip must match the output channels).
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, residual. q/k/v/proj_out are 1x1 convs
    (the original layout); diffusers' Linear weights are reshaped in ``convert_state_dict``."""

    def __init__(self, cfg: KLConfig, c: int):
        super().__init__()
        self.norm = group_norm(cfg, c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)

        def tokens(t):  # (B, C, H, W) -> (B, 1 head, H*W, C)
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        a = F.scaled_dot_product_attention(tokens(self.q(n)), tokens(self.k(n)), tokens(self.v(n)))
        a = a.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(a)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        # Upstream pads only right/bottom, then convolves without padding: (H, W) -> (H/2, W/2) exactly,
        # with the sampling grid aligned to the top-left pixel. Symmetric padding would shift it.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, cfg: KLConfig, c: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, c, c)
        self.attn_1 = AttnBlock(cfg, c) if cfg.mid_attention else None
        self.block_2 = ResnetBlock(cfg, c, c)

    def forward(self, x):
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class DownLevel(nn.Module):
    """One encoder resolution level: ResNet blocks, then (except the last level) a downsample."""

    def __init__(self, cfg: KLConfig, c_in: int, c: int, downsample: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.block = nn.ModuleList(ResnetBlock(cfg, c_in if j == 0 else c, c) for j in range(n))
        self.downsample = Downsample(c) if downsample else None

    def forward(self, x):
        for blk in self.block:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution level: one ResNet block more than the encoder, then an upsample
    (except at full resolution)."""

    def __init__(self, cfg: KLConfig, c_in: int, c: int, upsample: bool):
        super().__init__()
        n = cfg.layers_per_block + 1
        self.block = nn.ModuleList(ResnetBlock(cfg, c_in if j == 0 else c, c) for j in range(n))
        self.upsample = Upsample(c) if upsample else None

    def forward(self, x):
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


class LatentBNStats(nn.Module):
    """FLUX.2's BatchNorm2d(4 * latent, affine=False) reduced to what inference needs: the running
    statistics, as buffers named like upstream (``bn.running_mean`` / ``bn.running_var``). It is
    never applied here; latents.py normalizes. Defaults (0, 1) make an unloaded model a no-op."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))


class Encoder(nn.Module):
    """Image in [-1, 1], (B, C, H, W) -> VAE mean (B, latent, H/f, W/f), f = cfg.factor. H and W
    should be multiples of f, otherwise the decoded image comes back smaller than the input."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        c_prev = (ch[0],) + ch[:-1]
        self.down = nn.ModuleList(DownLevel(cfg, c_prev[i], ch[i], i < len(ch) - 1) for i in range(len(ch)))
        self.mid = MidBlock(cfg, ch[-1])
        self.norm_out = group_norm(cfg, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar
        if cfg.quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        else:
            self.quant_conv = None
        if cfg.flux2_bn:
            self.bn = LatentBNStats(4 * cfg.latent_channels)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the posterior; logvar clamped to [-30, 20] as upstream, so that
        exp(logvar / 2) used for sampling stays finite."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mode of the posterior: what every pipeline uses for deterministic encoding.
        return self.moments(x)[0]


class Decoder(nn.Module):
    """Raw latent (B, latent, h, w) -> image (B, C, h*f, w*f), nominally in [-1, 1] (not clamped)."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.block_out
        if cfg.quant_conv:
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        else:
            self.post_quant_conv = None
        if cfg.flux2_bn:
            self.bn = LatentBNStats(4 * cfg.latent_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(cfg, ch[-1])
        # Stored finest first so that up[i] works at the resolution of down[i]; run in reverse.
        # Level i takes the output of the coarser level i+1 (the mid block's for the coarsest).
        c_prev = ch[1:] + (ch[-1],)
        self.up = nn.ModuleList(UpLevel(cfg, c_prev[i], ch[i], i > 0) for i in range(len(ch)))
        self.norm_out = group_norm(cfg, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# FLUX.2 packing and the BatchNorm normalization are part of the latent convention and live in
# vaepack/latents.py (flux2_pack, mean_to_diffusion); this file only holds the statistics.


# --------------------------------------------------------------------------- family contract
CONFIGS = {"encoder": KLConfig, "decoder": KLConfig}


def build(part: str, cfg: KLConfig) -> nn.Module:
    if part == "encoder":
        return Encoder(cfg)
    if part == "decoder":
        return Decoder(cfg)
    raise ValueError(f"AutoencoderKL has no part {part!r}")


# diffusers -> original names inside a part, applied in order to the key without its part prefix.
# ``up_blocks`` is handled separately because its index is reversed.
_DIFFUSERS_RENAMES = [
    (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
    (r"^mid_block\.resnets\.0\.", "mid.block_1."),
    (r"^mid_block\.resnets\.1\.", "mid.block_2."),
    (r"^mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
    # to_q/to_k/to_v/to_out.0 (current) and query/key/value/proj_attn (diffusers < 0.14 files).
    (r"^mid_block\.attentions\.0\.(?:to_q|query)\.", "mid.attn_1.q."),
    (r"^mid_block\.attentions\.0\.(?:to_k|key)\.", "mid.attn_1.k."),
    (r"^mid_block\.attentions\.0\.(?:to_v|value)\.", "mid.attn_1.v."),
    (r"^mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\.", "mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"^conv_norm_out\.", "norm_out."),
]
_UP_BLOCK = re.compile(r"^up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.")
_ATTN_PROJ = re.compile(r"^mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _rename(key: str, cfg: KLConfig) -> str:
    """One key inside a part (no ``encoder.``/``decoder.`` prefix), either layout -> our name."""
    m = _UP_BLOCK.match(key)
    if m:
        level = len(cfg.block_out) - 1 - int(m.group(1))
        inner = "block" if m.group(2) == "resnets" else "upsample"
        key = f"up.{level}.{inner}.{key[m.end():]}"
    for pattern, repl in _DIFFUSERS_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def _owner(key: str) -> tuple[str | None, str]:
    """Which part a checkpoint key belongs to, and the key relative to that part.

    ``None`` = shared (FLUX.2's ``bn``) or unknown: kept as is, so that an unexpected tensor reaches
    load_state_dict(strict=True) and fails loudly instead of vanishing.
    """
    for part in ("encoder", "decoder"):
        if key.startswith(part + "."):
            return part, key[len(part) + 1:]
    # SD/diffusers keep the 1x1 quant convs at top level; BFL's FLUX.2 nests them in the parts.
    if key.startswith("quant_conv."):
        return "encoder", key
    if key.startswith("post_quant_conv."):
        return "decoder", key
    return None, key


def convert_state_dict(part: str, sd: dict[str, torch.Tensor], cfg: KLConfig) -> dict[str, torch.Tensor]:
    """Original/BFL or diffusers layout (whole-VAE file or one part) -> this part's keys.

    Keys of the other part are skipped; ``bn.*`` goes to both parts (FLUX.2: the encoder's latent is
    normalized and the decoder's denormalized with the same statistics). Anything unrecognized is
    passed through untouched for load_state_dict(strict=True) to report.
    """
    other = "decoder" if part == "encoder" else "encoder"
    out: dict[str, torch.Tensor] = {}
    for key, v in sd.items():
        owner, rest = _owner(key)
        if owner == other:
            continue
        if owner is None:
            # BatchNorm's step counter only matters when training the statistics; inference (and
            # BFL's own files, which may omit it) does not use it.
            if key == "bn.num_batches_tracked":
                continue
            out[key] = v
            continue
        name = _rename(rest, cfg)
        if _ATTN_PROJ.match(name) and v.ndim == 2:
            v = v[:, :, None, None]  # diffusers Linear (out, in) -> 1x1 conv (out, in, 1, 1)
        out[name] = v
    return out

