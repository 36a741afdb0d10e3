"""Encode / decode / round trip with resolution remapping, padding and tiling.

Resolution remapping (Chu et al. 2026, "Distilling Latent Manifolds", Sec. IV and Table III): a
distilled student reconstructs far better when the image is *upsampled* before encoding ("pre"
interpolation) and the reconstruction is downsampled back. ``encode_tensor`` records everything
needed to undo it (scale, filter, original size, padding) and ``decode_record`` undoes it.

Sizes that are not a multiple of the model's factor are reflect-padded on the right/bottom, and
the padding is recorded and cropped after decoding. Inputs above a pixel budget run tiled with
overlapping tiles blended by linear ramps, so the seams vanish (tested against untiled runs).
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
from vaepack.vae import VAE

FILTERS = ("bilinear", "bicubic", "nearest", "area")
DEFAULT_TILE_BUDGET = 1536 * 1536  # pixels per forward pass before tiling kicks in


def tile_budget_default() -> int:
    env = os.environ.get("VAEPACK_TILE_BUDGET")
    return int(env) if env else DEFAULT_TILE_BUDGET


def resize(x: torch.Tensor, size: tuple[int, int], filter: str = "bilinear") -> torch.Tensor:
    """Resize NCHW; antialiased when shrinking (bilinear/bicubic), so downsampling back is clean."""
    if filter not in FILTERS:
        raise UsageError(f"unknown filter '{filter}' (choose {', '.join(FILTERS)})")
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if filter in ("nearest", "area"):
        return F.interpolate(x, size=size, mode=filter)
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode=filter, align_corners=False, antialias=shrink)


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, round(h * scale)), max(1, round(w * scale))


def pad_to_multiple(x: torch.Tensor, factor: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % factor, (-w) % factor
    if not (ph or pw):
        return x, (0, 0, 0, 0)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (0, pw, 0, ph)


# --------------------------------------------------------------------------- tiling
def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    step = tile - overlap
    s = list(range(0, n - tile, step)) + [n - tile]
    return sorted(set(s))


def _ramp(n: int, lo: bool, hi: bool, overlap: int, device) -> torch.Tensor:
    w = torch.ones(n, device=device)
    if overlap > 0:
        r = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
        if lo:
            w[:overlap] = torch.minimum(w[:overlap], r)
        if hi:
            w[-overlap:] = torch.minimum(w[-overlap:], r.flip(0))
    return w


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
              unit_in: int, unit_out: int) -> torch.Tensor:
    """Apply ``fn`` (in-size * unit_out / unit_in = out-size) on overlapping tiles and blend.

    ``tile``/``overlap`` are in grid units (unit_in input pixels = unit_out output pixels), so
    tile borders always fall on latent-pixel boundaries.
    """
    n, _, h, w = x.shape
    gh, gw = h // unit_in, w // unit_in
    tile = max(1, tile)
    overlap = min(overlap, tile // 2)
    out = wsum = None
    ys, xs = _starts(gh, tile, overlap), _starts(gw, tile, overlap)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            th, tw = min(tile, gh), min(tile, gw)
            t = x[..., y0 * unit_in:(y0 + th) * unit_in, x0 * unit_in:(x0 + tw) * unit_in]
            if hasattr(fn, "noise_origin"):
                # Diffusion decoders draw noise as a function of the absolute pixel position, so
                # overlapping tiles see the same noise where they overlap (vaepack/models/eps_unet.py).
                fn.noise_origin = (y0 * unit_out, x0 * unit_out)
            y = fn(t)
            if out is None:
                out = torch.zeros(n, y.shape[1], gh * unit_out, gw * unit_out, device=y.device)
                wsum = torch.zeros(1, 1, gh * unit_out, gw * unit_out, device=y.device)
            ov = overlap * unit_out
            wy = _ramp(th * unit_out, i > 0, i < len(ys) - 1, ov, y.device)
            wx = _ramp(tw * unit_out, j > 0, j < len(xs) - 1, ov, y.device)
            m = (wy[:, None] * wx[None, :])[None, None]
            sl = (..., slice(y0 * unit_out, (y0 + th) * unit_out), slice(x0 * unit_out, (x0 + tw) * unit_out))
            out[sl] += y * m
            wsum[sl] += m
    if hasattr(fn, "noise_origin"):
        fn.noise_origin = (0, 0)
    return out / wsum


@dataclass
class TileOptions:
    budget: int | None = None  # pixels; None = default; 0 = never tile
    tile: int = 512  # tile edge in image pixels (rounded to the model factor)
    overlap: int = 64  # overlap in image pixels

    def active(self, pixels: int) -> bool:
        b = tile_budget_default() if self.budget is None else self.budget
        return b > 0 and pixels > b


def _encode(vae: VAE, x: torch.Tensor, tiles: TileOptions) -> tuple[torch.Tensor, str]:
    """(latent, precision that ran): tiled runs use the torch module (VAE.encode), so they run at
    the VAE's dtype even where a runner (e.g. int8) is loaded; latent files record it."""
    f = vae.factor
    if tiles.active(x.shape[-2] * x.shape[-1]):
        t, o = max(1, tiles.tile // f), max(0, tiles.overlap // f)
        return vae.encode(x, tiler=lambda fn, a: run_tiled(fn, a, t, o, f, 1)), vae.dtype
    return vae.encode(x), vae.precision("encoder")


def _decode(vae: VAE, z: torch.Tensor, tiles: TileOptions) -> torch.Tensor:
    f = vae.factor
    if tiles.active(z.shape[-2] * z.shape[-1] * f * f):
        t, o = max(1, tiles.tile // f), max(0, tiles.overlap // f)
        return vae.decode(z, tiler=lambda fn, a: run_tiled(fn, a, t, o, 1, f))
    return vae.decode(z)


# --------------------------------------------------------------------------- public API
def prepare(x: torch.Tensor, factor: int, scale: float, filter: str, source: str = "",
            multiple: int | None = None):
    """Remap + pad one image (3, H, W) -> (1, 3, H', W'), recording what was done.

    The padding reaches a multiple of ``multiple`` (default ``factor``; e.g. 2 * factor where the
    latent must have an even size, as FLUX.2's packed form)."""
    if not (math.isfinite(scale) and scale > 0):
        raise UsageError(f"--scale must be a positive number, got {scale}")
    h, w = x.shape[-2:]
    sh, sw = scaled_size(h, w, scale)
    if sh < factor or sw < factor:
        raise ImageError(f"image is {w}x{h}, smaller than one latent pixel ({factor}x{factor}) at scale {scale:g}",
                         path=source or None, hint=f"use a larger image or --scale >= {factor / min(h, w):.2f}")
    xs = resize(x[None], (sh, sw), filter)
    xp, pad = pad_to_multiple(xs, multiple or factor)
    return xp, (h, w), (sh, sw), pad


def encode_tensor(vae: VAE, x: torch.Tensor, scale: float = 1.0, filter: str = "bilinear",
                  tiles: TileOptions | None = None, source: str = "", model_id: str | None = None,
                  pad_multiple: int | None = None) -> L.LatentRecord:
    """Encode one image (3, H, W) in [0, 1] into a LatentRecord."""
    xp, orig, ssize, pad = prepare(x, vae.factor, scale, filter, source, pad_multiple)
    z, ran = _encode(vae, xp, tiles or TileOptions())
    return L.LatentRecord(latent=z.cpu(), model=model_id or vae.entry.id, space=vae.space.name,
                          weights_sha256=vae.parts["encoder"].sha256, scale=scale, filter=filter,
                          orig_size=orig, scaled_size=ssize, padding=pad, convention=L.convention(vae.space),
                          dtype=ran, source=source)


def encode_batch(vae: VAE, xs: list[torch.Tensor], scale: float = 1.0, filter: str = "bilinear",
                 tiles: TileOptions | None = None, sources: list[str] | None = None,
                 model_id: str | None = None, pad_multiple: int | None = None) -> list[L.LatentRecord]:
    """Encode images of equal size in one forward pass (falls back to one-by-one otherwise)."""
    sources = sources or [""] * len(xs)
    if len(xs) == 1 or len({tuple(x.shape) for x in xs}) != 1:
        return [encode_tensor(vae, x, scale, filter, tiles, s, model_id, pad_multiple) for x, s in zip(xs, sources)]
    prepared = [prepare(x, vae.factor, scale, filter, s, pad_multiple) for x, s in zip(xs, sources)]
    z, ran = _encode(vae, torch.cat([p[0] for p in prepared]), tiles or TileOptions())
    return [L.LatentRecord(latent=z[i:i + 1].cpu(), model=model_id or vae.entry.id, space=vae.space.name,
                           weights_sha256=vae.parts["encoder"].sha256, scale=scale, filter=filter,
                           orig_size=p[1], scaled_size=p[2], padding=p[3], convention=L.convention(vae.space),
                           dtype=ran, source=s) for i, (p, s) in enumerate(zip(prepared, sources))]


def check_compatible(rec: L.LatentRecord, vae: VAE, force: bool = False, path: str | None = None) -> None:
    """Refuse to decode a latent from another latent space (unless forced).

    Latents of one space are interchangeable by design (e.g. vaepack's default encoder and TAEF2 both
    write FLUX.2-space latents), so the check is on the space and its recorded convention, and on
    the channel count, which no force can fix.
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
    want = L.convention(vae.space)
    if rec.convention and rec.convention != want:
        diff = sorted(k for k in set(want) | set(rec.convention) if want.get(k) != rec.convention.get(k))
        raise LatentFileError(f"latent convention differs from '{vae.entry.id}' in {', '.join(diff)}", path=path,
                              hint="it was written with other scale/shift/normalization; use --force-space to decode anyway")


def decode_record(vae: VAE, rec: L.LatentRecord, native: bool = False, tiles: TileOptions | None = None,
                  force: bool = False, path: str | None = None) -> torch.Tensor:
    """Decode a LatentRecord to (3, H, W) in [0, 1], at the original image size unless ``native``."""
    check_compatible(rec, vae, force, path)
    z = L.flux2_unpack(rec.latent) if rec.packed else rec.latent
    y = _decode(vae, z, tiles or TileOptions())
    if native or rec.orig_size == (0, 0):
        return y[0]
    left, right, top, bottom = rec.padding
    h, w = y.shape[-2:]
    y = y[..., top:h - bottom, left:w - right]
    if tuple(y.shape[-2:]) != tuple(rec.scaled_size):
        raise LatentFileError(f"latent is {z.shape[-1]}x{z.shape[-2]} but its metadata says the padded image was "
                              f"{rec.scaled_size[1] + left + right}x{rec.scaled_size[0] + top + bottom}",
                              path=path, hint="the metadata does not belong to this latent; use --native")
    y = resize(y, tuple(rec.orig_size), rec.filter if rec.filter in ("bilinear", "bicubic") else "bilinear")
    return y[0].clamp(0, 1)


def roundtrip_tensor(enc: VAE, dec: VAE, x: torch.Tensor, scale: float = 1.0, filter: str = "bilinear",
                     tiles: TileOptions | None = None) -> tuple[torch.Tensor, L.LatentRecord]:
    rec = encode_tensor(enc, x, scale, filter, tiles)
    return decode_record(dec, rec, tiles=tiles), rec
