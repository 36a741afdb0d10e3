"""DA-VAE (paper 002, "Plug-in Latent Compression for Diffusion via Detail Alignment"), on TAEF2.

An H x W image becomes a (C + D) x H/16 x W/16 latent ``[z, z_d]`` (Eq. 1-2):

- ``z`` = the frozen TAEF2 encoder applied to the image downsampled 2x (antialiased, ``down_filter``,
  the same resize ``vaepack encode --scale 0.5 --filter F`` does): the first C = 32 channels are
  exactly the FLUX.2-space latent of the half-size image, so a FLUX.2-space model sees familiar
  tokens (paper Sec. 3.1: "the first C channels are exactly the latent of I"). Never trained.
- ``z_d`` = a detail encoder on the full-resolution image: TAEF2's encoder trunk (warm start) plus
  one more stride-2 stage, D channels at H/16 (paper Fig. S1 "a lightweight downsampling module").
- One decoder D([z, z_d]) -> the full-resolution image. Why this shape: a first measurement
  (issue 13) with a random stem + pixel shuffle in front of TAEF2's decoder reached only 21.3 dB
  because the random stem throws the warm start away. Here TAEF2's decoder runs on z unchanged and
  gives the half-size image; z_d enters its stages through *zero-initialized* convolutions (the
  paper's zero-init idea, Sec. 3.2 and Fig. 2, applied to the decoder), and a new full-resolution
  stage adds a zero-initialized residual to the bicubic-upsampled half-size image. At
  initialization the decoder therefore reproduces "base only" (TAEF2 round trip of the half-size
  image, upsampled bicubic) exactly; training only adds detail.

``proj`` is Eq. 4, the parameter-free grouped channel mean (r = D / C consecutive channels each);
the alignment loss (Eq. 3) is ``mean((proj(z_d) - z) ** 2)``.

Parameter names: ``base.{i}`` in both parts are TAEF2's upstream ``nn.Sequential`` indices (the
warm start is TAEF2's state dict under ``base.``); the detail trunk ``detail.trunk.{i}`` likewise.
Images in [0, 1]; latents already in diffusion space (TAEF2's, for the base channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.models import tae

FILTERS = ("bicubic", "bilinear")  # antialiased resizes that vaepack.tiling.resize also does
TRUNKS = {"s2d": {"blocks": (0, 2, 3, 3), "stem": "s2d"}, "taef2": {}}  # detail trunk -> TAEConfig fields


@dataclass(frozen=True)
class DAConfig:
    base_channels: int = 32  # C: the base TAEF2 latent
    detail_channels: int = 32  # D: a multiple of C (Eq. 4 needs r = D / C whole)
    width: int = 64  # TAEF2's width
    midblock_gn: bool = True  # TAEF2's pooled-GroupNorm blocks
    down_filter: str = "bicubic"  # the 2x downsample of the base branch (antialiased)
    # The detail encoder's trunk: "s2d" = the architecture of vaepack's default encoder (2x2
    # space-to-depth stem, no full-resolution stage, blocks (0, 2, 3, 3)), warm-started from it, ~3x
    # cheaper than "taef2" = TAEF2's whole encoder trunk (full-resolution stage), warm-started from TAEF2.
    detail_trunk: str = "s2d"
    detail_blocks: int = 1  # blocks of the encoder's extra stride-2 stage (at H/16)
    head_blocks: int = 1  # blocks of the decoder's extra stage (at H/2, before the 2x pixel shuffle)

    def __post_init__(self):
        if self.detail_channels <= 0 or self.detail_channels % self.base_channels:
            raise ValueError(f"detail_channels must be a positive multiple of base_channels ({self.base_channels}), "
                             f"got {self.detail_channels}")
        if self.down_filter not in FILTERS:
            raise ValueError(f"down_filter must be one of {FILTERS}, got {self.down_filter!r}")
        if self.detail_trunk not in TRUNKS:
            raise ValueError(f"detail_trunk must be one of {tuple(TRUNKS)}, got {self.detail_trunk!r}")
        if self.detail_blocks < 0 or self.head_blocks < 0:
            raise ValueError("detail_blocks and head_blocks must be >= 0")

    @property
    def channels(self) -> int:
        return self.base_channels + self.detail_channels

    @property
    def factor(self) -> int:
        return 16

    def tae(self, trunk: bool = False) -> tae.TAEConfig:
        """The TAEF2 architecture of the base encoder and decoder, or (``trunk``) the detail trunk's."""
        return tae.TAEConfig(kind="f8", latent_channels=self.base_channels, width=self.width,
                             midblock_gn=self.midblock_gn, **(TRUNKS[self.detail_trunk] if trunk else {}))


