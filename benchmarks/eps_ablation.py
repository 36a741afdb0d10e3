"""eps-VAE ablation in the spirit of paper 004, Table 4, at an equal small CPU budget.

Variants, all trained from scratch with the same seed, data, steps and batch (the shipped recipe of
benchmarks/train_eps.sh otherwise: residual over the TAEF2 decoder, MS-SSIM+L1 perceptual weight 5,
t_grid_frac 0.5, EMA 0.999):
  ref       gamma 0.6, no adversarial term
  no-gamma  gamma 1.0 (x_t not scaled: the plain rectified-flow path)
  adv       gamma 0.6 + adversarial trajectory matching (weight 0.5, R1 1.0; paper's weights)
Sampler spacing (reversed-log Eq. 13 vs uniform) needs no training: every trained model and the
shipped decoder are evaluated with both grids. Evaluation: center 256 px crops of the dev set, TAEF2
latents, NFE 1/2/3/5 (`vaepack.train.eps.eval_nfe`).

usage: python benchmarks/eps_ablation.py --steps 500 --runs /work/runs/eps-abl --out benchmarks/results/eps_ablation.json
Rerunning resumes/skips finished runs.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from vaepack.bench.machine import machine_info
from vaepack.train.config import EpsTrainConfig
from vaepack.train.eps import eval_nfe, run_train_eps

VARIANTS = {
    "ref": dict(model_config={"gamma": 0.6}, w_adv=0.0),
    "no-gamma": dict(model_config={"gamma": 1.0}, w_adv=0.0),
    "adv": dict(model_config={"gamma": 0.6}, w_adv=0.5),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", default="/work/runs/eps-abl")
    ap.add_argument("--data", default=os.environ.get("DATA", "/work/shared/data/train"))
    ap.add_argument("--dev", default="/work/shared/data/dev")
    ap.add_argument("--shipped", default="vaepack/weights/vaepack-f2-eps-w32.safetensors")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--nfes", default="1,2,3,5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/eps_ablation.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    cache = runs / "cache_taef2_train.safetensors"
    nfes = tuple(int(n) for n in a.nfes.split(","))
    out = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {"variants": {}}
    out.update(steps=a.steps, batch=a.batch, crop=128, data=a.data, dev=a.dev, threads=a.threads,
               machine=machine_info(torch.device("cpu")))
    models = {name: runs / name for name in a.variants.split(",") if name}
    weights: dict[str, Path] = {}
    for name, run in models.items():
        t0 = time.time()
        cfg = EpsTrainConfig("taef2", Path(a.data), run, steps=a.steps, batch=a.batch, crop=128, lr=5e-4, ema=0.999,
                             w_vel=1.0, w_perc=5.0, t_grid_frac=0.5, seed=0, device="cpu", cache_path=cache,
                             log_every=50, command="benchmarks/eps_ablation.py", **VARIANTS[name])
        res = run_train_eps(cfg, progress=print)
        out["variants"].setdefault(name, {})["train"] = {"seconds": round(time.time() - t0), "step": res.get("step"),
                                                         "settings": {k: v for k, v in VARIANTS[name].items()}}
        weights[name] = Path(res["export"]["path"])
        _save(out, a.out)
    if a.shipped:
        weights["shipped"] = Path(a.shipped)
    for name, w in weights.items():
        for sched in ("reversed_log", "uniform"):
            if sched in out["variants"].get(name, {}):
                continue
            r = eval_nfe(w, "taef2", Path(a.dev), nfes=nfes, crop=256, seed=0, deterministic=True, schedule=sched)
            out["variants"].setdefault(name, {})[sched] = r
            print(name, sched, json.dumps(r))
            _save(out, a.out)


def _save(obj, path) -> None:
    p = Path(path)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(p)


if __name__ == "__main__":
    main()
