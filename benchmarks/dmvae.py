"""DMVAE-style table (issue 15, paper 003): a distilled encoder continued with the distribution-matching
loss toward reference in {none, gaussian, model:taef2}, at equal steps.

For each encoder (``NAME=PATH.safetensors``, e.g. the shipped default and `vaepack distill` runs' exports):

- reconstruction: dev round trip at ``--scale`` through ``--decoder`` (the default's own decoder) and, with
  ``--taef2-decoder-recon``, through TAEF2's decoder (how well the latents stay in TAEF2's space), PSNR / SSIM on the full photos (the
  protocol of eval_defaults.py: bilinear antialiased resize, crop to a multiple of 8);
- distribution: per-channel std ratio and sliced-Wasserstein distance (vaepack.train.dm) of the dev latents
  to TAEF2's dev latents at 1x (the model:taef2 reference) and to N(0, I) (the gaussian reference);
- modelability: the flow model of `vaepack modelability` (vaepack.modelability.score_latents: same budget
  and seed for every row) trained on the encoder's latents of ``--data`` at ``--scale``, scored on ``--heldout``.

    python benchmarks/dmvae.py --encoder default=vaepack/weights/vaepack-f2-enc-p64.safetensors \\
        --encoder none=runs/dmv/none/vaepack-enc-tae64.safetensors ... --decoder vaepack/weights/vaepack-f2-dec-p64v3.safetensors \\
        --data ../shared/data/train --heldout ../shared/data/dev --scale 1.5 --steps 600 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_defaults import load_safetensors_model, psnr, resize, roundtrip, ssim  # noqa: E402  (one home)


def crop8(img: torch.Tensor) -> torch.Tensor:
    """A uint8 (3, H, W) photo as a [0, 1] batch of one, cropped to a multiple of 8 px (eval_defaults' protocol)."""
    return img[None, :, : img.shape[-2] // 8 * 8, : img.shape[-1] // 8 * 8].float() / 255


@torch.inference_mode()
def encode_all(enc, images, scale: float) -> list[torch.Tensor]:
    """Latents of uint8 photos cropped to a multiple of 8 px, resized by ``scale`` as roundtrip() does."""
    out = []
    for _, img in images:
        x = crop8(img)
        H, W = x.shape[-2:]
        h, w = int(round(H * scale / 8)) * 8, int(round(W * scale / 8)) * 8
        out.append(enc(resize(x, h, w).clamp(0, 1))[0].float())
    return out


@torch.inference_mode()
def reconstruction(enc, dec, images, scale: float) -> dict:
    ps, ss = [], []
    for _, img in images:
        x = crop8(img)
        y = roundtrip(enc, dec, x, scale)
        ps.append(psnr(y, x))
        ss.append(ssim(y, x))
    return {"psnr": sum(ps) / len(ps), "ssim": sum(ss) / len(ss), "psnr_per_photo": ps}


def distribution(lat: list[torch.Tensor], ref: list[torch.Tensor], seed: int) -> dict:
    from vaepack.train.dm import channel_std_ratio, sliced_wasserstein

    r = channel_std_ratio(lat, ref)
    return {"std_ratio_mean": sum(r) / len(r), "std_ratio_min": min(r), "std_ratio_max": max(r),
            "sliced_w2": sliced_wasserstein(lat, ref, seed=seed)}


def main(argv=None) -> int:
    from vaepack.bench.machine import machine_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", action="append", required=True, help="NAME=PATH.safetensors (repeatable)")
    ap.add_argument("--decoder", required=True, help="the pair's decoder (.safetensors)")
    ap.add_argument("--taef2-encoder", default=None, help="TAEF2 encoder .pth (default: the mirror's)")
    ap.add_argument("--taef2-decoder", default=None, help="TAEF2 decoder .pth (default: the mirror's)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--scale", type=float, default=1.5)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-modelability", action="store_true")
    ap.add_argument("--taef2-decoder-recon", action="store_true",
                    help="also the round trip through TAEF2's decoder (slow: a full TAEF2 decode at the remap size)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from vaepack.modelability import FlowTrainConfig, ModelabilityConfig, check_disjoint, score_latents
    from vaepack.train.common import load_images, training_images
    from vaepack.train.teachers import load_tae_teacher

    mirror = Path(os.environ.get("VAEPACK_MIRROR", "../shared/weights"))
    t_enc = load_tae_teacher(a.taef2_encoder or str(mirror / "taef2_encoder.pth"), "encoder")
    t_dec = (load_tae_teacher(a.taef2_decoder or str(mirror / "taef2_decoder.pth"), "decoder")
             if a.taef2_decoder_recon else None)
    dec = load_safetensors_model(a.decoder)
    check_disjoint(training_images(a.data), training_images(a.heldout))
    held_imgs = load_images(a.heldout)
    train_imgs = None if a.no_modelability else load_images(a.data)
    ref_taef2 = encode_all(t_enc, held_imgs, 1.0)
    g = torch.Generator().manual_seed(a.seed)
    ref_gauss = [torch.randn(z.shape, generator=g) for z in ref_taef2]
    cfg = ModelabilityConfig(models=["-"], data=a.data, heldout=a.heldout,
                             train=FlowTrainConfig(steps=a.steps, seed=a.seed), threads=a.threads)
    start = time.perf_counter()
    rows = []
    for spec in a.encoder:
        name, _, path = spec.rpartition("=")
        name = name or Path(path).stem
        enc = load_safetensors_model(path)
        t0 = time.perf_counter()
        row = {"row": name, "weights": path, "recon": reconstruction(enc, dec, held_imgs, a.scale)}
        if a.taef2_decoder_recon:
            row["recon_taef2_decoder"] = reconstruction(enc, t_dec, held_imgs, a.scale)
        he = encode_all(enc, held_imgs, a.scale)
        row["vs_taef2"] = distribution(he, ref_taef2, a.seed)
        row["vs_gaussian"] = distribution(he, ref_gauss, a.seed)
        if train_imgs is not None:
            tr = encode_all(enc, train_imgs, a.scale)
            row["modelability"] = score_latents(name, tr, he, cfg, progress=lambda m: print(m, file=sys.stderr))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        m = row.get("modelability", {})
        print(f"{name}: {row['recon']['psnr']:.3f} dB / {row['recon']['ssim']:.4f} (TAEF2 dec "
              f"{row.get('recon_taef2_decoder', {}).get('psnr', float('nan')):.3f}), std ratio vs taef2 {row['vs_taef2']['std_ratio_mean']:.3f}"
              f" SW {row['vs_taef2']['sliced_w2']:.4f}, vs N(0,I) {row['vs_gaussian']['std_ratio_mean']:.3f} SW "
              f"{row['vs_gaussian']['sliced_w2']:.4f}, held-out {m.get('heldout_loss', float('nan')):.4f} "
              f"FD tokens {m.get('fd_tokens', float('nan')):.3f}", file=sys.stderr)
    res = {"machine": machine_info(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "scale": a.scale, "steps": a.steps, "seed": a.seed, "rows": rows,
           "elapsed_s": time.perf_counter() - start, "command": " ".join(sys.argv)}
    if a.json:
        tmp = a.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        tmp.replace(a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
