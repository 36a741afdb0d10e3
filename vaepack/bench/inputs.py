"""What ``run_bench`` and ``run_rd`` share before they measure: option lists, the model cache,
the ``--data`` images and the per-image mean metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from vaepack import metrics as M
from vaepack.errors import UsageError, VaepackError

Progress = Callable[[int, int, dict], None]  # (rows done, rows planned, the row just finished)


def as_list(v) -> list:
    """An option value as a list: None -> [], a list/tuple as is, anything else (an id, a number,
    a ``VAE`` object) as a one-item list."""
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]


def load_images(data_dir, max_images: int | None, crop: int | None = None,
                multiple: int = 8) -> list[tuple[str, torch.Tensor]]:
    """Images of ``data_dir`` (sorted), each cropped to a multiple of 8: top-left normally, or a
    centered crop of at most ``crop`` x ``crop`` (quick runs; the networks cost O(pixels))."""
    from vaepack.io import center_crop, list_images, load_image

    d = Path(data_dir)
    if not d.is_dir():
        raise UsageError(f"--data must be a folder of images, got {d}")
    paths = list_images(d)
    if max_images:
        paths = paths[:max_images]
    out = []
    for p in paths:
        x = center_crop(load_image(p), crop)
        h, w = x.shape[-2:]
        h, w = h - h % multiple, w - w % multiple
        if h < 16 or w < 16:
            continue  # too small for SSIM's window after the crop
        out.append((p.name, x[:, :h, :w].contiguous()))
    if not out:
        raise UsageError(f"no usable images (at least 16x16) in {d}")
    return out


def mean_metrics(pairs) -> dict:
    """Per-image PSNR/SSIM/MS-SSIM and the perceptual indices HaarPSI/GMSD (vaepack.perceptual)
    averaged over a list of (original, reconstruction); PSNR of identical images is stored as
    ``metrics.PSNR_CAP_DB`` so the JSON stays finite."""
    from vaepack import perceptual

    acc = {"psnr": [], "ssim": [], "ms_ssim": [], "haarpsi": [], "gmsd": []}
    for a, b in pairs:
        acc["psnr"].append(M.psnr(a, b))
        acc["ssim"].append(M.ssim(a, b))
        acc["ms_ssim"].append(M.ms_ssim(a, b))
        for k, v in perceptual.perceptual_metrics(a, b).items():
            acc[k].append(v)
    n = len(acc["psnr"])
    return {"psnr": M.json_psnr(sum(acc["psnr"]) / n), **{k: sum(v) / n for k, v in acc.items() if k != "psnr"},
            "images": n}


class ModelCache:
    """Loads each (model, part, precision) once. Models may be ids or prebuilt ``VAE`` objects."""

    def __init__(self, device: torch.device):
        self.device = device
        self.objs: dict[str, Any] = {}
        self.cache: dict[tuple, Any] = {}
        self.failed: dict[tuple, VaepackError] = {}  # so missing weights are looked for only once

    def name(self, m) -> str:
        if isinstance(m, str):
            from vaepack.manifest import get_model

            return get_model(m).id  # UnknownModelError for a typo, before any work starts
        self.objs[m.entry.id] = m
        return m.entry.id

    def has(self, mid: str, part: str) -> bool:
        if mid in self.objs:
            return self.objs[mid].has(part)
        from vaepack.manifest import get_model

        return part in get_model(mid).parts

    def get(self, mid: str, part: str, precision: str):
        key = (mid, part, precision)
        if key in self.failed:
            raise self.failed[key]
        if key not in self.cache:
            try:
                self.cache[key] = self._load(mid, part, precision)
            except VaepackError as e:
                self.failed[key] = e
                raise
        return self.cache[key]

    def _load(self, mid: str, part: str, precision: str):
        if not self.has(mid, part):
            raise UsageError(f"model '{mid}' has no {part}")
        if mid in self.objs:
            from vaepack.vae import check_dtype

            base = self.objs[mid]
            check_dtype(base.entry, precision)
            return dataclasses.replace(base, parts={part: base.parts[part]}, dtype=precision)
        from vaepack.runtime import load_vae

        return load_vae(mid, parts=(part,), device=str(self.device), dtype=precision)
