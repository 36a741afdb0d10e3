"""Encode / decode / round trip with resolution remapping, padding and tiling.

Resolution remapping (Chu et al. 2026, "Distilling Latent Manifolds", Sec. IV and Table III): a
distilled student reconstructs far better when the image is *upsampled* before encoding ("pre"
interpolation) and the reconstruction is downsampled back. ``encode_tensor`` records everything
needed to undo it (scale, filter, original size, padding) and ``decode_record`` undoes it.

Sizes that are not a multiple of the model's factor are reflect-padded on the right/bottom, and
the padding is recorded and cropped after decoding. Inputs above a pixel budget run tiled with
overlapping tiles blended by linear ramps, so the seams vanish (tested against untiled runs); a
tiled run reads the (uint8) image tile by tile and writes the output in row strips, so its memory
follows the tile and the latent, not the float image (vaepack/tiling.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vaepack import latents as L
from vaepack.errors import ImageError, LatentFileError, UsageError
from vaepack.io import image_float
from vaepack.tiling import FILTERS, Canvas, Crop, Remap, Resize, RowSink, TileRunner, resize
from vaepack.vae import VAE

__all__ = ["FILTERS", "DEFAULT_TILE_BUDGET", "TileOptions", "resize", "scaled_size", "pad_to_multiple", "plan",
           "prepare", "runtime", "encode_tiles", "encode_tensor", "encode_batch", "check_compatible",
           "decode_runtime", "decode_record", "decode_image", "roundtrip_tensor", "tile_budget_default"]

DEFAULT_TILE_BUDGET = 1536 * 1536  # pixels per forward pass before tiling kicks in


def tile_budget_default() -> int:
    env = os.environ.get("VAEPACK_TILE_BUDGET")
    return int(env) if env else DEFAULT_TILE_BUDGET


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, round(h * scale)), max(1, round(w * scale))


def pad_to_multiple(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % factor, (-w) % factor
    if not (ph or pw):
        return x, (0, 0, 0, 0)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (0, pw, 0, ph)


@dataclass
class TileOptions:
    budget: int | None = None  # pixels; None = default; 0 = never tile
    tile: int = 512  # tile edge in image pixels (rounded to the model factor)
    overlap: int = 64  # overlap in image pixels

    def active(self, pixels: int) -> bool:
        b = tile_budget_default() if self.budget is None else self.budget
        return b > 0 and pixels > b

    def runner(self, factor: int, sink: RowSink | None = None) -> TileRunner:
        """The tiler for ``VAE.encode``/``VAE.decode`` (tile and overlap in latent pixels)."""
        return TileRunner(max(1, self.tile // factor), max(0, self.overlap // factor), factor, sink)


def runtime(vae: VAE, part: str, tiled: bool) -> dict[str, str]:
    """The backend and precision that run ``part``: tiled runs use the torch module (its split keeps
    GroupNorm statistics whole, a runner would not), at the VAE's dtype even where a runner (e.g.
    OpenVINO bf16, int8) is loaded; untiled runs use the part's runner if any."""
    return {"backend": "torch", "dtype": vae.dtype} if tiled else vae.runtime(part)


# --------------------------------------------------------------------------- public API
def plan(h: int, w: int, factor: int, scale: float, filter: str, source: str = "",
         multiple: int | None = None) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int]]:
    """(original size, remapped size, padding (left, right, top, bottom)) of an h x w image: what
    ``prepare`` does, decided without touching pixels."""
    if not (math.isfinite(scale) and scale > 0):
        raise UsageError(f"--scale must be a positive number, got {scale}")
    if filter not in FILTERS:
        raise UsageError(f"unknown filter '{filter}' (choose {', '.join(FILTERS)})")
    sh, sw = scaled_size(h, w, scale)
    if sh < factor or sw < factor:
        raise ImageError(f"image is {w}x{h}, smaller than one latent pixel ({factor}x{factor}) at scale {scale:g}",
                         path=source or None, hint=f"use a larger image or --scale >= {factor / min(h, w):.2f}")
    m = multiple or factor
    return (h, w), (sh, sw), (0, (-sw) % m, 0, (-sh) % m)


def prepare(x: torch.Tensor, factor: int, scale: float, filter: str, source: str = "",
            multiple: int | None = None):
    """Remap + pad one image (3, H, W) (float in [0, 1] or uint8) -> (1, 3, H', W'), recording what was done.

    The padding reaches a multiple of ``multiple`` (default ``factor``; e.g. 2 * factor where the
    latent must have an even size, as FLUX.2's packed form)."""
    orig, (sh, sw), _ = plan(x.shape[-2], x.shape[-1], factor, scale, filter, source, multiple)
    xs = resize(image_float(x)[None], (sh, sw), filter)
    xp, pad = pad_to_multiple(xs, multiple or factor)
    return xp, orig, (sh, sw), pad


