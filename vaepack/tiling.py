"""Tiled encode/decode whose memory follows the tile, not the image.

A tiled run never holds the image as float: the encoder reads each tile from a lazy ``Remap`` of the
uint8 input (convert, resize with the exact separable weights of ``F.interpolate``, reflect-pad, all
per tile), the decoder hands finished rows to a sink (crop, resize back, quantize) as soon as no later
tile touches them. What scales with the image is the uint8 input, the latent and one feature map at
latent resolution (the part of the network that runs whole, see below).

Tiling rules (``VAE.encode``/``VAE.decode`` pass ``Part.split``): the encoder tiles its head and the
decoder its tail, on overlapping tiles blended by linear ramps (tile borders on latent-pixel
boundaries). The other half - everything that needs whole-image GroupNorm statistics (TAEF2's
"midblock GN") - runs at latent resolution in row strips with exact halos: each GroupNorm first
gathers its statistics over all strips, then normalizes every strip with them, so the result is the
whole-tensor result (up to float summation order), not a per-tile approximation.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.errors import UsageError
from vaepack.io import image_float
from vaepack.models import tae

FILTERS = ("bilinear", "bicubic", "nearest", "area")
Convert = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- resizing
def interpolate(x: torch.Tensor, size: tuple[int, int], filter: str, antialias: bool) -> torch.Tensor:
    if filter not in FILTERS:
        raise UsageError(f"unknown filter '{filter}' (choose {', '.join(FILTERS)})")
    if filter in ("nearest", "area"):
        return F.interpolate(x, size=size, mode=filter)
    return F.interpolate(x, size=size, mode=filter, align_corners=False, antialias=antialias)


def shrinks(src: tuple[int, int], dst: tuple[int, int]) -> bool:
    """``resize`` antialiases (bilinear/bicubic) when either side shrinks, so downsampling back is clean."""
    return dst[0] < src[0] or dst[1] < src[1]


def resize(x: torch.Tensor, size: tuple[int, int], filter: str = "bilinear") -> torch.Tensor:
    """Resize NCHW; antialiased when shrinking (bilinear/bicubic), so downsampling back is clean."""
    if filter not in FILTERS:
        raise UsageError(f"unknown filter '{filter}' (choose {', '.join(FILTERS)})")
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return interpolate(x, tuple(size), filter, shrinks(tuple(x.shape[-2:]), tuple(size)))


def axis_weights(n_in: int, n_out: int, lo: int, hi: int, filter: str, antialias: bool) -> tuple[int, torch.Tensor]:
    """Rows ``lo:hi`` of the (n_out, n_in) matrix that ``interpolate`` applies along one axis:
    (first input index, weights (hi - lo, k)). Every filter here is separable, and the weights are
    torch's own (interpolating one-hot columns), so a per-tile resize matches the whole-image one."""
    ratio = n_in / n_out
    reach = 2 * max(1.0, ratio) + 3  # bicubic's 4 taps, widened by the antialias support when shrinking
    a, b = max(0, math.floor(lo * ratio - reach)), min(n_in, math.ceil(hi * ratio + reach))
    # One-hot rows along the width: torch 2.13's antialiased kernel gives wrong weights for (n, 1)
    # inputs resized along the height, and both axes take the same weights for the same sizes.
    onehot = torch.zeros(1, b - a, 1, n_in)
    onehot[0, torch.arange(b - a), 0, torch.arange(a, b)] = 1
    w = interpolate(onehot, (1, n_out), filter, antialias)[0, :, 0, lo:hi].t().contiguous()
    if (w.sum(1) - 1).abs().max() > 1e-4:  # a tap outside [a, b): the reach above is wrong
        raise RuntimeError(f"resize weights {n_in}->{n_out} rows {lo}:{hi} reach past inputs {a}:{b}")
    return a, w


