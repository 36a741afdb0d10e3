"""Training-free probes for DA-VAE (issue 13): can TAEF2 itself supply useful detail channels?

Two ways to fill the D = 32 detail channels at H/16 without training, on center ``--crop`` px crops of
the dev photos (those at least that large), torch fp32, outputs clamped to [0, 1], PSNR at full size:

- ``residual``: z_d = TAEF2(0.5 + g r), r = half(x) - TAEF2.dec(z) (the base round trip's error at half
  size, amplified by g); decoded as up(TAEF2.dec(z) + (TAEF2.dec(z_d) - TAEF2.dec(TAEF2(0.5))) / g).
  Two-stage residual coding with the pretrained codec (TAEF2 on the half-size image is f16).
- ``linear``: the full-size TAEF2 latent in 2x2 blocks (128 channels at H/16) predicted from z by least
  squares (fitted on ``--fit-photos`` training photos, 2 random crops each), z_d = the top-k principal
  components of what z does not predict; decoded by TAEF2's decoder at full size.

    python benchmarks/da_probes.py --train ../shared/data/train --data ../shared/data/dev [--json F]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def psnr(y: torch.Tensor, x: torch.Tensor) -> float:
    from vaepack.metrics import psnr as _psnr

    return float(_psnr(y.clamp(0, 1), x))


def up(t: torch.Tensor) -> torch.Tensor:
    return F.interpolate(t, scale_factor=2, mode="bicubic", align_corners=False)


def main(argv=None) -> int:
    from vaepack.bench.machine import machine_info
    from vaepack.io import list_images, load_image
    from vaepack.loader import load_part
    from vaepack.models import da

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True, help="training photos (the linear probe's fit)")
    ap.add_argument("--data", type=Path, required=True, help="evaluation photos (dev)")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--fit-photos", type=int, default=80)
    ap.add_argument("--gains", type=float, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--ks", type=int, nargs="*", default=[0, 16, 32, 64])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    enc, dec = load_part("taef2", "encoder")[0].eval(), load_part("taef2", "decoder")[0].eval()
    s = a.crop
    half = lambda x: da.half(x, "bicubic")  # noqa: E731  (DA's documented downsample)

    # linear probe: fit on random crops of training photos
    rng = random.Random(0)
    train = list_images(a.train, require=True)
    rng.shuffle(train)
    zs, z4s = [], []
    with torch.no_grad():
        for p in train[:a.fit_photos]:
            x = load_image(p)[None]
            h, w = x.shape[-2:]
            if min(h, w) < s:
                continue
            for _ in range(2):
                t, l = rng.randrange(h - s + 1) // 16 * 16, rng.randrange(w - s + 1) // 16 * 16
                xc = x[..., t:t + s, l:l + s]
                zs.append(enc(half(xc))[0].flatten(1).T)
                z4s.append(F.pixel_unshuffle(enc(xc), 2)[0].flatten(1).T)
    Z, Z4 = torch.cat(zs).double(), torch.cat(z4s).double()
    Zb = torch.cat([Z, torch.ones(len(Z), 1, dtype=Z.dtype)], 1)
    A = torch.linalg.lstsq(Zb, Z4).solution
    R = Z4 - Zb @ A
    mu = R.mean(0)
    U = torch.linalg.svd((R - mu).T @ (R - mu) / len(R))[0]
    explained = 1 - R.var(0).sum().item() / Z4.var(0).sum().item()

    rows: dict[str, list[float]] = {}
    with torch.no_grad():
        grey = dec(enc(torch.full((1, 3, s // 2, s // 2), 0.5)))
        for p in list_images(a.data, require=True):
            x = load_image(p)[None]
            h, w = x.shape[-2:]
            if min(h, w) < s:
                continue
            t, l = (h - s) // 2, (w - s) // 2
            x = x[..., t:t + s, l:l + s]
            xh = half(x)
            z, zf = enc(xh), enc(x)
            b = dec(z).clamp(0, 1)
            rows.setdefault("taef2 f8", []).append(psnr(dec(zf), x))
            rows.setdefault("bicubic of half", []).append(psnr(up(xh), x))
            rows.setdefault("base only", []).append(psnr(up(b), x))
            rows.setdefault("base only, at half size", []).append(psnr(b, xh))
            r = xh - b
            for g in a.gains:
                rr = (dec(enc((0.5 + g * r).clamp(0, 1))) - grey) / g
                rows.setdefault(f"residual g={g:g}", []).append(psnr(up(b + rr), x))
                rows.setdefault(f"residual g={g:g}, at half size", []).append(psnr(b + rr, xh))
            zt = torch.cat([z[0].flatten(1).T.double(), torch.ones(z.shape[-2] * z.shape[-1], 1, dtype=torch.double)], 1)
            z4 = F.pixel_unshuffle(zf, 2)[0].flatten(1).T.double()
            pred = zt @ A
            for k in a.ks:
                rec = pred + mu + ((z4 - pred - mu) @ U[:, :k]) @ U[:, :k].T if k else pred
                zz = F.pixel_shuffle(rec.T.reshape(1, 128, *z.shape[-2:]).float(), 2)
                rows.setdefault(f"linear k={k}", []).append(psnr(dec(zz), x))
    table = {k: sum(v) / len(v) for k, v in rows.items()}
    n = len(rows["base only"])
    for k, v in table.items():
        print(f"{k:32s} {v:6.2f}")
    print(f"({n} photos; the linear fit: z explains {explained:.3f} of the 2x2-block latent variance)", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps({"machine": machine_info(), "photos": n, "crop": s, "psnr": table,
                                      "linear_explained_by_z": explained, "fit_tokens": len(Z),
                                      "command": " ".join(sys.argv)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
