"""Measure params, MACs and CPU latency of student encoders vs the TAEF2 encoder.

Usage: python benchmarks/encoder_cost.py [--threads 2] [--sizes 256 512]
Student sizes are measured at 1.5x the teacher size (the paper-000 protocol, 2.25x the pixels).
"""
from __future__ import annotations

import argparse, json, time

import torch

from vaepack.models import student, tae
from vaepack.flops import count_macs


def latency(m, x, reps=5, bf16=False):
    m = m.eval()
    if bf16:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        m(x)
        ts = []
        for _ in range(reps):
            t = time.perf_counter(); m(x); ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--configs", type=str, default=None, help="JSON dict name -> StudentConfig kwargs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cands = {
        "paper-w32": dict(width=32),
        "paper-w16": dict(width=16),
        "s2-w32": dict(width=32, stem_stride=2),
        "s2-w48-234": dict(width=48, stem_stride=2, stage_blocks=[2, 3, 4]),
        "s2-w40": dict(width=40, stem_stride=2),
        "s1-w32-134": dict(width=32, stage_blocks=[1, 3, 4]),
    }
    if a.configs:
        cands = json.loads(a.configs)
    models = {"taef2-enc": (tae.encoder(tae.TAEConfig(kind="f8", latent_channels=32, midblock_gn=True)), 1.0)}
    for k, kw in cands.items():
        m = student.fuse_bn(student.build("encoder", student.StudentConfig(**kw)).eval())
        models[k] = (m, 1.5)
    print("| model | params | scale | " + " | ".join(f"GMAC@{s} | fp32 ms@{s} | bf16cl ms@{s}" for s in a.sizes) + " |")
    for name, (m, sc) in models.items():
        row = [name, f"{sum(p.numel() for p in m.parameters())/1e6:.3f}M", f"{sc}x"]
        for s in a.sizes:
            px = int(round(s * sc / 8)) * 8
            x = torch.rand(1, 3, px, px)
            row += [f"{count_macs(m, x.shape)/1e9:.2f}", f"{latency(m, x):.1f}", f"{latency(m, x, bf16=True):.1f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
