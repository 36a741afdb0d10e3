"""Modelability of DA-VAE latents (issue 13 item 2, issue 15 "DA-VAE detail channels with align none /
proj / dm"): the offline stand-in for generation FID of `vaepack modelability`, applied to the latents of
train-da runs (checkpoint EMA) or manifest DA models.

For each DA encoder, the training photos (``--data``) and held-out photos (``--heldout``, full photos
cropped to a multiple of 16 px, torch fp32) are encoded once; then the same flow model, budget and seed
as `vaepack modelability` (vaepack.modelability.score_latents) are trained and scored on

- ``full``:   the whole latent [z, z_d] (what a diffusion model on DA latents models),
- ``detail``: z_d alone (what lambda_align shapes),
- ``base``:   z alone, once (the same for every run: TAEF2 of the half-size image).

    python benchmarks/da_modelability.py --run RUN [RUN ...] [--model da] --data ../shared/data/train \\
        --heldout ../shared/data/dev --steps 600 --seed 0 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from da import load_model, load_run  # noqa: E402  (the DA benchmark's loaders: one home)


def encode_all(enc, images) -> list[torch.Tensor]:
    """The latents of the photos (uint8 from load_images), cropped to a multiple of 16 px (no padding)."""
    out = []
    with torch.inference_mode():
        for _, img in images:
            h, w = (img.shape[-2] // 16) * 16, (img.shape[-1] // 16) * 16
            out.append(enc(img[None, :, :h, :w].float() / 255)[0].float())
    return out


def main(argv=None) -> int:
    from vaepack.bench.machine import machine_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, nargs="*", default=[], help="train-da run folders (checkpoint EMA)")
    ap.add_argument("--model", nargs="*", default=[], help="manifest DA models (e.g. da)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--parts", default="full,detail,base", help="comma list of full, detail, base")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from vaepack.modelability import FlowTrainConfig, ModelabilityConfig, check_disjoint, score_latents
    from vaepack.train.common import load_images, training_images

    parts = [p for p in a.parts.split(",") if p]
    if not set(parts) <= {"full", "detail", "base"}:
        ap.error("--parts takes full, detail, base")
    das = [load_model(m) for m in a.model] + [load_run(r) for r in a.run]
    if not das:
        ap.error("give at least one --run or --model")
    check_disjoint(training_images(a.data), training_images(a.heldout))
    train_imgs, held_imgs = load_images(a.data), load_images(a.heldout)
    cfg = ModelabilityConfig(models=["-"], data=a.data, heldout=a.heldout,
                             train=FlowTrainConfig(steps=a.steps, seed=a.seed), threads=a.threads)
    start = time.perf_counter()
    rows = []
    base_done = False
    for enc, _, label in das:
        t0 = time.perf_counter()
        tr, he = encode_all(enc, train_imgs), encode_all(enc, held_imgs)
        bc = enc.cfg.base_channels
        print(f"{label}: encoded in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        sel = {"full": slice(None), "detail": slice(bc, None), "base": slice(0, bc)}
        for part in parts:
            if part == "base" and base_done:
                continue
            s = sel[part]
            name = "base z (TAEF2 of the half-size image)" if part == "base" else f"{label} [{part}]"
            row = score_latents(name, [z[s] for z in tr], [z[s] for z in he], cfg,
                                progress=lambda m: print(m, file=sys.stderr))
            rows.append({"row": name, "part": part, "channels": int(tr[0][s].shape[0]), **row})
            print(f"  {name}: held-out {row['heldout_loss']:.4f} FD tokens {row['fd_tokens']:.3f} "
                  f"({row['fd_tokens_floor']:.3f}) FD 2x2 {row['fd_patches']:.2f} ({row['fd_patches_floor']:.2f})",
                  file=sys.stderr)
            base_done |= part == "base"
    res = {"machine": machine_info(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "steps": a.steps, "seed": a.seed, "rows": rows,
           "elapsed_s": time.perf_counter() - start, "command": " ".join(sys.argv)}
    print(f"\n{'row':60s} {'C':>3s} {'held-out':>9s} {'FD tok':>8s} {'floor':>7s} {'FD 2x2':>8s} {'floor':>7s}")
    for r in rows:
        print(f"{r['row']:60s} {r['channels']:3d} {r['heldout_loss']:9.4f} {r['fd_tokens']:8.3f} "
              f"{r['fd_tokens_floor']:7.3f} {r['fd_patches']:8.2f} {r['fd_patches_floor']:7.2f}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
