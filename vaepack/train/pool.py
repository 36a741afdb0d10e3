"""The view pool of a distillation run: teacher outputs computed once per image view and cached.

CPU budget tricks (they change what "a step" means versus paper 000):
- The teacher encoder costs more than a student forward+backward, so its outputs are computed once
  per image *view* and cached in the run folder (``teacher_cache.pt``). A view is the whole image at
  a scale (1x, and 1.5x bilinear like the paper-000 evaluation protocol, table III "Bilinear Pre")
  and optionally mirrored. Crops are taken on the 8 px latent grid, so a crop's target is the teacher
  latent computed with the full image as context; crop edges that are not image edges are masked out
  of the loss (``border`` latent pixels), since the student cannot see that context.
- Flips are applied to the whole image before the teacher runs (a conv net is not flip equivariant,
  so flipping a cached latent would give a wrong target).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.errors import VaepackError
from vaepack.train.common import atomic_torch_save, autocast, load_images, log, training_images


@dataclass
class View:
    image: torch.Tensor  # uint8 (3, H, W), H and W multiples of 8
    latent: torch.Tensor  # fp16 (C, H/8, W/8): teacher encoder output on the whole view
    decoded: torch.Tensor | None = None  # uint8 (3, H, W): teacher decoder output (decoder runs)


def pool_state(pool: list[View]) -> list[dict]:
    # Plain dicts of tensors, so the cache loads whatever module this code lives in.
    return [{"image": v.image, "latent": v.latent, "decoded": v.decoded} for v in pool]


def pool_from_state(items) -> list[View]:
    return [View(**d) if isinstance(d, dict) else View(d.image, d.latent, d.decoded) for d in items]


def resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Float (B,3,H,W) resize: bilinear with antialias (paper 000 table III: bilinear 'pre')."""
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def views_of(img: torch.Tensor, views: Sequence[tuple], factor: int, rng: random.Random,
             max_side: int | None) -> Iterator[torch.Tensor]:
    """Float (1,3,h,w) views of an image, sizes on the latent grid.

    A view is ``(scale, flip[, reup[, reup_prob]])``: resize by ``scale``; mirror if ``flip`` (True,
    False or "random"); with probability ``reup_prob`` downscale by ``reup`` and upscale back, so the
    view has the content of an image enlarged ``reup`` times (what the student sees in the paper-000
    1.5x protocol) at the teacher cost of a 1x view. ``max_side`` then keeps a random window.
    """
    x = img[None].float() / 255
    for view in views:
        scale, flip = float(view[0]), view[1]
        reup = float(view[2]) if len(view) > 2 else 1.0
        if len(view) > 3 and rng.random() >= float(view[3]):
            reup = 1.0
        h = max(factor, int(round(img.shape[1] * scale / factor)) * factor)
        w = max(factor, int(round(img.shape[2] * scale / factor)) * factor)
        if reup != 1.0:
            v = resize(resize(x, max(1, round(h / reup)), max(1, round(w / reup))), h, w)
        else:
            v = resize(x, h, w)
        if max_side:
            wh, ww = min(h, max_side // factor * factor), min(w, max_side // factor * factor)
            y0 = rng.randint(0, (h - wh) // factor) * factor
            x0 = rng.randint(0, (w - ww) // factor) * factor
            v = v[..., y0:y0 + wh, x0:x0 + ww]
        if flip == "random":
            flip = rng.random() < 0.5
        yield v.flip(-1) if flip else v


@torch.no_grad()
def build_pool(
    images: list[tuple[Path, torch.Tensor]],
    teacher: nn.Module,
    views: Sequence[tuple[float, bool | str]],
    device: torch.device,
    factor: int = 8,
    teacher_bf16: bool = False,
    teacher_decoder: nn.Module | None = None,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
    max_side: int | None = None,
) -> list[View]:
    """Run the teacher (and its decoder) once on every view of every image."""
    rng = random.Random(seed)
    pool: list[View] = []
    t0 = time.time()
    for i, (path, img) in enumerate(images):
        for v in views_of(img, views, factor, rng, max_side):
            v = v.to(device)
            with autocast(device, teacher_bf16):
                z = teacher(v).float()
            if z.shape[-2:] != (v.shape[-2] // factor, v.shape[-1] // factor):
                raise VaepackError(
                    f"teacher latent {tuple(z.shape)} is not the image size / {factor}",
                    hint="the teacher must be a factor-8 encoder",
                )
            dec = None
            if teacher_decoder is not None:
                with autocast(device, teacher_bf16):
                    dec = teacher_decoder(z).float().clamp(0, 1)
                dec = (dec[0] * 255).round().to(torch.uint8).cpu()
            pool.append(View((v[0] * 255).round().to(torch.uint8).cpu(), z[0].half().cpu(), dec))
        if progress:
            progress({"phase": "teacher", "step": i + 1, "total": len(images), "elapsed": time.time() - t0})
    return pool


def teacher_pool(
    *,
    teacher: nn.Module,
    teacher_decoder: nn.Module | None,
    data_dir: Path,
    run_dir: Path,
    views: Sequence[tuple],
    teacher_id: str,
    seed: int,
    max_side: int | None,
    device: torch.device,
    bf16: bool,
    cache: Path | None = None,
    progress: Callable[[dict], None] | None = None,
) -> list[View]:
    """The run's view pool: from ``run_dir/teacher_cache.pt`` or ``cache`` when made with the same
    teacher, files, views, window size and seed, else computed (and cached) now.

    An encoder run can reuse a decoder run's cache (the decoded images are unused extras); a decoder
    run can reuse an encoder run's latents and adds only the decoder pass.
    """
    own = run_dir / "teacher_cache.pt"
    files = training_images(data_dir)
    key = {"teacher": teacher_id, "files": [str(p) for p in files], "views": [list(map(str, v)) for v in views],
           "decoder": teacher_decoder is not None, "max_side": max_side, "seed": seed}
    for cand in [own] + ([Path(cache)] if cache else []):
        if not cand.exists():
            continue
        cached = torch.load(cand, weights_only=False)
        ck = cached.get("key", {})
        pool = None
        if ck == key or (teacher_decoder is None and {**ck, "decoder": False} == key):
            pool = pool_from_state(cached["pool"])
        elif teacher_decoder is not None and {**ck, "decoder": True} == key:
            pool = pool_from_state(cached["pool"])
            t0 = time.time()
            with torch.no_grad():
                for i, v in enumerate(pool):
                    with autocast(device, bf16):
                        dec = teacher_decoder(v.latent[None].float().to(device)).float().clamp(0, 1)
                    v.decoded = (dec[0] * 255).round().to(torch.uint8).cpu()
                    if progress:
                        progress({"phase": "teacher", "step": i + 1, "total": len(pool), "elapsed": time.time() - t0})
            atomic_torch_save({"key": key, "pool": pool_state(pool)}, own)
        if pool is not None:
            log.info("teacher cache: %d views from %s", len(pool), cand)
            return pool
    images = load_images(data_dir)
    t0 = time.time()
    pool = build_pool(images, teacher, views, device, teacher_bf16=bf16, teacher_decoder=teacher_decoder,
                      seed=seed, progress=progress, max_side=max_side)
    atomic_torch_save({"key": key, "pool": pool_state(pool)}, own)
    log.info("teacher cache: %d views of %d images in %.0fs", len(pool), len(images), time.time() - t0)
    return pool


def sample_batch(pool: list[View], crop: int, batch: int, factor: int, border: int, rng: random.Random, decoded: bool):
    """Random crops on the latent grid. Returns images, latents, loss mask (latent res), decoded."""
    smallest = min(min(v.image.shape[1:]) for v in pool)
    crop = min(crop, smallest // factor * factor)
    eligible = [v for v in pool if min(v.image.shape[1:]) >= crop]
    lc = crop // factor
    imgs, lats, masks, decs = [], [], [], []
    for _ in range(batch):
        v = rng.choice(eligible)
        lh, lw = v.latent.shape[1:]
        y, x = rng.randint(0, lh - lc), rng.randint(0, lw - lc)
        imgs.append(v.image[:, y * factor:(y + lc) * factor, x * factor:(x + lc) * factor])
        lats.append(v.latent[:, y:y + lc, x:x + lc])
        m = torch.ones(lc, lc)
        if border and lc > 2 * border:  # mask crop edges that are not image edges
            if y > 0:
                m[:border] = 0
            if y + lc < lh:
                m[-border:] = 0
            if x > 0:
                m[:, :border] = 0
            if x + lc < lw:
                m[:, -border:] = 0
        masks.append(m)
        if decoded:
            decs.append(v.decoded[:, y * factor:(y + lc) * factor, x * factor:(x + lc) * factor])
    img = torch.stack(imgs).float() / 255
    out = img, torch.stack(lats).float(), torch.stack(masks)[:, None]
    return out + ((torch.stack(decs).float() / 255,) if decoded else (None,))
