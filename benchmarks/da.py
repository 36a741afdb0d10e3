"""DA-VAE (issue 13, paper 002) measurements: reconstruction at 4x fewer tokens, what the detail
channels carry, and what it costs.

For every dev photo x (center ``--crop`` px crops, the targets' protocol, and the full photos cropped
to a multiple of 16 px so no padding enters the comparison), all torch fp32, outputs clamped to [0, 1]:
- taef2 f8:        D_t(E_t(x))                             (0.5 latent floats per pixel)
- bicubic of half: up(half(x))                            (0.75 pixel values per pixel)
- base only:       up(D_t(E_t(half(x))))                   (0.125 floats per pixel)
- each DA-VAE:     D([z, z_d]), and with z_d zeroed / N(0, I) (paper Fig. S2)   (0.25 floats per pixel
                   at D = 32)
half = the DA's documented antialiased bicubic 2x downsample, up = bicubic 2x. PSNR / SSIM / MS-SSIM
from vaepack.metrics. Structure of z_d (paper Sec. 3.1 and S4-S5): Pearson correlation of Proj(z_d)
with z, per-channel std of z_d vs z, and the share of the radial power spectrum above half the
Nyquist frequency for z and z_d. Cost: parameters, MACs (vaepack.flops) and torch fp32 latency at
--size px, batch 1, median of --repeat runs in one process, against TAEF2 at the same image size.

    python benchmarks/da.py --data ../shared/data/dev --model da --run RUN ... [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def load_run(run: Path):
    """(encoder, decoder, label) from a train-da run's checkpoint (EMA weights) or its exports."""
    from vaepack.models import da

    c = torch.load(run / "checkpoint.pt", weights_only=False, map_location="cpu")
    cfg = da.DAConfig(**c["meta"]["config"])
    enc, dec = da.build("encoder", cfg), da.build("decoder", cfg)
    enc.load_state_dict(c["ema_enc"])
    dec.load_state_dict(c["ema_dec"])
    m = c["meta"]
    weight = f" {m['align_weight']}" if m["align"] != "none" else ""  # align none has no weight to show
    return enc.eval(), dec.eval(), f"{run.name} (step {c['step']}, align {m['align']}{weight})"


def load_model(mid: str):
    from vaepack.loader import load_part

    enc, entry, _ = load_part(mid, "encoder")
    dec = load_part(mid, "decoder")[0]
    return enc.eval(), dec.eval(), entry.id


def radial_high_share(z: torch.Tensor) -> float:
    """Share of the (mean-removed) spatial power spectrum above half the Nyquist radius, averaged
    over channels (paper Fig. S5's radial spectrum, reduced to one number)."""
    z = z - z.mean((-2, -1), keepdim=True)
    p = torch.fft.fftshift(torch.fft.fft2(z.double()).abs() ** 2, dim=(-2, -1)).mean((0, 1))
    h, w = p.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    r = torch.sqrt((yy / (h / 2)) ** 2 + (xx / (w / 2)) ** 2)  # 1 = Nyquist along an axis
    return float(p[r > 0.5].sum() / p.sum().clamp_min(1e-12))