def encode_tiles(vae: VAE, h: int, w: int, scale: float, tiles: TileOptions | None = None,
                 pad_multiple: int | None = None) -> bool:
    """Whether an h x w image is encoded tiled (its remapped, padded size is above the budget)."""
    if not (math.isfinite(scale) and scale > 0):
        return False  # ``plan`` refuses it with the usage error
    m = pad_multiple or vae.factor
    sh, sw = scaled_size(h, w, scale)
    return (tiles or TileOptions()).active((sh + (-sh) % m) * (sw + (-sw) % m))


def _record(vae: VAE, z: torch.Tensor, model_id: str | None, scale: float, filter: str, orig, ssize, pad,
            ran: dict[str, str], source: str) -> L.LatentRecord:
    return L.LatentRecord(latent=z.cpu(), model=model_id or vae.entry.id, space=vae.space.name,
                          weights_sha256=vae.parts["encoder"].sha256, scale=scale, filter=filter,
                          orig_size=orig, scaled_size=ssize, padding=pad, convention=L.convention(vae.space),
                          dtype=ran["dtype"], source=source, backend=ran["backend"],
                          base=base_info(vae, orig, ssize) if vae.space.base else {})


# --------------------------------------------------------------------------- structured (DA-VAE) latents
# A DA latent's first ``base_channels`` channels are a latent of the base space of the padded image
# downsampled 2x (vaepack/models/da.py). The file records that half-size image (``base``), so a
# base-space decoder can show it as a preview, and ``--base-only`` writes the base latent alone.
def base_info(vae: VAE, orig, ssize) -> dict:
    """What a DA latent file records about its base channels: space, channels, the 2x downsample
    filter, the half-size image inside the padded base image and the preview size."""
    return {"space": vae.space.base, "channels": vae.space.base_channels,
            "filter": vae.parts["encoder"].module.cfg.down_filter,
            "image_size": [-(-ssize[0] // 2), -(-ssize[1] // 2)], "preview_size": [max(1, round(orig[0] / 2)),
                                                                               max(1, round(orig[1] / 2))]}


def base_vae(vae: VAE) -> tuple[VAE, str]:
    """The frozen base encoder inside a DA model's encoder as a VAE of the base space, and the filter
    of its 2x downsample: ``encode_tensor(base, x, scale / 2, filter)`` is exactly ``vaepack encode
    --model <the base model> --scale 0.5 --filter F`` (the pipeline's own resize does the downsample)."""
    import dataclasses

    from vaepack.manifest import PartSpec, load_manifest
    from vaepack.models.tae import tile_split
    from vaepack.vae import Part

    if not vae.space.base:
        raise UsageError(f"--base-only applies to structured (DA-VAE) models; '{vae.entry.id}' writes plain "
                         f"'{vae.space.name}' latents")
    p = vae.parts["encoder"]
    module = p.module
    space = load_manifest().spaces[vae.space.base]
    spec = PartSpec(part="encoder", family="tae", config={}, files=())
    # Named after the base model, so `vaepack decode` of the file picks the base space's decoder.
    entry = dataclasses.replace(vae.entry, id=vae.entry.base_model, space=space, parts={"encoder": spec},
                                base_model="", aliases=())
    part = Part(module=module.base, image_range=p.image_range, native_is_diffusion=True, sha256=p.sha256,
                split=tile_split("encoder", module.base))
    return VAE(entry=entry, parts={"encoder": part}, device=vae.device, dtype=vae.dtype), module.cfg.down_filter


def base_record(rec: L.LatentRecord, space) -> L.LatentRecord:
    """A DA latent's base channels as a record of the base ``space``: decoding it gives the half-size
    preview image (``base['preview_size']``)."""
    b = rec.base
    if not b or b.get("space") != space.name:
        raise LatentFileError(f"latent has no '{space.name}' base channels", hint="decode it with its own model")
    c = int(b["channels"])
    z = rec.latent[:, :c]
    ih, iw = (int(v) for v in b["image_size"])
    hp, wp = z.shape[-2] * space.factor, z.shape[-1] * space.factor
    if ih > hp or iw > wp:
        raise LatentFileError("latent metadata 'base' does not fit the latent", hint="decode with --native")
    ph, pw = (int(v) for v in b["preview_size"])
    return L.LatentRecord(latent=z, model=rec.model, space=space.name, weights_sha256=rec.weights_sha256,
                          scale=1.0, filter=b.get("filter", "bicubic"), orig_size=(ph, pw), scaled_size=(ih, iw),
                          padding=(0, wp - iw, 0, hp - ih), convention=L.convention(space), dtype=rec.dtype,
                          source=rec.source, backend=rec.backend)


def is_base_preview(rec: L.LatentRecord, vae: VAE) -> bool:
    """``rec`` is a DA latent and ``vae`` decodes its base space: decoding gives the half-size preview."""
    return bool(rec.base) and rec.space != vae.space.name and rec.base.get("space") == vae.space.name


def encode_tensor(vae: VAE, x: torch.Tensor, scale: float = 1.0, filter: str = "bilinear",
                  tiles: TileOptions | None = None, source: str = "", model_id: str | None = None,
                  pad_multiple: int | None = None) -> L.LatentRecord:
    """Encode one image (3, H, W) - float in [0, 1], or uint8 (``load_image(uint8=True)``) - into a
    LatentRecord. A tiled run reads each tile from the uint8 image (remap and padding per tile), so
    the whole image never exists as float; the record names the backend and precision that ran."""
    tiles = tiles or TileOptions()
    orig, ssize, pad = plan(x.shape[-2], x.shape[-1], vae.factor, scale, filter, source, pad_multiple)
    if encode_tiles(vae, x.shape[-2], x.shape[-1], scale, tiles, pad_multiple):
        z = vae.encode(Remap(x, ssize, filter, pad), tiler=tiles.runner(vae.factor))
        return _record(vae, z, model_id, scale, filter, orig, ssize, pad, runtime(vae, "encoder", True), source)
    xp = prepare(x, vae.factor, scale, filter, source, pad_multiple)[0]
    z = vae.encode(xp)
    return _record(vae, z, model_id, scale, filter, orig, ssize, pad, runtime(vae, "encoder", False), source)


def encode_batch(vae: VAE, xs: list[torch.Tensor], scale: float = 1.0, filter: str = "bilinear",
                 tiles: TileOptions | None = None, sources: list[str] | None = None,
                 model_id: str | None = None, pad_multiple: int | None = None) -> list[L.LatentRecord]:
    """Encode images of equal size in one forward pass (one by one if sizes differ or they are tiled)."""
    sources = sources or [""] * len(xs)
    if len(xs) == 1 or len({tuple(x.shape) for x in xs}) != 1 or \
            encode_tiles(vae, xs[0].shape[-2], xs[0].shape[-1], scale, tiles, pad_multiple):
        return [encode_tensor(vae, x, scale, filter, tiles, s, model_id, pad_multiple) for x, s in zip(xs, sources)]
    prepared = [prepare(x, vae.factor, scale, filter, s, pad_multiple) for x, s in zip(xs, sources)]
    z = vae.encode(torch.cat([p[0] for p in prepared]))
    ran = runtime(vae, "encoder", False)
    return [_record(vae, z[i:i + 1], model_id, scale, filter, p[1], p[2], p[3], ran, s)
            for i, (p, s) in enumerate(zip(prepared, sources))]


def other_detail_writer(writer: str | None, decoder_entry) -> str | None:
    """The manifest id of ``writer`` when its latents are in a structured space and ``decoder_entry``
    is another model of it, else None. Such a space shares only its base channels: the detail channels
    are each encoder's own code, so another model's decoder reads them wrongly (a `da-dm` latent through
    `da`'s decoder: 24.4 vs 27.0 dB on a dev photo) - a silent quality loss decode and roundtrip refuse.
    A writer the manifest does not know (a run folder) gives None: nothing to compare."""
    if not (decoder_entry.space.base and writer):
        return None
    from vaepack.manifest import load_manifest

    try:
        wrote = load_manifest().get(writer).id
    except UsageError:
        return None
    return wrote if wrote != decoder_entry.id else None


def check_compatible(rec: L.LatentRecord, vae: VAE, force: bool = False, path: str | None = None) -> None:
    """Refuse to decode a latent from another latent space (unless forced).

    Latents of one space are interchangeable by design (e.g. vaepack's default encoder and TAEF2 both
    write FLUX.2-space latents), so the check is on the space and its recorded convention (and, in a
    structured space, on the model: ``other_detail_writer``), and on the channel count, which no force
    can fix.
    """
    z = rec.latent
    c = vae.space.channels * (4 if rec.packed else 1)
    if z.shape[1] != c:
        raise LatentFileError(f"latent has {z.shape[1]} channels but '{vae.entry.id}' decodes {c}-channel latents",
                              path=path, hint="pick the decoder of the model that wrote it (--model)")
    if force or not rec.space:
        return
    if rec.space != vae.space.name:
        raise LatentFileError(f"latent is in the '{rec.space}' space (written by '{rec.model}') but "
                              f"'{vae.entry.id}' decodes '{vae.space.name}' latents", path=path,
                              hint="use a decoder of that space, or --force-space")
    wrote = other_detail_writer(rec.model, vae.entry)
    if wrote:
        raise LatentFileError(f"latent's detail channels were written by '{wrote}' and only its decoder reads "
                              f"them, not '{vae.entry.id}'", path=path,
                              hint=f"decode with --model {wrote} (--decoder {vae.entry.base_model} for the half-size "
                                   "preview), or --force-space")
    want = L.convention(vae.space)
    if rec.convention and rec.convention != want:
        diff = sorted(k for k in set(want) | set(rec.convention) if want.get(k) != rec.convention.get(k))
        raise LatentFileError(f"latent convention differs from '{vae.entry.id}' in {', '.join(diff)}", path=path,
                              hint="it was written with other scale/shift/normalization; use --force-space to decode anyway")


def _latent(rec: L.LatentRecord) -> torch.Tensor:
    return L.flux2_unpack(rec.latent) if rec.packed else rec.latent


def decode_runtime(vae: VAE, rec: L.LatentRecord, tiles: TileOptions | None = None) -> dict[str, str]:
    """The backend and precision that decode ``rec`` (see ``runtime``)."""
    h, w = _latent(rec).shape[-2:]
    return runtime(vae, "decoder", (tiles or TileOptions()).active(h * w * vae.factor ** 2))


def _decode(vae: VAE, rec: L.LatentRecord, native: bool, tiles: TileOptions | None, force: bool,
            path: str | None, make: Callable[[int, int], RowSink]):
    """Decode into ``make(height, width)``: one write when untiled, row strips as they finish when tiled."""
    if is_base_preview(rec, vae):  # the caller says so (decode: a note)
        rec = base_record(rec, vae.space)
    check_compatible(rec, vae, force, path)
    z = _latent(rec)
    f = vae.factor
    hp, wp = z.shape[-2] * f, z.shape[-1] * f
    whole = native or rec.orig_size == (0, 0)
    left, right, top, bottom = rec.padding
    if not whole and (hp - top - bottom, wp - left - right) != tuple(rec.scaled_size):
        raise LatentFileError(f"latent is {z.shape[-1]}x{z.shape[-2]} but its metadata says the padded image was "
                              f"{rec.scaled_size[1] + left + right}x{rec.scaled_size[0] + top + bottom}",
                              path=path, hint="the metadata does not belong to this latent; use --native")
    filt = rec.filter if rec.filter in ("bilinear", "bicubic") else "bilinear"
    out = make(hp, wp) if whole else make(*rec.orig_size)
    if (tiles or TileOptions()).active(hp * wp):
        sink = out
        if not whole:
            if tuple(rec.scaled_size) != tuple(rec.orig_size):
                sink = Resize(sink, rec.scaled_size, rec.orig_size, filt)
            sink = Crop(sink, top, left, *rec.scaled_size)
        vae.decode(z, tiler=(tiles or TileOptions()).runner(f, sink))
        return out
    y = vae.decode(z)
    if not whole:
        y = resize(y[..., top:hp - bottom, left:wp - right], tuple(rec.orig_size), filt).clamp(0, 1)
    out.write(0, y)
    return out


def decode_record(vae: VAE, rec: L.LatentRecord, native: bool = False, tiles: TileOptions | None = None,
                  force: bool = False, path: str | None = None) -> torch.Tensor:
    """Decode a LatentRecord to (3, H, W) in [0, 1], at the original image size unless ``native``."""
    return _decode(vae, rec, native, tiles, force, path, lambda h, w: Canvas(1, 3, h, w)).tensor[0]


def decode_image(vae: VAE, rec: L.LatentRecord, native: bool = False, tiles: TileOptions | None = None,
                 force: bool = False, path: str | None = None):
    """``decode_record`` as an 8-bit image (vaepack.io.StripImage, the pixels ``save_image`` would
    write), filled strip by strip: a tiled decode never holds the float image."""
    from vaepack.io import StripImage

    return _decode(vae, rec, native, tiles, force, path, lambda h, w: StripImage(w, h))


def roundtrip_tensor(enc: VAE, dec: VAE, x: torch.Tensor, scale: float = 1.0, filter: str = "bilinear",
                     tiles: TileOptions | None = None) -> tuple[torch.Tensor, L.LatentRecord]:
    rec = encode_tensor(enc, x, scale, filter, tiles)
    return decode_record(dec, rec, tiles=tiles), rec
