"""Images/s of `vaepack dataset encode` (local engine, 1 and 2 workers; Ray engine) against the best
single-process `vaepack encode`, on the same photos, model and backend (issue 16's targets).

Each configuration runs as the user would run it (a fresh process, a fresh output folder), ``--repeat``
times; the table reports the best wall time (whole command: start-up, model load, reading, encoding,
writing) and images/s = latents written / that time. A warm-up `vaepack encode` of one photo first
fills the export cache (OpenVINO), which every configuration then shares.

    python benchmarks/dataset_throughput.py --data ../shared/data/train --repeat 2 --md benchmarks/results/dataset.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VAEPACK = [sys.executable, "-m", "vaepack.cli"]


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode not in (0,):
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return dt, p.stdout


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/train")
    ap.add_argument("--model", default="default")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    ap.add_argument("--md", default=None, help="append the table to this Markdown file")
    a = ap.parse_args()
    data = Path(a.data)
    n = sum(1 for p in data.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    tmp = Path(tempfile.mkdtemp(prefix="vaepack-dsbench-"))
    common = ["--model", a.model, "--backend", a.backend]
    first = sorted(data.rglob("*.png"))[0]
    run(VAEPACK + ["encode", str(first), "-o", str(tmp / "warm.latent.safetensors"), *common])  # export cache
    configs = {
        "encode b8": VAEPACK + ["encode", str(data), "-o", "{out}", "--force", *common, "--json"],
        "encode b1": VAEPACK + ["encode", str(data), "-o", "{out}", "--force", "--batch-size", "1", *common, "--json"],
        "dataset local w1": VAEPACK + ["dataset", "encode", str(data), "{out}", *common, "--workers", "1", "--json"],
        "dataset local w2": VAEPACK + ["dataset", "encode", str(data), "{out}", *common, "--workers", "2", "--json"],
        "dataset ray w1": VAEPACK + ["dataset", "encode", str(data), "{out}", *common, "--engine", "ray", "--workers", "1", "--json"],
        "dataset ray w2": VAEPACK + ["dataset", "encode", str(data), "{out}", *common, "--engine", "ray", "--workers", "2", "--json"],
    }
    only = [c.strip() for c in a.only.split(",") if c.strip()]
    names = [n for n in configs if not only or n in only]
    best: dict[str, dict] = {}
    for rnd in range(a.repeat):  # round-robin, so other load on the machine hits every configuration alike
        for name in names:
            out = tmp / name.replace(" ", "_")
            shutil.rmtree(out, ignore_errors=True)
            load0 = os.getloadavg()[0]
            dt, stdout = run([c.replace("{out}", str(out)) for c in configs[name]])
            d = json.loads(stdout)
            images = d["encoded"] if "encoded" in d else len(d["ok"])
            print(f"[{rnd + 1}/{a.repeat}] {name}: {dt:.1f} s, {images / dt:.2f} images/s (load {load0:.2f})",
                  file=sys.stderr, flush=True)
            if name not in best or dt < best[name]["seconds"]:
                best[name] = {"name": name, "seconds": dt, "images": images, "ips": images / dt,
                              "engine_ips": d.get("images_per_s"), "ran": f"{d.get('backend')} {d.get('dtype')}",
                              "load": load0, "cmd": " ".join(configs[name]).replace(" ".join(VAEPACK), "vaepack")}
    rows = [best[n] for n in names]
    shutil.rmtree(tmp, ignore_errors=True)
    base = max((r["ips"] for r in rows if r["name"].startswith("encode")), default=None)
    local = max((r["ips"] for r in rows if r["name"].startswith("dataset local")), default=None)
    lines = [f"### {datetime.date.today().isoformat()}: {n} photos of {data.name}, model {a.model}, backend {a.backend}",
             "", f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; torch threads per process: "
             f"{os.cpu_count()} (1 per worker with 2 workers); best of {a.repeat} runs.", "",
             "| configuration | ran | wall s | images/s (whole command) | images/s (encode phase) | vs best `encode` | load (1 min) at start |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{r['ips'] / base:.0%}" if base else ""
        e = f"{r['engine_ips']:.2f}" if r["engine_ips"] else ""
        lines.append(f"| {r['name']} | {r['ran']} | {r['seconds']:.1f} | {r['ips']:.2f} | {e} | {rel} | {r['load']:.2f} |")
    if base and local:
        ray = max((r["ips"] for r in rows if r["name"].startswith("dataset ray")), default=None)
        lines += ["", f"local / best encode: {local / base:.0%} (target >= 90%)"
                  + (f"; ray / local: {ray / local:.0%} (target >= 80%)" if ray else "")]
    lines += ["", "Commands (OUT a fresh folder each run):", ""] + [f"    {r['cmd']}" for r in rows] + [""]
    text = "\n".join(lines)
    print(text)
    if a.md:
        with open(a.md, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
