"""Bridge: a learned interface from one VAE latent space into another (paper 001, "Bridge").

The paper's recipe (abstract-level text in shared/papers/001): a *frozen source VAE decoder* used as a
spatial prior, plus a *compact learnable projector* into the target space. Here:

    z_source --[source TAE decoder, run up to a tap]--> features --[Bridge]--> z_target

- ``tap_layers`` cuts the frozen source decoder (an upstream TAE ``nn.Sequential``) after a named stage:
  ``latent`` (no decoder layer), ``s0`` .. ``s2`` (end of that stage's blocks: 1x, 2x, 4x the latent
  resolution), ``pre_rgb`` (the last full-resolution features) or ``rgb`` (the decoded image, clamped
  to [0, 1] like every vaepack decoder). Fewer decoder layers = cheaper; which tap is best is measured
  (benchmarks/results/bridge.md).
- ``Bridge`` (the projector) = an adapter (one conv, or conv + ``adapter_blocks`` TAE blocks + conv)
  from the tap's channels/resolution to the matching point inside a TAE *f32* encoder (TAESana's
  layout, shared/reference/architectures.md section 1) + that encoder's remaining layers, so those
  can be warm-started from TAESana's own weights and the adapter can be trained to reproduce
  TAESana's features at that point (``entry_index``; vaepack.train.bridge ``w_feat``). With the
  ``rgb`` tap there is no adapter: the projector *is* the TAESana encoder, and the untrained bridge
  equals the pixel path exactly.
- ``latent_skip`` (optional): the source latent itself enters the projector where its features are
  at 1/8 of the image (the f32 encoder's ``s1.b0``), through a zero-initialized 1x1 conv added to
  them, and with ``skip_stages`` 2 or 3 also average-pooled at 1/16 (``s2.b0``) and 1/32 (``s3.b0``).
  A decoded image has lost what the source decoder could not draw; the latent still holds it. Zero
  init: the untrained skip leaves the bridge what it was (the pixel path for ``rgb``); it costs
  latent_channels x width MACs per cell where it enters (0.01% of the rgb bridge). Measured in
  benchmarks/results/bridge.md. ``skip_hidden`` N > 0 reads the latent through a 3x3 conv to N channels and a
  ReLU first (latent_channels x N x 9 + N x width MACs per cell).

Tensors are raw latents of each space (TAE latents already are diffusion-space latents), images [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.models import tae

# tap -> (resolution of the tap relative to the image, as a divisor; channels are read from the config)
TAP_DIVISOR = {"latent": 8, "s0": 8, "s1": 4, "s2": 2, "pre_rgb": 1, "rgb": 1}

# Where the tap's features enter the f32 encoder (TAESana layout): (role of the first kept layer,
# whether the adapter replaces a stride-2 conv). The encoder's resolutions: stem.0 -> H/2,
# stem.2 -> H/4, s0 blocks at H/4, s1 at H/8, s2 at H/16, s3 at H/32.
_ENTRY = {
    8: ("s1.b0", False),     # features at H/8: skip everything up to and including s1.down
    4: ("s0.b0", False),     # H/4: enter at the first block after the stem
    2: ("stem.3", True),     # H/2: the adapter is the stride-2 conv stem.2
    1: ("stem.1", True),     # H (pre_rgb): the adapter is the stride-2 conv stem.0
}


@dataclass(frozen=True)
class BridgeConfig:
    tap: str = "s0"
    tap_channels: int = 64  # source decoder width at the tap (3 for rgb, the latent channels for latent)
    target_channels: int = 32
    width: int = 64  # the f32 encoder's width (TAESana: 64)
    # Blocks per stage of the f32 encoder (H/4, H/8, H/16, H/32); None = TAESana's (1, 3, 3, 3).
    blocks: tuple[int, ...] | None = None
    adapter_blocks: int = 0  # TAE blocks inside the adapter (0: one linear conv)
    latent_skip: int = 0  # source latent channels added in at the projector's 1/8 point (0: no skip)
    skip_stages: int = 1  # where the latent enters: 1/8 only (1), also 1/16 (2), also 1/32 (3)
    # 0: each skip is one 1x1 conv; N > 0: conv 3x3 (latent -> N) + ReLU + conv 1x1 (N -> width), so the
    # latent is read through its 3x3 neighbourhood and a nonlinearity before it meets the image features
    skip_hidden: int = 0

    def __post_init__(self):
        if self.tap not in TAP_DIVISOR:
            raise ValueError(f"bridge tap must be one of {', '.join(TAP_DIVISOR)}, got {self.tap!r}")
        if self.tap == "rgb" and self.tap_channels != 3:
            raise ValueError("the rgb tap has 3 channels")
        if self.adapter_blocks < 0 or (self.tap == "rgb" and self.adapter_blocks):
            raise ValueError("adapter_blocks must be >= 0 (and 0 for the rgb tap, which has no adapter)")
        if self.skip_hidden < 0 or (self.skip_hidden and not self.latent_skip):
            raise ValueError("skip_hidden must be >= 0, and 0 without latent_skip")
        if not 1 <= self.skip_stages <= 3:
            raise ValueError(f"skip_stages must be 1, 2 or 3, got {self.skip_stages}")
        if self.latent_skip < 0 or (self.latent_skip and TAP_DIVISOR[self.tap] > 4):
            raise ValueError("latent_skip needs a tap at 1/4 of the image or finer (its entry lies before "
                             "the projector's 1/8 point) and a channel count >= 0")
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))

    def target_encoder(self) -> tae.TAEConfig:
        return tae.TAEConfig(kind="f32", latent_channels=self.target_channels, width=self.width, blocks=self.blocks)

    @property
    def divisor(self) -> int:
        return TAP_DIVISOR[self.tap]


def entry_index(cfg: BridgeConfig) -> int:
    """Index of the first f32-encoder layer the bridge keeps; the layers before it are what the
    adapter replaces (their output is the adapter's feature target in training)."""
    if cfg.tap == "rgb":
        return 0
    return tae.roles("encoder", cfg.target_encoder()).index(_ENTRY[cfg.divisor][0])


def _adapter(cfg: BridgeConfig) -> nn.Module | None:
    """Tap features -> the f32 encoder's features at the entry point. Linear at the end, because the
    entry features are pre-activation (a conv output; the strided entries' ReLU is a kept layer).
    ``adapter_blocks`` TAE blocks in between give it room to translate decoder features into
    encoder features (measured: benchmarks/results/bridge.md)."""
    if cfg.tap == "rgb":
        return None
    strided = _ENTRY[cfg.divisor][1]
    c_out = cfg.width // 2 if cfg.divisor == 1 else cfg.width  # stem.0 outputs width/2 channels
    if cfg.adapter_blocks == 0:
        return tae.conv(cfg.tap_channels, c_out, stride=2 if strided else 1)
    return nn.Sequential(tae.conv(cfg.tap_channels, cfg.width, stride=2 if strided else 1), nn.ReLU(),
                         *(tae.Block(cfg.width) for _ in range(cfg.adapter_blocks)), tae.conv(cfg.width, c_out))


def _skip(cfg: BridgeConfig) -> nn.Module:
    """One latent skip: latent channels -> the projector's width, its last conv zero-initialized (the
    untrained skip adds nothing)."""
    if cfg.skip_hidden:
        m = nn.Sequential(tae.conv(cfg.latent_skip, cfg.skip_hidden), nn.ReLU(), nn.Conv2d(cfg.skip_hidden, cfg.width, 1))
        last = m[2]
    else:
        m = last = nn.Conv2d(cfg.latent_skip, cfg.width, 1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return m


class Bridge(nn.Module):
    """Projector: tap features (B, tap_channels, H/d, W/d) -> target latent (B, C, H/32, W/32)."""

    def __init__(self, cfg: BridgeConfig):
        super().__init__()
        self.cfg = cfg
        self.first = entry_index(cfg)
        adapter = _adapter(cfg)
        layers = list(tae.encoder(cfg.target_encoder()))[self.first:]
        self.layers = nn.Sequential(*([adapter] if adapter is not None else []), *layers)
        self.skip_at: dict[int, int] = {}  # layer index -> its skip conv (pooling 2**k for the k-th)
        if cfg.latent_skip:
            kept = tae.roles("encoder", cfg.target_encoder())[self.first:]
            off = 0 if adapter is None else 1
            try:
                self.skip_at = {kept.index(f"s{k + 1}.b0") + off: k for k in range(cfg.skip_stages)}
            except ValueError:
                raise ValueError("latent_skip enters at the first block of stages 1..skip_stages; this "
                                 "projector has none in one of them") from None
            self.skip = nn.ModuleList(_skip(cfg) for _ in range(cfg.skip_stages))

    def adapt(self, feats: torch.Tensor) -> torch.Tensor:
        """The adapter's output: the f32 encoder's features at the entry point (identity for rgb)."""
        return feats if self.cfg.tap == "rgb" else self.layers[0](feats)

    def forward(self, feats: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """``z``: the source latent (1/8 of the image) when the config has ``latent_skip``."""
        return self.tail(feats, 0, z)

    def tail(self, h: torch.Tensor, start: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """``self.layers[start:]`` on ``h`` (``start`` 1: after the adapter), with the latent skip."""
        if not self.skip_at:
            return self.layers[start:](h)
        if z is None:
            raise ValueError("this bridge takes the source latent too (latent_skip)")
        for i in range(start, len(self.layers)):
            k = self.skip_at.get(i)
            if k is not None:
                zk = z.to(h.dtype) if k == 0 else F.avg_pool2d(z.to(h.dtype), 2 ** k)
                if zk.shape[-2:] != h.shape[-2:]:
                    raise ValueError(f"the source latent is {tuple(z.shape[-2:])} cells but the projector's 1/8 "
                                     f"features are {tuple(2 ** k * n for n in h.shape[-2:])}")
                h = h + self.skip[k](zk)
            h = self.layers[i](h)
        return h


def warm_start(bridge: Bridge, target_encoder_sd: dict[str, torch.Tensor]) -> int:
    """Copy the f32 encoder's weights (TAESana, upstream ``nn.Sequential`` keys) into the layers the
    bridge kept, matched by role (depth-pruned blocks keep each stage's first blocks). Returns the
    number of tensors copied; the adapter keeps its fresh init."""
    full = tae.roles("encoder", tae.TAEConfig(kind="f32", latent_channels=bridge.cfg.target_channels,
                                               width=bridge.cfg.width))
    mine = tae.roles("encoder", bridge.cfg.target_encoder())[bridge.first:]
    offset = 0 if bridge.cfg.tap == "rgb" else 1  # index 0 of self.layers is the adapter
    sd, n = bridge.layers.state_dict(), 0
    for i, role in enumerate(mine):
        j = full.index(role)
        for k in list(sd):
            head, _, rest = k.partition(".")
            if head == str(i + offset) and f"{j}.{rest}" in target_encoder_sd:
                src = target_encoder_sd[f"{j}.{rest}"]
                if src.shape == sd[k].shape:
                    sd[k] = src.clone()
                    n += 1
    bridge.layers.load_state_dict(sd)
    return n


def tap_index(decoder_roles: list[str], tap: str) -> int:
    """How many layers of the source decoder run for ``tap`` (a prefix of its ``nn.Sequential``)."""
    if tap == "latent":
        return 0
    if tap in ("rgb",):
        return len(decoder_roles)
    stage = {"pre_rgb": "s3"}.get(tap, tap)
    blocks = [i for i, r in enumerate(decoder_roles) if r.startswith(f"{stage}.b")]
    if not blocks:
        raise ValueError(f"the source decoder has no blocks in stage {stage} for the '{tap}' tap")
    return blocks[-1] + 1


class Tap(nn.Module):
    """The frozen source decoder cut at the tap (for ``rgb``: the whole decoder, output clamped to
    [0, 1] as the pixel path's decoder wrapper does)."""

    def __init__(self, decoder: nn.Sequential, decoder_roles: list[str], tap: str):
        super().__init__()
        self.tap = tap
        self.layers = decoder[:tap_index(decoder_roles, tap)]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.layers(z)
        return y.clamp(0, 1) if self.tap == "rgb" else y

    def out_channels(self, latent_channels: int) -> int:
        """Channels at the tap (a bridge's ``tap_channels``), from one tiny forward: right for any
        block layout of the cut decoder."""
        with torch.no_grad():
            return int(self(torch.zeros(1, latent_channels, 2, 2)).shape[1])


CONFIGS = {"bridge": BridgeConfig}


def build(part: str, cfg: BridgeConfig) -> nn.Module:
    return Bridge(cfg)