def row_blocks(n_in: int, n_out: int, lo: int, hi: int, filter: str, antialias: bool,
               block: int = 32) -> list[tuple[int, torch.Tensor]]:
    """``axis_weights`` for output rows ``lo:hi`` cut into blocks of ``block`` rows, each with only
    the input span it touches: [(first input index, weights (rows, k))]. A resize is then a few
    small matmuls whose cost is k (about block * n_in / n_out + the filter's taps) per output pixel."""
    a, w = axis_weights(n_in, n_out, lo, hi, filter, antialias)
    out = []
    for r in range(0, hi - lo, block):
        wb = w[r:r + block]
        cols = (wb != 0).any(0).nonzero().flatten()
        c0, c1 = int(cols.min()), int(cols.max()) + 1
        out.append((a + c0, wb[:, c0:c1].contiguous()))
    return out


def apply_rows(x: torch.Tensor, blocks: list[tuple[int, torch.Tensor]], first: int = 0) -> torch.Tensor:
    """Resize along the height: ``x`` holds input rows from ``first`` on."""
    out = x.new_empty(*x.shape[:-2], sum(w.shape[0] for _, w in blocks), x.shape[-1])
    r = 0
    for a, w in blocks:
        torch.matmul(w.to(x.device), x[..., a - first:a - first + w.shape[1], :], out=out[..., r:r + w.shape[0], :])
        r += w.shape[0]
    return out


def _float32(device: torch.device):
    """Resizing is pixel arithmetic, not the network: the tiler calls it inside the VAE's autocast,
    which would run these matmuls in bf16."""
    return torch.autocast(device.type, enabled=False)


