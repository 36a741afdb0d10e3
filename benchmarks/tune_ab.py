"""A/B latency of two `vaepack tune` candidates with tune's own timing code (vaepack.tune.VaeMeasurer),
alternating rounds so that a load change hits both alike; for checking a recommendation against a
reference point on a noisy machine (benchmarks/results/tune.md).

    VAEPACK_MIRROR=../shared/weights python benchmarks/tune_ab.py [--rounds 8] [--calls 3]

A: the default at 1.5x, OpenVINO int8 (both calibrated parts); B: TAEF2 at 1x, OpenVINO bf16 (auto's path).
512 px round trip, batch 1, per call ms: median and p10/p90 over all calls.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from vaepack import tune as T


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args(argv)
    m = T.VaeMeasurer(T.TuneConfig(images=[]), torch.device("cpu"))
    cands = {"default x1.5 openvino int8": T.Candidate("vaepack-f2-p64", "vaepack-f2-p64", None, 1.5, "openvino", "int8"),
             "taef2 x1 openvino bf16": T.Candidate("taef2", "taef2", None, 1.0, "openvino", "bf16")}
    times: dict[str, list[float]] = {k: [] for k in cands}
    for c in cands.values():
        m.latency(c, 2, 1)  # load, compile, warm up
    for _ in range(a.rounds):
        for k, c in cands.items():
            times[k] += m.latency(c, 0, a.calls).times_ms
    for k, v in times.items():
        s = sorted(v)
        print(f"{k}: median {statistics.median(v):.1f} ms, p10 {s[len(s) // 10]:.1f}, p90 {s[len(s) * 9 // 10]:.1f}, "
              f"n {len(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
