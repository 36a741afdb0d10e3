"""Paper 000, Table III: interpolation type (bilinear / bicubic) and position (pre / post).

- "-"    : plain round trip at 1x.
- "pre"  : resize the image by `scale` before encoding, decode, resize back (vaepack's `--scale`).
- "post" : round trip at 1x, then resize only the reconstruction up by `scale` and back, which
           isolates what the interpolation alone does (the paper's control row).
The upsampling filter is the row's type; shrinking back is antialiased with the same type
(`vaepack.pipeline.resize`). Metrics: `vaepack.metrics.image_metrics`, mean over images.

usage: python benchmarks/interp_ablation.py --pairs default:default,default:taef2,taef2:taef2 --scale 1.5 \
         --crop 256 --json benchmarks/results/interp_ablation.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vaepack.bench.machine import machine_info
from vaepack.io import center_crop, expand_inputs, load_image
from vaepack.metrics import image_metrics
from vaepack.pipeline import TileOptions, resize, roundtrip_tensor, scaled_size
from vaepack.runtime import load_vae

ROWS = [("-", "-"), ("bilinear", "post"), ("bilinear", "pre"), ("bicubic", "post"), ("bicubic", "pre")]


@torch.inference_mode()
def run(pairs, data, scale, crop, dtype="fp32"):
    images = [(p.name, center_crop(load_image(p), crop)) for p in expand_inputs([data])]
    never = TileOptions(budget=0)
    out = []
    for enc_id, dec_id in pairs:
        enc = load_vae(enc_id, parts=("encoder",), dtype=dtype)
        dec = load_vae(dec_id, parts=("decoder",), dtype=dtype)
        for kind, pos in ROWS:
            acc: dict[str, list[float]] = {}
            for _, x in images:
                if pos == "pre":
                    y, _ = roundtrip_tensor(enc, dec, x, scale, kind, never)
                else:
                    y, _ = roundtrip_tensor(enc, dec, x, 1.0, "bilinear", never)
                    if pos == "post":
                        h, w = x.shape[-2:]
                        y = resize(resize(y[None], scaled_size(h, w, scale), kind), (h, w), kind)[0].clamp(0, 1)
                for k, v in image_metrics(y[None], x[None]).items():
                    acc.setdefault(k, []).append(float(v))
            row = {"encoder": enc_id, "decoder": dec_id, "type": kind, "position": pos, "scale": scale,
                   **{k: sum(v) / len(v) for k, v in acc.items()}, "images": len(images)}
            out.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress; stdout is the Markdown table
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="default:default,default:taef2,taef2:taef2", help="ENC:DEC,...")
    ap.add_argument("--data", default="/work/shared/data/dev")
    ap.add_argument("--scale", type=float, default=1.5)
    ap.add_argument("--crop", type=int, default=None, help="center crop (px); default whole images")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pairs = [tuple(p.split(":")) for p in a.pairs.split(",")]
    rows = run(pairs, a.data, a.scale, a.crop, a.dtype)
    md = ["| encoder | decoder | interpolation | position | MSE (x1e-4) | PSNR | SSIM | MS-SSIM |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['encoder']} | {r['decoder']} | {r['type']} | {r['position']} | {r['mse'] * 1e4:.2f} | "
                  f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['ms_ssim']:.4f} |")
    print("\n".join(md))
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine_info(), "data": a.data, "crop": a.crop,
                                            "dtype": a.dtype, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