def _pad_index(idx: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Source index of padded positions (F.pad on the right/bottom: reflect excludes the edge)."""
    return torch.where(idx < n, idx, (2 * (n - 1) - idx) if mode == "reflect" else torch.full_like(idx, n - 1))


class Remap:
    """The remapped, padded image (n, 3, H', W') that ``pipeline.prepare`` would make, read region by
    region from the (uint8 or float) source: nothing image-sized is allocated. Tiles come row by row,
    so the rows of a tile row are remapped once at full width (a band): along the height with
    ``row_blocks``, along the width with ``interpolate`` itself (which leaves an unchanged height
    exactly as it is), then each tile is cut from the band."""

    def __init__(self, src: torch.Tensor, size: tuple[int, int], filter: str, pad: tuple[int, int, int, int]):
        self.src, self.size, self.filter = src if src.dim() == 4 else src[None], tuple(size), filter
        h, w = self.src.shape[-2:]
        self.antialias = shrinks((h, w), self.size)
        _, pw, _, ph = pad
        self.mode = "reflect" if ph < self.size[0] and pw < self.size[1] else "replicate"
        self.shape = (*self.src.shape[:2], self.size[0] + ph, self.size[1] + pw)
        self._band: tuple[tuple[int, int], torch.Tensor] | None = None  # (remapped rows a:b, band)

    def _rows(self, a: int, b: int) -> torch.Tensor:
        """Remapped rows a:b (before padding) at the full remapped width."""
        if self._band is not None and self._band[0] == (a, b):
            return self._band[1]
        self._band = None  # free the previous band first
        h, w = self.src.shape[-2:]
        if h == self.size[0]:
            t = image_float(self.src[..., a:b, :])
        else:
            blocks = row_blocks(h, self.size[0], a, b, self.filter, self.antialias)
            first, last = blocks[0][0], max(c + wb.shape[1] for c, wb in blocks)
            t = image_float(self.src[..., first:last, :])
            with _float32(t.device):
                t = apply_rows(t, blocks, first)
        if w != self.size[1]:
            with _float32(t.device):
                t = interpolate(t, (b - a, self.size[1]), self.filter, self.antialias)
        self._band = ((a, b), t)
        return t

    def region(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        iy = _pad_index(torch.arange(y0, y1), self.size[0], self.mode)
        ix = _pad_index(torch.arange(x0, x1), self.size[1], self.mode)
        a, b = int(iy.min()), int(iy.max()) + 1
        if tuple(self.src.shape[-2:]) == self.size:  # no remap: convert just the tile
            c, d = int(ix.min()), int(ix.max()) + 1
            t = image_float(self.src[..., a:b, c:d])
            t = t.index_select(-2, iy - a) if y1 > self.size[0] else t
            return t.index_select(-1, ix - c) if x1 > self.size[1] else t
        t = self._rows(a, b)
        t = t.index_select(-2, iy - a) if y1 > self.size[0] else t  # reflected/replicated padding rows
        return t.index_select(-1, ix) if x1 > self.size[1] else t[..., x0:x1]


class Tensor4:
    """A whole tensor (n, C, H, W) seen as a region source."""

    def __init__(self, x: torch.Tensor):
        self.x, self.shape = x, tuple(x.shape)

    def region(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        return self.x[..., y0:y1, x0:x1]


# --------------------------------------------------------------------------- row sinks
class RowSink(Protocol):
    def write(self, top: int, rows: torch.Tensor) -> None: ...  # rows (n, C, r, W), top to bottom


class Canvas:
    """Collects rows into one float tensor (n, C, H, W), on the device the rows come from."""

    def __init__(self, n: int, c: int, h: int, w: int):
        self.shape, self.tensor = (n, c, h, w), None

    def write(self, top: int, rows: torch.Tensor) -> None:
        if self.tensor is None:
            self.tensor = torch.empty(self.shape, dtype=rows.dtype, device=rows.device)
        self.tensor[..., top:top + rows.shape[-2], :] = rows


class Crop:
    """Keeps rows/columns [top, top + h) x [left, left + w) of the incoming rows."""

    def __init__(self, sink: RowSink, top: int, left: int, h: int, w: int):
        self.sink, self.top, self.left, self.h, self.w = sink, top, left, h, w

    def write(self, top: int, rows: torch.Tensor) -> None:
        a, b = max(top, self.top), min(top + rows.shape[-2], self.top + self.h)
        if a < b:
            self.sink.write(a - self.top, rows[..., a - top:b - top, self.left:self.left + self.w])


class Resize:
    """``resize(image, size, filter).clamp(0, 1)`` over rows that arrive top to bottom: each strip is
    resized along the width at once (``interpolate``, which leaves the strip's height exactly as it
    is), and output rows leave in chunks as soon as their taps along the height have arrived."""

    def __init__(self, sink: RowSink, src: tuple[int, int], dst: tuple[int, int], filter: str, chunk: int = 64):
        self.sink, self.src, self.dst, self.filter, self.chunk = sink, tuple(src), tuple(dst), filter, chunk
        self.aa = shrinks(self.src, self.dst)
        self.buf, self.buf_top, self.next = None, 0, 0  # buffered rows start at buf_top; next output row
        self._b: tuple | None = None  # (output row, its chunk's row blocks)

    def _need(self, o: int) -> tuple[int, int, list | None]:
        """The input rows [lo, hi) output rows o.. need, and their blocks (None: same height)."""
        if self.src[0] == self.dst[0]:
            return o, min(self.dst[0], o + self.chunk), None
        if self._b is None or self._b[0] != o:
            self._b = (o, row_blocks(self.src[0], self.dst[0], o, min(self.dst[0], o + self.chunk), self.filter,
                                     self.aa))
        blocks = self._b[1]
        return blocks[0][0], max(a + w.shape[1] for a, w in blocks), blocks

    def write(self, top: int, rows: torch.Tensor) -> None:
        with _float32(rows.device):
            self._write(rows.float())

    def _write(self, rows: torch.Tensor) -> None:
        if self.src[1] != self.dst[1]:
            rows = interpolate(rows, (rows.shape[-2], self.dst[1]), self.filter, self.aa)
        self.buf = rows if self.buf is None else torch.cat([self.buf, rows], dim=-2)
        have = self.buf_top + self.buf.shape[-2]
        while self.next < self.dst[0]:
            lo, hi, blocks = self._need(self.next)
            if hi > have and have < self.src[0]:
                break  # its taps have not all arrived
            out = apply_rows(self.buf, blocks, self.buf_top) if blocks else self.buf[..., lo - self.buf_top:hi - self.buf_top, :]
            self.sink.write(self.next, out.clamp(0, 1))
            self.next += out.shape[-2]
            if self.next < self.dst[0]:  # drop the rows no later output needs (the next cat compacts)
                keep = self._need(self.next)[0] - self.buf_top
                self.buf, self.buf_top = self.buf[..., keep:, :], self.buf_top + keep


# --------------------------------------------------------------------------- strips at latent resolution
_LOCAL = (nn.Sequential, nn.Conv2d, nn.ReLU, nn.SiLU, nn.GELU, nn.Identity, nn.GroupNorm, tae.Block, tae.Clamp)


def _radius(m: nn.Module) -> int | None:
    """Rows of context one output row needs (the sum over its same-size convs, an upper bound for
    residual branches), or None where ``m`` resamples or is not known to be local."""
    r = 0
    for sub in m.modules():
        if not isinstance(sub, _LOCAL):
            return None
        if isinstance(sub, nn.Conv2d):
            (kh, kw), (dh, dw) = sub.kernel_size, sub.dilation
            if sub.stride != (1, 1) or sub.padding != ((kh - 1) // 2 * dh, (kw - 1) // 2 * dw):
                return None
            r += (kh - 1) // 2 * dh
    return r


class _Stop(Exception):
    pass


class _GlobalNorm:
    """Stands in for a GroupNorm's forward: while ``collecting`` it sums its input and squares over
    the kept rows of each strip (float32 per strip, float64 across strips) and stops the strip;
    afterwards it normalizes every strip with those whole-tensor statistics, as an inference-mode
    batch norm with the group statistics per channel (one fused kernel, float math like GroupNorm)."""

    def __init__(self, gn: nn.GroupNorm):
        self.gn, self.keep, self.collecting = gn, slice(None), True
        self.count, self.s1, self.s2 = 0, 0.0, 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, g = x.shape[0], self.gn.num_groups
        if self.collecting:
            v = x[:, :, self.keep].float()
            self.s1 = self.s1 + v.sum((2, 3)).double().reshape(n, g, -1).sum(-1)
            self.s2 = self.s2 + v.square_().sum((2, 3)).double().reshape(n, g, -1).sum(-1)
            self.count += v[0].numel() // g
            raise _Stop
        if n != 1:  # batch norm takes one set of statistics: per sample
            return torch.cat([self._apply(x[i:i + 1], i) for i in range(n)])
        return self._apply(x, 0)

    def _apply(self, x: torch.Tensor, i: int) -> torch.Tensor:
        per = x.shape[1] // self.gn.num_groups
        mean = self.s1[i] / self.count
        var = (self.s2[i] / self.count - mean.square()).clamp_min(0)
        return F.batch_norm(x, mean.repeat_interleave(per).float(), var.repeat_interleave(per).float(),
                            self.gn.weight, self.gn.bias, False, 0.0, self.gn.eps)


def _stages(part: nn.Module) -> list[tuple[nn.Module, int | None, list[nn.GroupNorm]]]:
    """(module, radius or None = run whole, its GroupNorms): consecutive local children without a
    GroupNorm run as one stage; a child with one GroupNorm is a stage of its own."""
    children = list(part) if isinstance(part, nn.Sequential) else [part]
    out: list = []
    run: list[nn.Module] = []
    for c in children:
        r = _radius(c)
        gns = [m for m in c.modules() if isinstance(m, nn.GroupNorm)]
        if r is not None and not gns:
            run.append(c)
            continue
        if run:
            out.append((nn.Sequential(*run), sum(_radius(m) for m in run), []))
            run = []
        out.append((c, r if len(gns) <= 1 else None, gns))
    if run:
        out.append((nn.Sequential(*run), sum(_radius(m) for m in run), []))
    return out


def run_strips(part: nn.Module, x: torch.Tensor, rows: int, pre: Convert | None = None,
               post: Convert | None = None, owned: bool = False) -> torch.Tensor:
    """``post(part(pre(x)))`` for a size-keeping ``part`` at latent resolution, in row strips.

    Each stage reads its strips with a halo of its radius and writes into one buffer (in place when
    the channels and dtype stay, which ``owned`` allows for ``x``); a GroupNorm stage first gathers
    its statistics over every strip. ``pre``/``post`` see even-aligned strips (FLUX.2's 2x2 packing)."""
    h = x.shape[-2]
    rows = max(2, rows + rows % 2)
    stages = [s for s in _stages(part) if not isinstance(s[0], nn.Identity)] if not isinstance(part, nn.Identity) else []
    buf, first = x, True
    for i, (mod, r, gns) in enumerate(stages):
        conv = pre if first else None
        last = post if i == len(stages) - 1 else None
        if r is None:  # not known to be local: whole, as an untiled run
            y = mod(_convert(buf, 0, h, conv))
            buf, first = (last(y) if last else y), False
            continue
        buf = _run_stage(mod, r, gns, buf, rows, conv, last, in_place=owned or not first)
        first = False
    if first:  # nothing to run (an Identity half): only the conversions, on the whole tensor
        y = _convert(x, 0, h, pre)
        return post(y) if post is not None else y
    return buf


def _convert(x: torch.Tensor, a: int, b: int, fn: Convert | None) -> torch.Tensor:
    """fn(x[..., a:b, :]) computed on even-aligned rows (then cut back to a:b)."""
    if fn is None:
        return x[..., a:b, :]
    a2, b2 = a - a % 2, min(x.shape[-2], b + b % 2)
    return fn(x[..., a2:b2, :])[..., a - a2:a - a2 + (b - a), :]


def _run_stage(mod: nn.Module, r: int, gns: list[nn.GroupNorm], src: torch.Tensor, rows: int,
               pre: Convert | None, post: Convert | None, in_place: bool) -> torch.Tensor:
    h = src.shape[-2]
    hooks = [_GlobalNorm(g) for g in gns]
    for g, k in zip(gns, hooks):
        g.forward = k  # an instance attribute: nn.Module.__call__ runs it instead of GroupNorm.forward
    try:
        for k in hooks:  # pass 1: whole-tensor statistics (one GroupNorm per stage, see _stages)
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                a, b = max(0, r0 - r), min(h, r1 + r)
                k.keep = slice(r0 - a, r1 - a)
                try:
                    mod(_convert(src, a, b, pre))
                except _Stop:
                    pass
            k.collecting = False
        dst, saved = None, None
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            a, b = max(0, r0 - r), min(h, r1 + r)
            if dst is src and a < r0:  # rows above r0 were overwritten: their originals were saved
                t = torch.cat([saved[..., saved.shape[-2] - (r0 - a):, :], src[..., r0:b, :]], dim=-2)
            else:
                t = _convert(src, a, b, pre)
            y = mod(t)[..., r0 - a:r1 - a, :]
            if post is not None:
                y = post(y)
            if dst is None:
                same = in_place and pre is None and y.shape[1] == src.shape[1] and y.dtype == src.dtype
                # the layout of the strips (channels_last under bf16 on CPU: the convs' fast path)
                fmt = torch.channels_last if not y.is_contiguous() and y.is_contiguous(
                    memory_format=torch.channels_last) else torch.contiguous_format
                dst = src if same else torch.empty(*y.shape[:2], h, y.shape[-1], dtype=y.dtype, device=y.device,
                                                   memory_format=fmt)
            if dst is src:
                saved = src[..., max(0, r1 - r):r1, :].clone()
            dst[..., r0:r1, :] = y
        return dst
    finally:
        for g in gns:
            del g.forward


# --------------------------------------------------------------------------- tiles
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


class TileRunner:
    """The tiler ``VAE.encode``/``VAE.decode`` take: ``tile``/``overlap`` in latent pixels, ``factor``
    the model's. ``sink``: where decoded rows go (a full tensor is returned when None)."""

    def __init__(self, tile: int, overlap: int, factor: int, sink: RowSink | None = None):
        self.tile, self.factor, self.sink = max(1, tile), factor, sink
        self.overlap = min(max(0, overlap), self.tile // 2)
        self.rows = max(2, 8 * self.tile * self.tile)  # latent pixels per strip (rows = this / width)

    def _grid(self, gh: int, gw: int):
        ys, xs = _starts(gh, self.tile, self.overlap), _starts(gw, self.tile, self.overlap)
        return ys, xs, min(self.tile, gh), min(self.tile, gw)

    def _ramps(self, starts: list[int], size: int, n: int, unit: int, device) -> tuple[list, torch.Tensor]:
        """Per-tile ramps along one axis (output units) and their sum (the separable blend weights)."""
        ov = self.overlap * unit
        ramps = [_ramp(size * unit, i > 0, i < len(starts) - 1, ov, device) for i in range(len(starts))]
        total = torch.zeros(n * unit, device=device)
        for s, w in zip(starts, ramps):
            total[s * unit:(s + size) * unit] += w
        return ramps, total

    def encode(self, split: tuple[nn.Module, nn.Module], src, pre: Convert, post: Convert) -> torch.Tensor:
        """Head on blended tiles of ``src`` (a tensor or a ``Remap``), then the tail in strips."""
        head, tail = split
        src = Tensor4(src) if isinstance(src, torch.Tensor) else src
        f = self.factor
        gh, gw = src.shape[-2] // f, src.shape[-1] // f
        ys, xs, th, tw = self._grid(gh, gw)
        out = None
        for i, y0 in enumerate(ys):
            for j, x0 in enumerate(xs):
                y = head(pre(src.region(y0 * f, (y0 + th) * f, x0 * f, (x0 + tw) * f)))
                if out is None:
                    u = y.shape[-1] // tw
                    (ry, sy), (rx, sx) = self._ramps(ys, th, gh, u, y.device), self._ramps(xs, tw, gw, u, y.device)
                    out = torch.zeros(y.shape[0], y.shape[1], gh * u, gw * u, device=y.device)
                out[..., y0 * u:(y0 + th) * u, x0 * u:(x0 + tw) * u] += y * (ry[i][:, None] * rx[j][None, :])
        out /= sy[:, None] * sx[None, :]
        return run_strips(tail, out, max(2, self.rows // out.shape[-1]), post=post, owned=True)

    def decode(self, split: tuple[nn.Module, nn.Module], z: torch.Tensor, pre: Convert, post: Convert):
        """The head in strips, then the tail on blended tiles; rows go to ``sink`` as they finish."""
        head, tail = split
        feat = run_strips(head, z, max(2, self.rows // z.shape[-1]), pre=pre)
        n, gh, gw, f = feat.shape[0], feat.shape[-2], feat.shape[-1], self.factor
        canvas = Canvas(n, 3, gh * f, gw * f) if self.sink is None else None
        sink = self.sink or canvas
        ys, xs, th, tw = self._grid(gh, gw)
        (ry, sy), (rx, sx) = self._ramps(ys, th, gh, f, feat.device), self._ramps(xs, tw, gw, f, feat.device)
        band, top = None, 0  # blended rows [top, top + band height) not yet final
        noisy = hasattr(tail, "noise_origin")
        for i, y0 in enumerate(ys):
            end = (y0 + th) * f
            for j, x0 in enumerate(xs):
                if noisy:
                    # Diffusion decoders draw noise as a function of the absolute pixel position, so
                    # overlapping tiles see the same noise where they overlap (vaepack/models/eps_unet.py).
                    tail.noise_origin = (y0 * f, x0 * f)
                y = tail(feat[..., y0:y0 + th, x0:x0 + tw])
                if band is None or top + band.shape[-2] < end:
                    grow = end - top - (0 if band is None else band.shape[-2])
                    more = torch.zeros(*y.shape[:2], grow, gw * f, device=y.device)
                    band = more if band is None else torch.cat([band, more], dim=-2)
                band[..., y0 * f - top:end - top, x0 * f:(x0 + tw) * f] += y * (ry[i][:, None] * rx[j][None, :])
            done = ys[i + 1] * f if i + 1 < len(ys) else gh * f
            rows = band[..., :done - top, :] / (sy[top:done, None] * sx[None, :])
            sink.write(top, post(rows))
            band, top = band[..., done - top:, :].clone(), done
        if noisy:
            tail.noise_origin = (0, 0)
        return canvas.tensor if canvas is not None else None
