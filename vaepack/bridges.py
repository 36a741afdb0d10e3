"""Load a shipped Bridge (paper 001): the frozen source decoder cut at a tap + the learned projector.

A bridge entry (``bridges:`` in weights_manifest.yaml, ``manifest.BridgeEntry``) names a *source*
model whose decoder is the frozen spatial prior and a *target* model whose encoder space the bridge
writes. Loading goes through the same checks as a model part (vaepack/loader.py): the bridge file's
sha256 (``weights.ensure``: the manifest hash or the trust-on-first-use record), a safe deserializer,
the manifest's architecture against the tensor shapes (``check_shapes``), then a strict load. The
file holds ``models.bridge.Bridge(cfg).state_dict()`` (keys ``layers.<i>.*``); the source decoder
comes from its own model entry (``loader.load_part``), so its sha256 is recorded separately.

Tensors are diffusion-space latents of each space: TAE decoders take them as they are, so the tap
needs no convention step (only TAE-family source decoders are accepted, ``Tap`` cuts their layers).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vaepack import weights as W
from vaepack.errors import ManifestError
from vaepack.loader import check_shapes, load_part, make_config, read_state_dict
from vaepack.manifest import BridgeEntry, ModelEntry, load_manifest
from vaepack.models import bridge as B
from vaepack.models import tae
from vaepack.vae import pick_device


def bridge_config(entry: BridgeEntry) -> B.BridgeConfig:
    """The entry's ``config`` as a BridgeConfig (unknown keys and bad values are manifest errors)."""
    w = f"bridges.{entry.id}.config"
    names = {f.name for f in dataclasses.fields(B.BridgeConfig)}
    extra = set(entry.config) - names
    if extra:
        raise ManifestError(f"{w}: unknown keys {sorted(extra)} (known: {sorted(names)})")
    try:
        return B.BridgeConfig(**entry.config)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"{w}: bad config: {e}") from None


def _check_ends(entry: BridgeEntry, cfg: B.BridgeConfig, source: ModelEntry, target: ModelEntry) -> None:
    """What the manifest layer cannot know: the projector writes an f32 latent of ``target_channels``."""
    w = f"bridges.{entry.id}"
    if target.space.factor != 32:  # Bridge = the tail of a TAE f32 encoder (models/bridge.py)
        raise ManifestError(f"{w}: the projector writes 1/32-resolution latents, but the target space "
                            f"'{target.space.name}' has factor {target.space.factor}")
    if cfg.target_channels != target.space.channels:
        raise ManifestError(f"{w}: config target_channels {cfg.target_channels} but the '{target.space.name}' "
                            f"space has {target.space.channels} channels")
    if target.space.factor % source.space.factor:
        raise ManifestError(f"{w}: the target factor {target.space.factor} is not a multiple of the source "
                            f"factor {source.space.factor}")
    fam = source.part("decoder").family
    if fam != "tae":
        raise ManifestError(f"{w}: the source decoder must be a TAE (family tae) to be cut at a tap, "
                            f"'{source.id}' has family {fam}")


class LoadedBridge(nn.Module):
    """z_source (1/source-factor of the image) -> z_target (1/32): ``projector(tap(z))``.

    ``tap`` and ``projector`` are used apart by vaepack.convert for remapped sources (the tap features
    are resampled to the original image's scale in between)."""

    def __init__(self, entry: BridgeEntry, source: ModelEntry, target: ModelEntry, tap: B.Tap,
                 projector: B.Bridge, sha256: str, source_decoder_sha256: str):
        super().__init__()
        self.entry, self.source, self.target = entry, source, target
        self.tap = tap
        self.projector = projector
        self.sha256 = sha256
        self.source_decoder_sha256 = source_decoder_sha256

    @property
    def cfg(self) -> B.BridgeConfig:
        return self.projector.cfg

    @property
    def divisor(self) -> int:
        """Image pixels per tap feature cell (TAP_DIVISOR: latent/s0 8, s1 4, s2 2, pre_rgb/rgb 1)."""
        return self.cfg.divisor

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def forward(self, z_source: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tap(z_source), z_source if self.cfg.latent_skip else None)


def load_bridge(bridge_id: str | BridgeEntry, device: str | None = None) -> LoadedBridge:
    """Load a manifest bridge (fp32, eval mode, frozen) on ``device``; weights verified, strict load."""
    man = load_manifest()
    entry = man.get_bridge(bridge_id) if isinstance(bridge_id, str) else bridge_id
    source, target = man.get(entry.source), man.get(entry.target)
    cfg = bridge_config(entry)
    _check_ends(entry, cfg, source, target)

    decoder, _, dec_sha = load_part(source, "decoder")
    dec_cfg = make_config(source.part("decoder"), source.id)
    try:
        tap = B.Tap(decoder, tae.roles("decoder", dec_cfg), cfg.tap)
    except ValueError as e:  # e.g. a depth-pruned decoder without blocks in the tapped stage
        raise ManifestError(f"bridges.{entry.id}: {e}") from None
    have = tap.out_channels(source.space.channels)
    if have != cfg.tap_channels:
        raise ManifestError(f"bridges.{entry.id}: config tap_channels {cfg.tap_channels} but the decoder of "
                            f"'{source.id}' has {have} channels at the '{cfg.tap}' tap")

    projector = B.Bridge(cfg)
    paths = W.ensure(entry, "bridge")  # verified against the manifest / trust-on-first-use hash
    sd: dict[str, torch.Tensor] = {}
    for p in paths:
        sd.update(read_state_dict(p))
    check_shapes(projector, sd, f"bridge '{entry.id}'")
    ref = projector.state_dict()
    projector.load_state_dict({k: v.to(ref[k].dtype) for k, v in sd.items()}, strict=True)
    digest = "+".join(W.expected_sha256(f) or W.sha256_file(p) for f, p in zip(entry.files, paths))

    out = LoadedBridge(entry, source, target, tap, projector, digest, dec_sha).eval()
    out.requires_grad_(False)
    return out.to(pick_device(device))
