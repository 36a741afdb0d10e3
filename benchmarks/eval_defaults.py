"""Round-trip quality, size and speed of vaepack's default FLUX.2-space models vs TAEF2.

Protocol (paper 000, section IV-B "resolution-remapped"): resize the image by `scale` (bilinear,
antialias), encode, decode, clamp to [0,1], resize back to the original size, compare with the
original. Metrics: PSNR (dB, RGB) and SSIM (11x11 Gaussian, sigma 1.5, mean over RGB) on full
images (cropped to multiples of 8) and on center 256 px crops.

usage: python benchmarks/eval_defaults.py --encoder [NAME=]W.safetensors --decoder [NAME=]W.safetensors [--dev DIR]
Pixel sizes in the cost table are input sizes for encoders and output sizes for decoders.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vaepack.flops import count_macs
from vaepack.train.teachers import load_tae_teacher
from vaepack.train.warmstart import load_exported


def load_safetensors_model(path: str):
    return load_exported(path)


def resize(x, h, w):
    if x.shape[-2:] == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean().clamp_min(1e-12)))


def ssim(a, b):
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    g = (g / g.sum())
    k = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    f = lambda x: F.conv2d(x, k, groups=3)
    mu_a, mu_b = f(a), f(b)
    saa, sbb, sab = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return float(m.mean())


@torch.inference_mode()
def roundtrip(enc, dec, x, scale):
    H, W = x.shape[-2:]
    h, w = int(round(H * scale / 8)) * 8, int(round(W * scale / 8)) * 8
    y = dec(enc(resize(x, h, w).clamp(0, 1))).clamp(0, 1)
    return resize(y, H, W).clamp(0, 1)


def latency(m, shape, bf16, reps=3):
    x = torch.rand(shape)
    if bf16:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        m(x)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            m(x)
            ts.append(time.perf_counter() - t)
    m.to(memory_format=torch.contiguous_format)
    return sorted(ts)[len(ts) // 2] * 1000


def _named(items):
    out = {}
    for it in items or []:
        name, _, path = it.rpartition("=")
        out[name or Path(path).stem] = load_safetensors_model(path)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", action="append", help="[NAME=]PATH.safetensors (repeatable)")
    ap.add_argument("--decoder", action="append", help="[NAME=]PATH.safetensors (repeatable)")
    ap.add_argument("--dev", default="/work/shared/data/dev")
    ap.add_argument("--teacher-encoder", default="/work/shared/weights/taef2_encoder.pth")
    ap.add_argument("--teacher-decoder", default="/work/shared/weights/taef2_decoder.pth")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 384, 512, 768])
    ap.add_argument("--no-cost", action="store_true")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--crops-only", action="store_true", help="skip full images (center 256 crops only)")
    ap.add_argument("--no-teacher-pairs", action="store_true", help="only pairs with a non-TAEF2 encoder")
    ap.add_argument("--pairs", nargs="+", default=None, help="only these ENC:DEC name pairs")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    encs = {"taef2-enc": load_tae_teacher(a.teacher_encoder, "encoder"), **_named(a.encoder)}
    decs = {"taef2-dec": load_tae_teacher(a.teacher_decoder, "decoder"), **_named(a.decoder)}
    results = {}
    if not a.no_quality:
        files = sorted(p for p in Path(a.dev).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
        imgs = []
        for p in files:
            x = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
            H, W = x.shape[-2:]
            full = x[..., : H // 8 * 8, : W // 8 * 8]
            t, l = max(0, (H - 256) // 2), max(0, (W - 256) // 2)
            imgs.append((full, x[..., t:t + 256, l:l + 256]))
        print(f"{len(files)} dev images from {a.dev}, fp32, {a.threads} thread(s)")
        print("| encoder | decoder | scale | PSNR full | SSIM full | PSNR c256 | SSIM c256 |")
        print("|---|---|---|---|---|---|---|")
        for en, e in encs.items():
            for dn, d in decs.items():
                for s in a.scales:
                    r = {"pf": [], "sf": [], "pc": [], "sc": []}
                    if a.no_teacher_pairs and en == "taef2-enc":
                        continue
                    if a.pairs and f"{en}:{dn}" not in a.pairs:
                        continue
                    for full, crop in imgs:
                        if not a.crops_only:
                            yf = roundtrip(e, d, full, s)
                            r["pf"].append(psnr(yf, full)); r["sf"].append(ssim(yf, full))
                        yc = roundtrip(e, d, crop, s)
                        r["pc"].append(psnr(yc, crop)); r["sc"].append(ssim(yc, crop))
                    m = {k: float(np.mean(v)) if v else float("nan") for k, v in r.items()}
                    results[f"{en}|{dn}|{s}"] = m
                    print(f"| {en} | {dn} | {s} | {m['pf']:.2f} | {m['sf']:.4f} | {m['pc']:.2f} | {m['sc']:.4f} |", flush=True)
    if not a.no_cost:
        hdr = " | ".join(f"GMAC@{px}" for px in a.sizes) + " | " + " | ".join(
            f"fp32 ms@{px} | bf16+CL ms@{px}" for px in a.sizes)
        print(f"\n| model | params | {hdr} |")
        print("|---|---|" + "---|" * (3 * len(a.sizes)))
        models = [(n, m, "enc") for n, m in encs.items()] + [(n, m, "dec") for n, m in decs.items()]
        for name, m, kind in models:
            row = [name, f"{sum(p.numel() for p in m.parameters()) / 1e6:.3f}M"]
            shapes = [(1, 3, px, px) if kind == "enc" else (1, 32, px // 8, px // 8) for px in a.sizes]
            row += [f"{count_macs(m, sh) / 1e9:.2f}" for sh in shapes]
            for sh in shapes:
                row += [f"{latency(m, sh, False):.1f}", f"{latency(m, sh, True):.1f}"]
            print("| " + " | ".join(row) + " |", flush=True)
            results[f"cost|{name}"] = row
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
