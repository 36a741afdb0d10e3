"""Reading a cached dataset for training: ``LatentShards`` (a torch Dataset) and ``BucketBatchSampler``.

Items carry what SDXL-style conditioning needs (Podell et al. 2023, "SDXL", Sec. 2.2: original size
and crop top-left; the target size is the bucket). A cache made with other weights, another model or
another latent convention than the one the trainer expects is refused (the silent-reuse failure of
other latent caches), and every shard's fingerprint is checked against the manifest when opened.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from vaepack.data.plan import DatasetError
from vaepack.data.shards import read_index, require_manifest

OPEN_SHARDS = 8  # shard handles kept open per dataset (per DataLoader worker)


def check_model(manifest: dict, expect_model: str, path: str) -> None:
    """Refuse a cache made by another model, other weights or another latent convention."""
    from vaepack.latents import convention
    from vaepack.manifest import get_model
    from vaepack.weights import weights_digest

    s = manifest["settings"]
    entry = get_model(expect_model)
    hint = f"re-encode it: vaepack dataset encode SRC {path} --model {expect_model} --force"
    if entry.id != s["model"]:
        raise DatasetError(f"holds latents of '{s['model']}', not of '{entry.id}'", path=path, hint=hint)
    if convention(entry.space) != s["convention"]:
        raise DatasetError(f"is stale: '{entry.id}' now has another latent convention", path=path, hint=hint)
    digest = weights_digest(entry, "encoder")
    if digest != s["weights_sha256"]:
        raise DatasetError(f"is stale: encoded with other weights of '{entry.id}' ({s['weights_sha256'][:12]}, "
                           f"now {digest[:12]})", path=path, hint=hint)


class LatentShards(Dataset):
    """The latents of ``vaepack dataset encode OUT``, one item per image (dict): ``latent`` (C, h, w),
    ``key``, ``original_size`` (H, W), ``crop_top_left`` (top, left), ``target_size`` (H, W, the
    bucket or the image's size), ``flipped``, ``index``.

    ``expect_model``: refuse a stale cache (other model, weights or convention); ``expect_fingerprint``:
    refuse any other settings. ``flip_prob``: the chance an item is the mirrored latent (needs
    ``--flip`` at encode time), drawn per (seed, epoch, index), so it is reproducible in any worker.
    """

    def __init__(self, out: str | Path, expect_model: str | None = None, flip_prob: float = 0.0, seed: int = 0,
                 expect_fingerprint: str | None = None):
        self.out = Path(out)
        self.manifest = require_manifest(self.out)
        self.fingerprint = self.manifest["fingerprint"]
        if expect_fingerprint is not None and expect_fingerprint != self.fingerprint:
            raise DatasetError(f"has fingerprint {self.fingerprint[:12]}, not the expected {expect_fingerprint[:12]}",
                               path=str(self.out), hint="re-encode it with the settings the trainer expects (--force)")
        if expect_model is not None:
            check_model(self.manifest, expect_model, str(self.out))
        if not 0.0 <= flip_prob <= 1.0:
            raise DatasetError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if flip_prob > 0 and not self.manifest["settings"].get("flip"):
            raise DatasetError("was encoded without --flip, so it holds no mirrored latents", path=str(self.out),
                               hint="use flip_prob=0 or re-encode with --flip")
        self.flip_prob, self.seed, self.epoch = float(flip_prob), int(seed), 0
        self.rows = read_index(self.out)
        self.shapes = [tuple(r["latent_shape"]) for r in self.rows]
        self._open: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getstate__(self):  # DataLoader workers: open handles do not pickle; each worker opens its own
        d = dict(self.__dict__)
        d["_open"] = OrderedDict()
        return d

    def _shard(self, rel: str):
        from safetensors import safe_open

        f = self._open.pop(rel, None)
        if f is None:
            path = self.out / rel
            try:
                f = safe_open(str(path), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
                raise DatasetError(f"unreadable shard ({str(e).splitlines()[0][:120]})", path=str(path),
                                   hint="run `vaepack dataset verify`") from None
            if (f.metadata() or {}).get("fingerprint") != self.fingerprint:
                raise DatasetError("shard's fingerprint differs from the dataset's", path=str(path),
                                   hint="run `vaepack dataset verify`; re-encode with --force")
        self._open[rel] = f
        while len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return f

    def flipped(self, i: int) -> bool:
        return self.flip_prob > 0 and random.Random(f"{self.seed}:{self.epoch}:{i}").random() < self.flip_prob

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        flip = self.flipped(i)
        z = self._shard(r["shard"]).get_tensor(f"{'latent_flip' if flip else 'latent'}.{r['index']}")
        top, left = r["crop_top_left"]
        th, tw = r["target_size"]
        if flip:  # the crop's left edge, measured in the mirrored resized image
            left = r["resized_size"][1] - tw - left
        return {"latent": z, "key": r["key"], "original_size": tuple(r["original_size"]), "crop_top_left": (top, left),
                "target_size": (th, tw), "flipped": flip, "index": i}


def collate(items: list[dict]) -> dict:
    """Stack a batch of one shape (``BucketBatchSampler``'s): tensors for sizes, lists for keys."""
    return {"latent": torch.stack([it["latent"] for it in items]), "key": [it["key"] for it in items],
            "original_size": torch.tensor([it["original_size"] for it in items]),
            "crop_top_left": torch.tensor([it["crop_top_left"] for it in items]),
            "target_size": torch.tensor([it["target_size"] for it in items]),
            "flipped": torch.tensor([it["flipped"] for it in items]), "index": torch.tensor([it["index"] for it in items])}


class BucketBatchSampler(Sampler):
    """Batches of indices whose latents share one shape. Per epoch (``set_epoch``), seeded: the items
    of each shape are shuffled and cut into batches, and the batches shuffled. With several ranks
    every rank gets the same number of batches (padded by repeating batches, or cut with
    ``drop_last``), rank r taking batches r, r + W, ...; rank and world size default to
    torch.distributed's when it is initialized."""

    def __init__(self, shapes, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None):
        self.shapes = list(shapes.shapes if hasattr(shapes, "shapes") else shapes)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if rank is None or world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if on else 0) if rank is None else rank
            world_size = (dist.get_world_size() if on else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.shapes):
            groups.setdefault(tuple(s), []).append(i)
        out: list[list[int]] = []
        for shape in sorted(groups):
            idx = groups[shape]
            if self.shuffle:
                rng.shuffle(idx)
            for j in range(0, len(idx), self.batch_size):
                b = idx[j:j + self.batch_size]
                if len(b) == self.batch_size or not self.drop_last:
                    out.append(b)
        if self.shuffle:
            rng.shuffle(out)
        if self.world_size > 1 and out:
            if self.drop_last:
                out = out[:len(out) // self.world_size * self.world_size]
            else:
                pad = (-len(out)) % self.world_size
                out += (out * (pad // len(out) + 1))[:pad]
            out = out[self.rank::self.world_size]
        return out

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
