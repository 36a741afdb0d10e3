"""Convert latent files between VAE spaces (issue 14, paper 001 "Bridge").

Two paths, both ending in a LatentRecord of the target model's encoder space:

- **pixel**: decode the source latent with a decoder of its space back to the ORIGINAL image size,
  exactly as ``vaepack decode`` does (``pipeline.decode_record``: remap undone, padding cropped, tiled
  above the budget), then encode that image with the target's encoder at scale 1
  (``pipeline.encode_tensor``: padded to the target factor, tiled above the budget).
- **bridge**: a shipped Bridge (vaepack/bridges.py) maps the latent straight into the target space:
  frozen source decoder up to a tap + a learned projector, no full decode and no target encoder.
  An rgb-tap bridge runs on the pixel path's runtimes: its tap is the source model's decoder (the
  same runner ``decode`` uses) and its projector an ONNX export of its own
  (``export.bridge.cached_bridge_export``); other taps run in torch.

``via="auto"`` takes a bridge when the manifest has one for (source space, target space), else the
pixel path. Every output records where it came from (``LatentRecord.provenance``, metadata key
``conversion``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from vaepack import latents as L
from vaepack.bridges import LoadedBridge, load_bridge
from vaepack.errors import LatentFileError, UsageError
from vaepack.manifest import BridgeEntry, Manifest, ModelEntry, Space, load_manifest
from vaepack.pipeline import TileOptions, decode_record, encode_tensor
from vaepack.runtime import best_cpu_choice, load_vae
from vaepack.vae import DTYPES, VAE, check_device_dtype, pick_device

VIAS = ("auto", "pixel", "bridge")


@dataclass
class Plan:
    """What one latent file goes through."""

    via: str  # pixel | bridge
    source_model: str  # the model that decodes it (pixel) / that wrote it (bridge, provenance only)
    source_space: Space
    bridge: BridgeEntry | None = None


@dataclass
class Converter:
    """Converts latent records into ``to``'s encoder space; loads models on first use and keeps them.

    ``model``: the source model for bare latents (no vaepack metadata); for files with metadata it
    picks the decoder of the pixel path (a model of the file's space, as ``decode --model``).
    ``backend``/``dtype``/``device``/``tiles`` are those of ``decode``/``encode`` for the pixel path;
    a bridge runs untiled, on the same backend when its tap is ``rgb`` (``auto``: the source decoder
    at auto's precision, the projector on the same runtime at the target model's float precision),
    else in torch (fp32 unless ``dtype`` says bf16/fp16)."""

    to: str
    via: str = "auto"
    bridge: str | None = None
    model: str | None = None
    backend: str = "auto"
    dtype: str | None = None
    device: str | None = None
    tiles: TileOptions | None = None
    _man: Manifest = field(init=False, repr=False)
    _target: ModelEntry = field(init=False, repr=False)
    _fixed: BridgeEntry | None = field(init=False, default=None, repr=False)
    _vaes: dict[tuple[str, str], VAE] = field(init=False, default_factory=dict, repr=False)
    _bridges: dict[str, BridgeRun] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Everything that does not depend on a file is refused here, before a model loads.
        self._man = load_manifest()
        self._target = self._man.get(self.to)
        if "encoder" not in self._target.parts:
            raise UsageError(f"model '{self._target.id}' has no encoder, so it defines no latent space to convert into",
                             hint="pick a --to model with an encoder (see `vaepack weights list`)")
        if self.via not in VIAS:
            raise UsageError(f"unknown --via '{self.via}' (choose {', '.join(VIAS)})")
        if self.bridge is not None:
            if self.via == "pixel":
                raise UsageError("--bridge and --via pixel contradict each other")
            self._fixed = self._man.get_bridge(self.bridge)
            if self._fixed.target_space != self._target.space.name:
                raise UsageError(f"bridge '{self._fixed.id}' writes '{self._fixed.target_space}' latents, not the "
                                 f"'{self._target.space.name}' space of '{self._target.id}'")
        if self.model is not None:
            self._man.get(self.model)  # an unknown --model is a usage error up front

    @property
    def target(self) -> ModelEntry:
        return self._target

    # ------------------------------------------------------------------ planning
    def plan(self, rec: L.LatentRecord, path: str) -> Plan:
        man, tgt = self._man, self._target
        src_id = man.resolve(self.model or rec.model)
        if rec.space:  # a vaepack file states its space; --model must decode that space
            if rec.space not in man.spaces:
                raise LatentFileError(f"latent is in the unknown space '{rec.space}'", path=path)
            space = man.spaces[rec.space]
            if self.model is not None and man.get(src_id).space.name != space.name:
                raise LatentFileError(f"latent is in the '{space.name}' space but --model '{self.model}' is in the "
                                      f"'{man.get(src_id).space.name}' space", path=path)
        else:
            space = man.get(src_id).space
        if space.name == tgt.space.name:
            if src_id == tgt.id:
                raise UsageError(f"{path}: latent is already in the '{space.name}' space of '{tgt.id}': nothing to "
                                 "convert")
            if self.via == "bridge" or self._fixed is not None:
                raise UsageError(f"{path}: source and target are both in the '{space.name}' space: no bridge "
                                 "applies", hint="use --via pixel to re-encode with another model of the space")
            return Plan("pixel", src_id, space)
        found = [self._fixed] if self._fixed is not None else man.bridges_for(space.name, tgt.space.name)
        if self._fixed is not None and self._fixed.source_space != space.name:
            raise LatentFileError(f"latent is in the '{space.name}' space but bridge '{self._fixed.id}' reads "
                                  f"'{self._fixed.source_space}' latents", path=path)
        if self.via == "bridge" and not found:
            raise UsageError(f"no bridge from the '{space.name}' space to the '{tgt.space.name}' space "
                             f"({src_id} -> {tgt.id})", hint="use --via pixel (or auto)")
        if self.via != "pixel" and found:
            return Plan("bridge", src_id, space, found[0])
        return Plan("pixel", src_id, space)

    # ------------------------------------------------------------------ running
    def convert(self, rec: L.LatentRecord, path: str | Path) -> L.LatentRecord:
        path = str(path)
        p = self.plan(rec, path)
        prov = {"source_file": path, "source_model": rec.model or p.source_model, "source_space": p.source_space.name,
                "source_weights_sha256": rec.weights_sha256, "via": p.via, "target_model": self._target.id}
        if p.via == "pixel":
            out = self._pixel(rec, path, p, prov)
        else:
            out = self._bridge(rec, path, p, prov)
        out.source = path
        return out

    def _vae(self, model: str, part: str) -> VAE:
        key = (model, part)
        if key not in self._vaes:
            self._vaes[key] = load_vae(model, parts=(part,), device=self.device, dtype=self.dtype,
                                       backend=self.backend)
        return self._vaes[key]

    def _pixel(self, rec: L.LatentRecord, path: str, p: Plan, prov: dict[str, str]) -> L.LatentRecord:
        src = self._man.get(p.source_model)
        if "decoder" not in src.parts:
            raise UsageError(f"{path}: model '{src.id}' has no decoder, and the pixel path decodes the latent",
                             hint=f"pass --model with a decoder of the '{p.source_space.name}' space")
        dec = self._vae(src.id, "decoder")
        # The original image size (remap undone, padding cropped): the target sees the photo's scale.
        x = decode_record(dec, rec, tiles=self.tiles, path=path)
        enc = self._vae(self._target.id, "encoder")
        out = encode_tensor(enc, x, 1.0, "bilinear", self.tiles, path, model_id=self._target.id)
        out.provenance = {**prov, "source_decoder": src.id, "source_decoder_sha256": dec.parts["decoder"].sha256,
                          "target_encoder_sha256": out.weights_sha256}
        return out

    def _bridge_run(self, entry: BridgeEntry) -> BridgeRun:
        if entry.id not in self._bridges:
            self._bridges[entry.id] = self._load_bridge_run(entry)
        return self._bridges[entry.id]

    def _load_bridge_run(self, entry: BridgeEntry) -> BridgeRun:
        dev = pick_device(self.device)
        if self.dtype == "int8":
            raise UsageError("a bridge runs at fp32, bf16 or fp16, not int8", hint="use --via pixel for int8")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UsageError(f"a bridge runs at fp32, bf16 or fp16, not {self.dtype}")
        graph = self.backend != "torch" and dev.type == "cpu" and entry.config.get("tap") == "rgb"
        if self.backend not in ("auto", "torch") and not graph:
            raise UsageError(f"bridge '{entry.id}' runs in torch, not on --backend {self.backend} (only rgb-tap "
                             "bridges have an exported graph)", hint="use --backend torch, or --via pixel")
        if graph:
            name, prec = best_cpu_choice(self._target) if self.backend == "auto" else (self.backend, "fp32")
            if name != "torch":
                return self._graph_bridge(entry, name, self.dtype or prec)
        dtype = self.dtype or "fp32"  # the precision the torch bridge was measured at
        check_device_dtype(dev, dtype)
        lb = load_bridge(entry, device=str(dev))

        def project(f: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
            with torch.no_grad(), _autocast(lb.device, dtype):
                return lb.projector(f.to(lb.device), None if z is None else z.to(lb.device)).float()

        def tap(z: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), _autocast(lb.device, dtype):
                return lb.tap(z.to(lb.device)).float()

        return BridgeRun(lb, tap, project, "torch", dtype)

    def _graph_bridge(self, entry: BridgeEntry, backend: str, precision: str) -> BridgeRun:
        """An rgb-tap bridge on an ONNX runtime: the source decoder's runner + the projector's export."""
        from vaepack.export.bridge import cached_bridge_export
        from vaepack.runtime import projector_runner

        lb = load_bridge(entry, device="cpu")
        dec = load_vae(entry.source, parts=("decoder",), device=self.device, dtype=self.dtype, backend=self.backend)
        path, sc = cached_bridge_export(lb)
        run = projector_runner(backend, path, sc, precision)

        def project(f: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
            return run(f, *(() if z is None else (z,))).float()

        return BridgeRun(lb, lambda z: dec.decode(z).float(), project, backend,
                         f"{dec.precision('decoder')}+{run.precision}")

    def _bridge(self, rec: L.LatentRecord, path: str, p: Plan, prov: dict[str, str]) -> L.LatentRecord:
        entry = p.bridge
        assert entry is not None
        z = source_latent(rec, p.source_space, path)
        br = self._bridge_run(entry)
        out = bridge_record(br, z, rec, path)
        out.dtype, out.backend = br.dtype, br.backend
        out.provenance = {**prov, "bridge": entry.id, "bridge_sha256": br.lb.sha256, "source_decoder": entry.source,
                          "source_decoder_sha256": br.lb.source_decoder_sha256}
        return out


@dataclass
class BridgeRun:
    """A loaded bridge and where its halves run: ``tap(z)`` -> features, ``project(features, z or None)``
    -> target latent (float32 on the CPU or the bridge's device). ``dtype`` names the precisions that
    ran (``decoder+projector`` on graph runtimes)."""

    lb: LoadedBridge
    tap: Callable[[torch.Tensor], torch.Tensor]
    project: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    backend: str
    dtype: str

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.project(self.tap(z), z if self.lb.cfg.latent_skip else None)


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def source_latent(rec: L.LatentRecord, space: Space, path: str) -> torch.Tensor:
    """The unpacked latent of ``rec``, checked to be a latent of ``space`` (what a bridge reads)."""
    z = L.flux2_unpack(rec.latent) if rec.packed else rec.latent
    if rec.space and rec.space != space.name:
        raise LatentFileError(f"latent is in the '{rec.space}' space, not '{space.name}'", path=path)
    if z.shape[1] != space.channels:
        raise LatentFileError(f"latent has {z.shape[1]} channels but the '{space.name}' space has {space.channels}",
                              path=path, hint="pass --model naming the model that wrote it")
    want = L.convention(space)
    if rec.convention and rec.convention != want:
        diff = sorted(k for k in set(want) | set(rec.convention) if want.get(k) != rec.convention.get(k))
        raise LatentFileError(f"latent convention differs from the '{space.name}' space in {', '.join(diff)}",
                              path=path, hint="it was written with other scale/shift/normalization")
    return z.float()


def _pad_to(x: torch.Tensor, m: int) -> tuple[torch.Tensor, int, int]:
    """Replicate-pad right/bottom to a multiple of ``m`` cells: (x, added rows, added columns).
    Replicate, not reflect: it works for any size (a 1-cell latent) and adds no mirrored structure."""
    ph, pw = (-x.shape[-2]) % m, (-x.shape[-1]) % m
    return (F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x), ph, pw


def _extra(n: int, scale: float, want: int) -> int:
    """Replicate cells to add so that resampling ``n`` cells by ``scale`` yields ``want`` (torch sizes
    the output floor(n * scale)); at least 2 cells, as torch 2.13's antialiased kernel weighs (n, 1)
    inputs wrongly (see tiling.axis_weights). None when the input reaches: its boundary stays torch's."""
    e = max(0, 2 - n)
    while math.floor(float(n + e) * scale) < want:
        e += 1
    return e


def _to_original(f: torch.Tensor, d: int, top: int, left: int, orig: tuple[int, int], scaled: tuple[int, int],
                 mult: int) -> torch.Tensor:
    """Cells of ``d`` pixels at a remapped source's scale -> cells of ``d`` pixels of the original photo,
    replicate-padded to a multiple of ``mult`` cells.

    Resample with the exact pixel ratio orig/scaled (not "crop, then stretch to n cells", which would
    stretch the photo by up to d-1 pixels when orig is not a multiple of d): output cell i covers
    original pixels [i d, (i + 1) d). The rows past the scaled area (the source's own padding, then
    replicate) feed the last, partial cell, which the target's padding holds."""
    f = f[..., round(top / d):, round(left / d):]
    (oh, ow), (sh, sw) = orig, scaled
    nh, nw = math.ceil(oh / d), math.ceil(ow / d)
    sy, sx = oh / sh, ow / sw
    eh, ew = _extra(f.shape[-2], sy, nh), _extra(f.shape[-1], sx, nw)
    if eh or ew:
        f = F.pad(f, (0, ew, 0, eh), mode="replicate")
    g = F.interpolate(f, scale_factor=(sy, sx), mode="bilinear", antialias=True, align_corners=False,
                      recompute_scale_factor=False)[..., :nh, :nw]
    return _pad_to(g, mult)[0]


def bridge_record(br: BridgeRun, z: torch.Tensor, rec: L.LatentRecord, path: str) -> L.LatentRecord:
    """Run the bridge ``br`` on the (unpacked, source-space) latent ``z`` of ``rec`` and record the geometry.

    The output's padding is replicate padding of the source latent (scale 1) or of the resampled tap
    features (remapped sources); either way it lies outside ``orig_size`` and ``decode`` crops it."""
    lb = br.lb
    tgt, sf = lb.target.space, lb.source.space.factor
    h, w = z.shape[-2:]
    left, right, top, bottom = rec.padding
    orig, scaled = tuple(rec.orig_size), tuple(rec.scaled_size)
    if orig == (0, 0):  # a bare latent: its native decoded size is the image
        orig = scaled = (h * sf, w * sf)
        left = right = top = bottom = 0
    elif (h * sf - top - bottom, w * sf - left - right) != scaled:
        raise LatentFileError(f"latent is {w}x{h} but its metadata says the padded image was "
                              f"{scaled[1] + left + right}x{scaled[0] + top + bottom}", path=path,
                              hint="the metadata does not belong to this latent")
    rec_kw = dict(model=lb.target.id, space=tgt.name, weights_sha256=lb.sha256, convention=L.convention(tgt),
                  dtype="", source=path, backend="torch")
    if rec.scale == 1.0 or orig == scaled:
        # Same geometry as the source: pad the latent to whole target cells (4 for f8 -> f32) and
        # record the added cells as image padding on the right/bottom.
        zp, ph, pw = _pad_to(z, tgt.factor // sf)
        y = br(zp).float()
        return L.LatentRecord(latent=y.cpu(), scale=rec.scale, filter=rec.filter, orig_size=orig, scaled_size=scaled,
                              padding=(left, right + pw * sf, top, bottom + ph * sf), **rec_kw)
    # A remapped source (encoded at --scale s) describes the photo at s times its size. The target
    # space's encoder would see the photo at its own scale (the pixel path decodes back to orig_size
    # first, as `decode` does), so the tap features (and the latent the projector also reads, with
    # latent_skip) are resampled to the original scale here and the output records scale 1.
    d = lb.divisor
    g = _to_original(br.tap(z).float().cpu(), d, top, left, orig, scaled, tgt.factor // d)
    zs = _to_original(z.float().cpu(), sf, top, left, orig, scaled, tgt.factor // sf) if lb.cfg.latent_skip else None
    y = br.project(g, zs).float()
    hp, wp = y.shape[-2] * tgt.factor, y.shape[-1] * tgt.factor
    (oh, ow) = orig
    return L.LatentRecord(latent=y.cpu(), scale=1.0, filter="bilinear", orig_size=orig, scaled_size=orig,
                          padding=(0, wp - ow, 0, hp - oh), **rec_kw)


def convert_record(rec: L.LatentRecord, path: str | Path, to: str, via: str = "auto", bridge: str | None = None,
                   model: str | None = None, backend: str = "auto", dtype: str | None = None,
                   device: str | None = None, tiles: TileOptions | None = None) -> L.LatentRecord:
    """Convert one latent record into ``to``'s encoder space (see ``Converter``; load models once with
    a Converter when converting many files)."""
    return Converter(to, via, bridge, model, backend, dtype, device, tiles).convert(rec, path)
