"""The eps decoder's training set: every image encoded once by the frozen encoder and cached.

CPU speed: the frozen encoder (and the base decoder when ``base="tae"``) run once per training image
and are cached in ``<out_dir>/cache_<encoder>.safetensors`` (image uint8, latent fp32, base fp16);
training crops are aligned to the latent grid so cached latent/base crops match the image crops.
No flip augmentation: the frozen encoder is not flip-equivariant, so a flipped latent is not the
latent of the flipped image.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from vaepack.errors import UsageError
from vaepack.io import atomic_output, load_image
from vaepack.train.common import training_images

CACHE_VERSION = "1"
Progress = Callable[[str], None]


def image_names(data_dir: Path, files: list[Path]) -> list[str]:
    """How the cache names its images: paths relative to the training folder (POSIX), so images in
    subfolders stay distinct (for a flat folder, the file names)."""
    return [p.relative_to(data_dir).as_posix() for p in files]


@torch.no_grad()
def build_cache(encoder_id: str, data_dir: Path, cache_path: Path, *, base: bool = True,
                progress: Progress | None = None) -> Path:
    """Encode every training image once with the frozen encoder (and decode it with the model's own
    deterministic decoder, the "base" reconstruction) and store image/latent/base in one safetensors.

    Images are cropped (top-left) to a multiple of the latent factor, so crops of the cached image,
    latent and base line up exactly. Latents are fp32, base reconstructions fp16 in [0, 1] (clamped),
    images uint8. CPU: ~6 s per 480x320 image for TAEF2 on one busy thread, so this is done once.
    """
    from safetensors.torch import save_file

    from vaepack.vae import load_torch_vae

    data_dir = Path(data_dir)
    files = training_images(data_dir)
    vae = load_torch_vae(encoder_id, parts=("encoder", "decoder") if base else ("encoder",), device="cpu")
    f = vae.factor
    tensors: dict[str, torch.Tensor] = {}
    t0 = time.time()
    for i, p in enumerate(files):
        x = load_image(p)
        h, w = (x.shape[1] // f) * f, (x.shape[2] // f) * f
        x = x[:, :h, :w]
        z = vae.encode(x[None])
        tensors[f"img.{i}"] = (x * 255).round().to(torch.uint8).contiguous()
        tensors[f"z.{i}"] = z[0].contiguous()
        if base:
            tensors[f"base.{i}"] = vae.decode(z)[0].to(torch.float16).contiguous()
        if progress:
            progress(f"cache {i + 1}/{len(files)} {p.name} {w}x{h} ({time.time() - t0:.0f}s)")
    meta = {"format": "vaepack.eps_cache", "version": CACHE_VERSION, "encoder": encoder_id,
            "files": json.dumps(image_names(data_dir, files)), "base": json.dumps(base), "factor": str(f)}
    with atomic_output(Path(cache_path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(cache_path)


class LatentCache:
    """The cached training set in memory; ``batch`` draws latent-grid-aligned random crops.

    ``names``: the training images as ``image_names`` gives them, to refuse a stale cache (None: any).
    """

    def __init__(self, path: Path, encoder_id: str, names: list[str] | None, base: bool):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "vaepack.eps_cache" or meta.get("version") != CACHE_VERSION:
                raise UsageError(f"{path}: not a current eps training cache; delete it to rebuild")
            if meta.get("encoder") != encoder_id:
                raise UsageError(f"{path}: cache was built for encoder '{meta.get('encoder')}', not "
                                 f"'{encoder_id}'; delete it or use another --out")
            cached = json.loads(meta["files"])
            if names is not None and cached != list(names):
                raise UsageError(f"{path}: the training images changed since the cache was built; delete it")
            if base and not json.loads(meta.get("base", "false")):
                raise UsageError(f"{path}: cache has no base reconstructions; delete it to rebuild")
            self.factor = int(meta["factor"])
            n = len(cached)
            self.img = [f.get_tensor(f"img.{i}") for i in range(n)]
            self.z = [f.get_tensor(f"z.{i}") for i in range(n)]
            self.base = [f.get_tensor(f"base.{i}") for i in range(n)] if base else None
        self.names = cached

    def usable(self, crop: int) -> list[int]:
        return [i for i, im in enumerate(self.img) if im.shape[1] >= crop and im.shape[2] >= crop]

    def batch(self, n: int, crop: int, g: torch.Generator, pool: list[int]):
        """(x in [-1, 1], z, base in [-1, 1] or None) for n random crops of side ``crop``."""
        f = self.factor
        xs, zs, bs = [], [], []
        for _ in range(n):
            i = pool[int(torch.randint(len(pool), (1,), generator=g))]
            h, w = self.img[i].shape[1:]
            ly = int(torch.randint((h - crop) // f + 1, (1,), generator=g))
            lx = int(torch.randint((w - crop) // f + 1, (1,), generator=g))
            y, x, c = ly * f, lx * f, crop // f
            xs.append(self.img[i][:, y:y + crop, x:x + crop].float() / 127.5 - 1)
            zs.append(self.z[i][:, ly:ly + c, lx:lx + c].float())
            if self.base is not None:
                bs.append(self.base[i][:, y:y + crop, x:x + crop].float() * 2 - 1)
        return torch.stack(xs), torch.stack(zs), (torch.stack(bs) if bs else None)

    def residual_std(self) -> float:
        """Std of the data the flow models, in [-1, 1] units: x - base (or x without a base)."""
        s, ss, n = 0.0, 0.0, 0
        for i in range(len(self.img)):
            d = self.img[i].double() / 127.5 - 1
            if self.base is not None:
                d = d - (self.base[i].double() * 2 - 1)
            s += float(d.sum())
            ss += float((d * d).sum())
            n += d.numel()
        return math.sqrt(max(ss / n - (s / n) ** 2, 1e-12))
