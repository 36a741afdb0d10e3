"""eps-VAE diffusion decoder (paper 004, "Denoising as Visual Decoding"): an ADM-style UNet G(x_t, t, z).

What is implemented (paper section numbers in brackets):

* Conditioning [3.1]: the latent z is upsampled with nearest neighbour to the image size and
  concatenated to the network input along channels. Optionally (``base="tae"``, a vaepack speed
  trick, not in the paper) a cheap deterministic reconstruction ``base = D_tae(z)`` (the TAE decoder
  of the same latent space, e.g. TAEF2) is concatenated too and the diffusion models only the
  residual ``x - base``. On a CPU budget this is what makes the decoder competitive: the UNet refines
  a 29.5 dB reconstruction instead of learning one from scratch (paper 004 trains for 1M steps).
* Architecture [4, C.1, Table 5]: ADM UNet (Dhariwal & Nichol 2021): residual blocks with GroupNorm,
  SiLU and time conditioning by scale-shift norm (h = GN(h) * (1 + s) + b), stride-2 conv
  downsampling, nearest + conv upsampling, skip concatenation, optional self-attention at chosen
  levels, zero-initialised output convs. ``width``/``mults``/``blocks`` are Table 5's "channel dim",
  "depth multipliers" and "# of blocks" (paper B: 64, (1,1,2,2,4), 2; the CPU default is far smaller).
* Rectified flow [Eq. 5, 9] with the gamma-scaling of [3.3] (Chen 2023):
      x_t = (1 - t) * gamma * x0 + t * eps,  eps ~ N(0, I),  t in [0, 1]
  i.e. the straight path between the *scaled* data gamma * x0 and noise; the velocity target is
  v = dx_t/dt = eps - gamma * x0, and the x0 estimate of Eq. 10 becomes
      gamma * x0_hat = x_t - t * G(x_t, t, z).
  Variance renormalisation [3.3]: with Var(x0) = sigma_data^2 (``sigma_data``, per pixel),
      s(t)^2 = Var(x_t) = (1 - t)^2 gamma^2 sigma_data^2 + t^2,
  and the network sees x_t / s(t) (unit variance at every t). The normalisation is analytic, not a
  per-image empirical std, so G stays a local function of x_t: tiles and batches agree.
* Preconditioning (Karras et al. 2022, which [3.3] cites for the variance argument; ``precond``):
      G = c_skip(t) x_t + c_out(t) F(x_t / s(t), t, cond),
      c_skip = (t - (1 - t) sd^2) / s^2,  c_out = sd / s,  sd = gamma * sigma_data,
  the minimum-variance linear velocity predictor plus a unit-variance learned correction (derivation:
  Cov(v, x_t) = t - (1 - t) sd^2, Var(v) - Cov^2 / s^2 = sd^2). With F initialised to zero the
  untrained decoder's one-step output (NFE = 1) is x0_hat = 0 residual, i.e. exactly the base
  reconstruction; more steps add Gaussian "detail" of std sigma_data until F is trained.
  G is still a velocity predictor, trained with the velocity MSE of Eq. 9.

Pixel range: the network works in [-1, 1] (``IMAGE_RANGE = "-1,1"``): zero-mean data matches the
zero-mean noise of the flow. The one VAE wrapper maps the [-1, 1] output to [0, 1] and clamps.
Sampling lives in vaepack/samplers.py (Euler on the reversed-log grid of Eq. 13).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.models import tae  # also imports only torch: the optional base reconstruction


@dataclass(frozen=True)
class EpsConfig:
    latent_channels: int = 32
    factor: int = 8  # image pixels per latent pixel (8 for FLUX.2/TAEF2)
    width: int = 32  # Table 5 "channel dim"
    mults: tuple[int, ...] = (1, 2, 2)  # Table 5 "depth multipliers" (one level per entry)
    blocks: int = 1  # Table 5 "# of blocks" per level
    # Space-to-depth of the UNet input (pixel unshuffle by `patch`, as in "simple diffusion",
    # Hoogeboom et al. 2023, cited by paper 004): the first level runs at H/patch, 1/patch^2 the cost.
    patch: int = 2
    attn_levels: tuple[int, ...] = ()  # indices into mults where self-attention follows each block
    heads: int = 4
    groups: int = 8  # GroupNorm groups
    time_dim: int = 0  # time-embedding width; 0 means 4 * width (ADM)
    base: str = "none"  # "none" or "tae": also condition on (and predict the residual over) D_tae(z)
    base_width: int = 64  # TAE decoder width (TAEF2: 64)
    base_midblock_gn: bool = True  # TAEF2 decoder variant
    gamma: float = 0.6  # [3.3] x_t scaling, paper's best value (Fig. 3 middle)
    sigma_data: float = 1.0  # std of x0 after data_scale (used by the variance renormalisation)
    data_scale: float = 1.0  # x0 = data_scale * (image or residual), both in [-1, 1] units
    precond: bool = True
    steps: int = 3  # default NFE for decode (paper: 1 to 3)
    schedule: str = "reversed_log"  # Eq. 13 grid; or "uniform"

    def __post_init__(self):
        # YAML gives lists; keep the frozen dataclass hashable.
        object.__setattr__(self, "mults", tuple(int(m) for m in self.mults))
        object.__setattr__(self, "attn_levels", tuple(int(a) for a in self.attn_levels))
        if self.base not in ("none", "tae"):
            raise ValueError(f"eps base must be 'none' or 'tae', got {self.base!r}")
        if not self.mults or any(m < 1 for m in self.mults):
            raise ValueError(f"mults must be positive, got {self.mults}")
        if any(not 0 <= a < len(self.mults) for a in self.attn_levels):
            raise ValueError(f"attn_levels {self.attn_levels} out of range for {len(self.mults)} levels")
        for c in {self.width * m for m in self.mults}:
            if c % self.groups:
                raise ValueError(f"channel count {c} is not divisible by groups={self.groups}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.sigma_data <= 0 or self.data_scale <= 0:
            raise ValueError("sigma_data and data_scale must be > 0")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.schedule not in ("reversed_log", "uniform"):
            raise ValueError(f"schedule must be 'reversed_log' or 'uniform', got {self.schedule!r}")
        if self.patch < 1 or self.factor % self.patch:
            raise ValueError(f"patch must divide factor={self.factor}, got {self.patch}")
        if self.blocks < 1 or self.width < 1 or self.factor < 1 or self.latent_channels < 1:
            raise ValueError("width, blocks, factor and latent_channels must be >= 1")

    @property
    def temb(self) -> int:
        return self.time_dim or 4 * self.width

    @property
    def cond_channels(self) -> int:
        """Conditioning channels at the UNet's input resolution (H/patch): z (+ unshuffled base)."""
        return self.latent_channels + (3 * self.patch ** 2 if self.base != "none" else 0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "EpsConfig":
        return cls(**json.loads(s))


# ----------------------------------------------------------------------------- building blocks
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as for discrete-time ADM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = (t.float().reshape(-1, 1) * 1000.0) * freqs[None]
    emb = torch.cat([torch.cos(a), torch.sin(a)], dim=1)
    return F.pad(emb, (0, dim % 2))


def zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    """ADM residual block with scale-shift time conditioning (Dhariwal & Nichol 2021)."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Attention(nn.Module):
    """Global self-attention over pixels (ADM uses it at low resolutions only)."""

    def __init__(self, c: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads if c % heads == 0 else 1
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = zero(nn.Conv2d(c, c, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(o.transpose(-1, -2).reshape(b, c, h, w))


class Down(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EpsUNet(nn.Module):
    """F(x_in, t, cond): the learned part of G, all at H/patch. Input: 3 patch^2 (x_t / s(t)) + cond."""

    def __init__(self, cfg: EpsConfig):
        super().__init__()
        self.cfg = cfg
        w, temb, g = cfg.width, cfg.temb, cfg.groups
        self.time = nn.Sequential(nn.Linear(w, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(3 * cfg.patch ** 2 + cfg.cond_channels, w, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [w]
        c = w
        for lvl, m in enumerate(cfg.mults):
            for _ in range(cfg.blocks):
                self.down.append(ResBlock(c, w * m, temb, g))
                c = w * m
                if lvl in cfg.attn_levels:
                    self.down.append(Attention(c, cfg.heads, g))
                skips.append(c)
            if lvl != len(cfg.mults) - 1:
                self.down.append(Down(c))
                skips.append(c)
        last = len(cfg.mults) - 1
        self.mid = nn.ModuleList([ResBlock(c, c, temb, g)])
        if last in cfg.attn_levels:
            self.mid.append(Attention(c, cfg.heads, g))
        self.mid.append(ResBlock(c, c, temb, g))
        self.up = nn.ModuleList()
        for lvl in reversed(range(len(cfg.mults))):
            m = cfg.mults[lvl]
            for i in range(cfg.blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), w * m, temb, g))
                c = w * m
                if lvl in cfg.attn_levels:
                    self.up.append(Attention(c, cfg.heads, g))
            if lvl != 0:
                self.up.append(Up(c))
        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = zero(nn.Conv2d(c, 3 * cfg.patch ** 2, 3, padding=1))

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.cfg.mults) - 1)

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb = self.time(timestep_embedding(t, self.cfg.width))
        h = self.conv_in(torch.cat([x_in, cond.to(x_in.dtype)], dim=1))
        hs = [h]
        for mod in self.down:
            h = mod(h, emb)
            if not isinstance(mod, Attention):
                hs.append(h)
            else:
                hs[-1] = h
        for mod in self.mid:
            h = mod(h, emb)
        for mod in self.up:
            if isinstance(mod, ResBlock):
                h = mod(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = mod(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- the decoder
def flow_scale(t: torch.Tensor, cfg: EpsConfig) -> torch.Tensor:
    """s(t) = std of x_t = sqrt((1-t)^2 gamma^2 sigma_data^2 + t^2) (section 3.3 renormalisation)."""
    sd = cfg.gamma * cfg.sigma_data
    return torch.sqrt((1 - t) ** 2 * sd * sd + t * t)


class EpsDecoder(nn.Module):
    """Decoder part of a VAE: ``forward(z)`` samples an image in [-1, 1] with ``steps`` Euler steps.

    Attributes a caller may set before decoding: ``steps`` (NFE >= 1), ``seed``, ``deterministic_noise``
    (default True: the starting noise is a fixed function of (seed, channel, absolute pixel position),
    so tiles and batch members agree), ``noise_origin`` (the absolute (y, x) pixel of this tile's top
    left corner), ``schedule`` ("reversed_log" or "uniform").

    For ONNX export: ``step(x_t, t, z) -> v`` is one denoiser evaluation (t: shape (B,) or scalar);
    ``condition(z)`` + ``step_cond(x_t, t, cond)`` split the per-image conditioning (which includes
    the base reconstruction) from the per-step UNet; ``finish(x, cond)`` maps the sampler's final
    state to the [-1, 1] image; ``decode_with_noise(z, noise)`` is the whole decode, deterministic.
    """

    def __init__(self, cfg: EpsConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = EpsUNet(cfg)
        self.base = (tae.decoder(tae.TAEConfig(kind="f8", latent_channels=cfg.latent_channels,
                                               width=cfg.base_width, midblock_gn=cfg.base_midblock_gn))
                     if cfg.base == "tae" else None)
        self.steps = cfg.steps
        self.schedule = cfg.schedule
        self.seed = 0
        self.deterministic_noise = True
        self.noise_origin = (0, 0)

    # -- conditioning ------------------------------------------------------------------------
    def base_image(self, z: torch.Tensor) -> torch.Tensor | None:
        """The deterministic reconstruction in [-1, 1] (clamped as the VAE wrapper clamps it)."""
        if self.base is None:
            return None
        return self.base(z).float().clamp(0, 1) * 2 - 1

    def condition(self, z: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """Per-image conditioning at the UNet input resolution H/patch: z upsampled with nearest
        neighbour [3.1] (to H/patch, which equals nearest-upsampling to H and unshuffling, minus
        the duplicate channels) and, with a base, the pixel-unshuffled base image (``base``: a
        precomputed ``base_image(z)``, e.g. from a training cache)."""
        p = self.cfg.patch
        zu = F.interpolate(z.float(), scale_factor=float(self.cfg.factor // p), mode="nearest")
        b = None if self.base is None else (base if base is not None else self.base_image(z))
        return zu if b is None else torch.cat([zu, F.pixel_unshuffle(b, p)], dim=1)

    # -- the denoiser --------------------------------------------------------------------------
    def step_cond(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """G(x_t, t, z): velocity prediction (Eq. 9), with renormalised input and preconditioning."""
        cfg = self.cfg
        b = x_t.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        tt = t.view(-1, 1, 1, 1)
        s = flow_scale(tt, cfg)
        p = cfg.patch
        x_in = F.pixel_unshuffle(x_t / s, p)
        h, w = x_in.shape[-2:]
        m = self.unet.multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:  # sizes that are not multiples of the UNet's 2^(levels-1): pad, then crop
            x_in = F.pad(x_in, (0, pw, 0, ph), mode="replicate")
            cond = F.pad(cond, (0, pw, 0, ph), mode="replicate")
        out = F.pixel_shuffle(self.unet(x_in, t, cond)[..., :h, :w].float(), p)
        if not cfg.precond:
            return out
        sd = cfg.gamma * cfg.sigma_data
        c_skip = (tt - (1 - tt) * sd * sd) / (s * s)
        c_out = sd / s
        return c_skip * x_t.float() + c_out * out

    def step(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.step_cond(x_t, t, self.condition(z))

    def finish(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Sampler state at t = 0 (gamma * data_scale * x0) -> image in [-1, 1]."""
        img = x.float() / (self.cfg.gamma * self.cfg.data_scale)
        if self.base is not None:
            img = img + F.pixel_shuffle(cond[:, self.cfg.latent_channels:], self.cfg.patch)
        return img

    def x0_hat(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Eq. 10 in pixel space: gamma * x0_hat = x_t - t * v, then undo data scaling / residual."""
        tt = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).reshape(-1, 1, 1, 1)
        return self.finish(x_t.float() - tt * v, cond)

    # -- sampling ------------------------------------------------------------------------------
    def image_shape(self, z: torch.Tensor) -> tuple[int, int, int, int]:
        return (z.shape[0], 3, z.shape[2] * self.cfg.factor, z.shape[3] * self.cfg.factor)

    def decode_with_noise(self, z: torch.Tensor, noise: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        from vaepack.samplers import sample

        cond = self.condition(z)
        x = sample(lambda x_t, t, c: self.step_cond(x_t, t, c), cond, steps or self.steps,
                   shape=self.image_shape(z), noise=noise, schedule=self.schedule)
        return self.finish(x, cond)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        from vaepack.samplers import make_noise

        noise = make_noise(self.image_shape(z), seed=self.seed, deterministic=self.deterministic_noise,
                           origin=self.noise_origin, device=z.device)
        return self.decode_with_noise(z, noise)


# ----------------------------------------------------------------------------- family contract
CONFIGS = {"decoder": EpsConfig}


def build(part: str, cfg: EpsConfig) -> nn.Module:
    if part != "decoder":
        raise ValueError("the eps family only provides a decoder (pair it with any encoder of the space)")
    return EpsDecoder(cfg)


def convert_state_dict(part: str, sd: dict[str, torch.Tensor], cfg: EpsConfig) -> dict[str, torch.Tensor]:
    """vaepack's own layout; a ``decoder.`` prefix (combined files) is stripped."""
    out = {}
    for k, v in sd.items():
        if k.startswith("decoder."):
            k = k[len("decoder."):]
        elif k.startswith("encoder."):
            continue
        out[k] = v
    return out


IMAGE_RANGE = "-1,1"  # the UNet works on zero-mean pixels; the VAE wrapper maps to [0, 1] and clamps
NATIVE_IS_DIFFUSION = True  # it consumes diffusion-space latents directly (like TAE decoders)