def half(x: torch.Tensor, filter: str) -> torch.Tensor:
    """The documented 2x downsample: torch's antialiased resize, as vaepack.tiling.resize does it.
    While exporting to ONNX (which has no op for it) the same resize is traced as ``half_fir``."""
    if torch.onnx.is_in_onnx_export():
        return half_fir(x, filter)
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(h // 2, w // 2), mode=filter, align_corners=False, antialias=True)


def _aa_taps(filter: str) -> list[float]:
    """The 1-D weights of torch's antialiased 2x downsample (its CPU kernel, PIL's scheme): output i
    weighs input j by k((j - 2i - 0.5) / 2), k = the cubic with a = -0.5 or the triangle, over
    |j - 2i - 0.5| < 2 * support: 8 taps (bicubic) or 4 (bilinear), divided by the sum of the taps
    that fall inside the image."""
    def cubic(t: float, a: float = -0.5) -> float:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 if t < 1 else a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a

    n = 4 if filter == "bicubic" else 2
    ts = [abs(j + 0.5) / 2 for j in range(-n, n)]
    return [cubic(t) for t in ts] if filter == "bicubic" else [max(0.0, 1 - t) for t in ts]


def half_fir(x: torch.Tensor, filter: str) -> torch.Tensor:
    """``half`` as two strided convolutions with constant kernels (standard ONNX ops, any H and W):
    zero padding, then division by the same convolution of ones, which is torch's renormalization of
    the taps inside the image at the borders. Equal to ``half`` up to float rounding (tested); even H, W."""
    taps = _aa_taps(filter)
    n, p = len(taps), len(taps) // 2 - 1  # output i reads inputs 2i - p .. 2i + p + 1
    kv = torch.tensor(taps, dtype=x.dtype).view(1, 1, n, 1)
    kh = kv.view(1, 1, 1, n)
    b, c, h, w = x.shape
    y = F.conv2d(x.reshape(b * c, 1, h, w), kv, stride=(2, 1), padding=(p, 0))
    y = y / F.conv2d(torch.ones_like(x[:1, :1, :, :1]), kv, stride=(2, 1), padding=(p, 0))
    y = F.conv2d(y, kh, stride=(1, 2), padding=(0, p))
    y = y / F.conv2d(torch.ones_like(x[:1, :1, :1, :]), kh, stride=(1, 2), padding=(0, p))
    return y.reshape(b, c, y.shape[-2], y.shape[-1])


def proj(z_d: torch.Tensor, base_channels: int) -> torch.Tensor:
    """Eq. 4: Proj(z_d)[i] = mean_j z_d[i r + j], j < r = D / C (consecutive channel groups)."""
    b, d, h, w = z_d.shape
    return z_d.reshape(b, base_channels, d // base_channels, h, w).mean(2)


def groups(z_d: torch.Tensor, base_channels: int) -> torch.Tensor:
    """(B, D, h, w) -> (B r, C, h, w): group j holds channels i r + j (i < C), the members Eq. 4
    averages, so each group is a C-channel latent to compare with the base distribution."""
    b, d, h, w = z_d.shape
    r = d // base_channels
    return z_d.reshape(b, base_channels, r, h, w).transpose(1, 2).reshape(b * r, base_channels, h, w)


def align_loss(z_d: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Eq. 3 as a mean over elements (the issue's convention, so its weight does not scale with size)."""
    return (proj(z_d, z.shape[1]) - z).pow(2).mean()


def _zero(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _first_gn(seq: nn.Sequential) -> int:
    """Index of the first pooled-GroupNorm block (whole-image statistics: tiling must not cut there)."""
    gn = [i for i, m in enumerate(seq) if isinstance(m, tae.Block) and m.pool is not None]
    return gn[0] if gn else len(seq)


# ----------------------------------------------------------------------------- encoder
class DetailEncoder(nn.Module):
    """A TAE encoder trunk (everything but its output conv: 64 channels at H/8; ``detail_trunk``),
    then one more stride-2 stage to H/16 and a conv to D channels."""

    def __init__(self, cfg: DAConfig):
        super().__init__()
        c = cfg.width
        self.trunk = nn.Sequential(*list(tae.encoder(cfg.tae(trunk=True)))[:-1])
        self.down = tae.conv(c, c, stride=2, bias=False)
        self.blocks = nn.Sequential(*(tae.Block(c) for _ in range(cfg.detail_blocks)))
        self.out = tae.conv(c, cfg.detail_channels)

    def finish(self, h8: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.down(h8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.trunk(x))


class DAEncoder(nn.Module):
    """[0, 1] image (H, W multiples of 16) -> [z, z_d] at H/16."""

    def __init__(self, cfg: DAConfig):
        super().__init__()
        self.cfg = cfg
        self.base = tae.encoder(cfg.tae())
        self.detail = DetailEncoder(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.base(half(x, self.cfg.down_filter)), self.detail(x)], 1)

    # Tiled runs (vaepack.tiling): the head runs on tiles up to the first GroupNorm block of each
    # branch, the tail on the whole (low-resolution) tensor. The detail head ends at H/8, the base head
    # at H/16, so the detail features travel 2x2 space-to-depth to share one H/16 tensor (exact).
    def head(self, x: torch.Tensor) -> torch.Tensor:
        kb, kd = _first_gn(self.base), _first_gn(self.detail.trunk)
        hb = self.base[:kb](half(x, self.cfg.down_filter))
        hd = F.pixel_unshuffle(self.detail.trunk[:kd](x), 2)
        return torch.cat([hb, hd], 1)

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        kb, kd = _first_gn(self.base), _first_gn(self.detail.trunk)
        c = self.cfg.width
        zb = self.base[kb:](h[:, :c])
        zd = self.detail.finish(self.detail.trunk[kd:](F.pixel_shuffle(h[:, c:], 2)))
        return torch.cat([zb, zd], 1)


# ----------------------------------------------------------------------------- decoder
class DADecoder(nn.Module):
    """[z, z_d] -> image at 16x the latent size. See the module docstring for why this shape."""

    def __init__(self, cfg: DAConfig):
        super().__init__()
        self.cfg = cfg
        c, tcfg = cfg.width, cfg.tae()
        self.base = tae.decoder(tcfg)
        roles = tae.roles("decoder", tcfg)
        # where z_d enters: before the first block of each of the 4 stages (latent res, 2x, 4x, 8x)
        self.entries = [roles.index(f"s{s}.b0") for s in range(4)]
        # Linear on purpose: with a ReLU stem here the first run's stem died (its outputs ~4e-5 after 150
        # steps: while the injections are ~0 the loss only ever pushes the stem toward "off"), and the
        # decoder ignored z_d. The stages it feeds are nonlinear anyway.
        self.detail_in = nn.Sequential(tae.Clamp(), tae.conv(cfg.detail_channels, c))
        self.inject = nn.ModuleList(_zero(tae.conv(c, c)) for _ in range(4))
        # The full-resolution residual: blocks at H/2, then 2x2 sub-pixels per position (pixel shuffle,
        # paper Fig. S1's "lightweight upsampling block"); a full-resolution conv stage cost ~4x more.
        self.head = nn.Sequential(*(tae.Block(c) for _ in range(cfg.head_blocks)), _zero(tae.conv(c, 12)),
                                  nn.PixelShuffle(2))

    def _split(self) -> int:
        """End of the part that needs whole-image statistics (the last GroupNorm block, stage 0)."""
        gn = [i for i, m in enumerate(self.base) if isinstance(m, tae.Block) and m.pool is not None]
        return max(gn[-1] + 1 if gn else 0, self.entries[0] + 1)

    def _run(self, h: torch.Tensor, f: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Base decoder layers [start, stop), adding the injected detail at each stage's entry."""
        for i in range(start, stop):
            if i in self.entries:
                s = self.entries.index(i)
                fs = F.interpolate(f, scale_factor=2 ** s, mode="nearest") if s else f
                h = h + self.inject[s](fs)
            h = self.base[i](h)
        return h

    def head_part(self, z: torch.Tensor) -> torch.Tensor:
        c = self.cfg.base_channels
        f = self.detail_in(z[:, c:])
        h = self._run(z[:, :c], f, 0, self._split())
        return torch.cat([h, f], 1)

    def tail_part(self, hf: torch.Tensor) -> torch.Tensor:
        c = self.cfg.width
        h = self._run(hf[:, :c], hf[:, c:], self._split(), len(self.base) - 1)
        rgb_half = self.base[-1](h)
        up = F.interpolate(rgb_half, scale_factor=2, mode="bicubic", align_corners=False)
        return up + self.head(h)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.tail_part(self.head_part(z))


class _Call(nn.Module):
    """A bound method as a module (tiling takes (head, tail) modules)."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        self.fn = getattr(owner, name)

    def forward(self, x):
        return self.fn(x)


def zero_at_latent(enc: "DAEncoder", dec: "DADecoder") -> None:
    """Move the zero of the zero-initialization from the decoder's injections to z_d itself: the detail
    encoder's output conv is zeroed (z_d = 0), the injections get a fresh random init, and every bias
    on the path z_d -> injection is zeroed, so step 0 still reproduces "base only" exactly.

    The hypothesis it tests: with zero injections the detail encoder gets no gradient until the
    injections have grown, so z_d might learn faster if the gradient reached it from step 0 (the
    one-sided zero-init of ControlNet-style adapters). Measured (benchmarks/results/da.md, section 5):
    it does not - at ~540 steps z_d carried nothing (zeroing it cost 0.00 dB vs 0.15 dB with zero
    injections) and the reconstruction was 0.09 dB lower - so it is an ablation, not the default."""
    _zero(enc.detail.out)
    nn.init.zeros_(dec.detail_in[1].bias)
    for conv in dec.inject:
        conv.reset_parameters()
        nn.init.zeros_(conv.bias)


# ----------------------------------------------------------------------------- family interface
CONFIGS = {"encoder": DAConfig, "decoder": DAConfig}
IMAGE_RANGE = "0,1"
NATIVE_IS_DIFFUSION = True
def build(part: str, cfg: DAConfig) -> nn.Module:
    return DAEncoder(cfg) if part == "encoder" else DADecoder(cfg)


def tile_split(part: str, module: nn.Module) -> tuple[nn.Module, nn.Module]:
    if part == "encoder":
        return _Call(module, "head"), _Call(module, "tail")
    return _Call(module, "head_part"), _Call(module, "tail_part")


def convert_state_dict(part: str, sd: dict[str, torch.Tensor], cfg: DAConfig) -> dict[str, torch.Tensor]:
    return dict(sd)  # vaepack writes these files in this layout; no upstream layout to rename


def warm_start(module: nn.Module, part: str, taef2: dict[str, torch.Tensor],
               trunk: dict[str, torch.Tensor] | None = None) -> None:
    """Initialize from TAEF2's upstream state dict of ``part``: the base (both parts) gets TAEF2's
    weights, the encoder's detail trunk those of ``trunk`` (an encoder of the trunk's architecture:
    TAEF2's own for "taef2", vaepack's default encoder for "s2d"); new layers keep their init (zero
    where it matters)."""
    sd = {f"base.{k}": v for k, v in taef2.items()}
    if part == "encoder":
        n = len(module.detail.trunk)
        src = taef2 if trunk is None else trunk
        sd.update({f"detail.trunk.{k}": v for k, v in src.items() if int(k.split(".")[0]) < n})
    missing = [k for k in sd if k not in module.state_dict()]
    if missing:
        raise ValueError(f"TAEF2 {part} keys not in the DA {part}: {missing[:3]}")
    module.load_state_dict(sd, strict=False)