def main(argv=None) -> int:
    from vaepack.bench.machine import machine_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", nargs="*", default=[], help="manifest DA models (e.g. da)")
    ap.add_argument("--run", type=Path, nargs="*", default=[], help="train-da run folders (checkpoint EMA)")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--no-full", action="store_true", help="skip the full-photo rows")
    ap.add_argument("--size", type=int, default=512, help="latency image size (px)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from vaepack.bench.run import TimedCall, time_call
    from vaepack.flops import count_macs, param_count
    from vaepack.io import center_crop, list_images, load_image
    from vaepack.loader import load_part
    from vaepack.metrics import image_metrics, mean_of_rows
    from vaepack.models import da

    te, td = load_part("taef2", "encoder")[0].eval(), load_part("taef2", "decoder")[0].eval()
    das = [load_model(m) for m in a.model] + [load_run(r) for r in a.run]
    if not das:
        ap.error("give at least one --model or --run")
    filt = das[0][0].cfg.down_filter

    def up(x):
        return F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)

    sets = [("crop", a.crop)] + ([] if a.no_full else [("full", None)])
    rows: dict = {}
    struct: dict = {}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for p in list_images(a.data):
            img = load_image(p)
            for sname, crop in sets:
                x = center_crop(img, crop)
                h, w = (x.shape[-2] // 16) * 16, (x.shape[-1] // 16) * 16
                x = x[None, :, :h, :w].float()
                xh = da.half(x, filt)
                out = {"taef2 f8": td(te(x)), "bicubic of half": up(xh), "base only": up(td(te(xh)).clamp(0, 1))}
                for enc, dec, label in das:
                    zz = enc(x)
                    z, zd = zz[:, :enc.cfg.base_channels], zz[:, enc.cfg.base_channels:]
                    out[label] = dec(zz)
                    out[f"{label}, z_d zeroed"] = dec(torch.cat([z, torch.zeros_like(zd)], 1))
                    out[f"{label}, z_d ~ N(0, I)"] = dec(torch.cat([z, torch.randn(zd.shape, generator=g)], 1))
                    if sname == sets[-1][0]:
                        pz = da.proj(zd, z.shape[1])
                        s = struct.setdefault(label, [])
                        s.append({"corr": float(torch.corrcoef(torch.stack([pz.flatten(), z.flatten()]))[0, 1]),
                                  "std_zd": float(zd.std((0, 2, 3)).mean()), "std_z": float(z.std((0, 2, 3)).mean()),
                                  "high_z": radial_high_share(z), "high_zd": radial_high_share(zd)})
                for k, y in out.items():
                    rows.setdefault(sname, {}).setdefault(k, []).append(image_metrics(y.clamp(0, 1), x))
            print(f"{p.name}", file=sys.stderr)

    fpp = {"taef2 f8": 32 / 64, "bicubic of half": 3 / 4, "base only": 32 / 256}
    for enc, _, label in das:
        fpp[label] = enc.cfg.channels / 256
    table = {s: {k: {**mean_of_rows(v, keys=("psnr", "ssim", "ms_ssim")), "floats_per_pixel": fpp.get(k.split(",")[0])}
                 for k, v in d.items()} for s, d in rows.items()}
    structure = {k: {m: sum(r[m] for r in v) / len(v) for m in v[0]} for k, v in struct.items()}

    # cost at --size px, batch 1
    n = a.size
    x = torch.rand(1, 3, n, n)
    cost = {}
    parts = {"taef2 encoder": (te, x), "taef2 decoder": (td, torch.randn(1, 32, n // 8, n // 8))}
    for enc, dec, label in das[:1]:
        parts["da encoder"] = (enc, x)
        parts["da decoder"] = (dec, torch.randn(1, enc.cfg.channels, n // 16, n // 16))
    for name, (mod, inp) in parts.items():
        t = time_call(TimedCall(fn=mod, sync=lambda: None), inp, warmup=1, repeat=a.repeat, device=torch.device("cpu"))
        cost[name] = {"params": param_count(mod), "gmacs": count_macs(mod, tuple(inp.shape)) / 1e9, "ms": t.median_ms}
    tokens = {"taef2 f8": (n // 8) ** 2, "da": (n // 16) ** 2}

    res = {"machine": machine_info(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "crop": a.crop, "size": n, "table": table, "structure": structure,
           "cost": cost, "tokens_at_size": tokens, "command": " ".join(sys.argv)}
    for s, d in table.items():
        print(f"\n[{s}] {'row':44s} {'PSNR':>7s} {'SSIM':>7s} {'MS-SSIM':>8s} {'floats/px':>9s}")
        for k, v in d.items():
            f = v["floats_per_pixel"]
            print(f"    {k:44s} {v['psnr']:7.2f} {v['ssim']:7.4f} {v['ms_ssim']:8.4f} {'' if f is None else f'{f:9.3f}'}")
    print("\nstructure:", json.dumps(structure, indent=1))
    print("cost:", json.dumps(cost, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
