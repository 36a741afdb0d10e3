"""``run_rd``: rate-distortion of stored latents next to JPEG and WebP, on the same images.

Quality is PSNR/SSIM/MS-SSIM per image, averaged (``inputs.mean_metrics``); the formats and the
bit count are in ``run_rd``'s docstring.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from vaepack.bench.inputs import ModelCache, Progress, as_list, load_images, mean_metrics
from vaepack.bench.machine import machine_info, package_version
from vaepack.bench.run import check_args
from vaepack.bench.schema import new_result
from vaepack.errors import BackendUnavailableError, UsageError

JPEG_QUALITIES = (10, 20, 30, 50, 70, 90)
WEBP_QUALITIES = (10, 20, 30, 50, 70, 90)
LATENT_FORMATS = ("fp16", "bf16", "q8", "fp16+zlib", "q8+zlib", "q8+zstd")


def _q8(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel affine 8-bit quantization; returns (dequantized float, uint8 codes).

    The side info a file needs is an fp16 minimum and an fp16 step per channel (32 bits per
    channel); min/step are rounded through fp16 here so the dequantized values are the stored ones.
    """
    zc = z.float()
    lo = zc.amin(dim=(-2, -1), keepdim=True).half().float()
    hi = zc.amax(dim=(-2, -1), keepdim=True)
    step = ((hi - lo) / 255).clamp_min(1e-8).half().float()
    q = ((zc - lo) / step).round().clamp(0, 255)
    return q * step + lo, q.to(torch.uint8)


def _compress(data: bytes, method: str) -> bytes:
    if method == "zlib":
        return zlib.compress(data, 9)
    import zstandard  # optional; checked before use

    return zstandard.ZstdCompressor(level=19).compress(data)


def _latent_variant(z: torch.Tensor, fmt: str) -> tuple[torch.Tensor, int]:
    """(dequantized latent, stored bits) for one latent format."""
    base, _, packer = fmt.partition("+")
    c = z.shape[1]
    if base == "fp16":
        zq = z.half()
        payload = zq.numpy().tobytes()
        out = zq.float()
        side = 0
    elif base == "bf16":
        zq = z.bfloat16()
        payload = zq.view(torch.int16).numpy().tobytes()
        out = zq.float()
        side = 0
    elif base == "q8":
        out, q = _q8(z)
        payload = q.numpy().tobytes()
        side = 32 * c
    else:
        raise UsageError(f"unknown latent format '{fmt}' (choose {', '.join(LATENT_FORMATS)})")
    nbytes = len(_compress(payload, packer)) if packer else len(payload)
    return out, nbytes * 8 + side


def _pil_codec(x: torch.Tensor, fmt: str, quality: int) -> tuple[torch.Tensor, int]:
    import io as _io

    from PIL import Image

    from vaepack.io import pil_to_tensor, tensor_to_pil

    buf = _io.BytesIO()
    tensor_to_pil(x).save(buf, format=fmt, quality=quality)
    nbits = len(buf.getvalue()) * 8
    buf.seek(0)
    return pil_to_tensor(Image.open(buf)), nbits


def run_rd(models, data_dir, scales=(1.0,), formats=None, jpeg_qualities=JPEG_QUALITIES,
           webp_qualities=WEBP_QUALITIES, decoder=None, precision: str = "fp32", device: str | None = None,
           max_images: int | None = None, crop: int | None = None, progress: Progress | None = None) -> dict:
    """Rate-distortion: bits per pixel of stored latents vs PSNR/SSIM/MS-SSIM, next to JPEG/WebP.

    ``models``: one id/``VAE`` or a list; each is encoded with its own encoder and decoded with
    ``decoder`` (default: itself). JPEG/WebP rows are measured once, on the same images.
    bpp = stored bits / (H*W of the original image), averaged over images. Latent formats: fp16,
    bf16, q8 (per-channel affine uint8 + fp16 min/step per channel), each optionally packed with
    zlib (level 9) or zstd (level 19, only if ``zstandard`` is installed). JPEG/WebP: Pillow at
    the given qualities (JPEG with Pillow's default 4:2:0 subsampling).
    """
    from vaepack import pipeline as P
    from vaepack.vae import pick_device

    if formats is None:
        formats = [f for f in LATENT_FORMATS if not f.endswith("zstd") or package_version("zstandard")]
    formats = as_list(formats)
    for f in formats:
        if f.partition("+")[0] not in ("fp16", "bf16", "q8") or f.partition("+")[2] not in ("", "zlib", "zstd"):
            raise UsageError(f"unknown latent format '{f}' (choose {', '.join(LATENT_FORMATS)})")
        if f.endswith("+zstd") and not package_version("zstandard"):
            raise BackendUnavailableError("latent format '+zstd' needs the zstandard package (pip install zstandard)")
    scales = as_list(scales)
    check_args(["encoder"], [precision], scales, [], [], 1, 0, [], ["torch"])
    dev = pick_device(device)
    reg = ModelCache(dev)
    mids = [reg.name(m) for m in as_list(models)]
    if not mids:
        raise UsageError("--models needs at least one model")
    dec_id = reg.name(decoder) if decoder is not None else None
    for mid in mids:  # refuse before any work rather than after the JPEG rows
        if not reg.has(mid, "encoder"):
            raise UsageError(f"model '{mid}' has no encoder; rate-distortion needs one")
        if not reg.has(dec_id or mid, "decoder"):
            raise UsageError(f"model '{dec_id or mid}' has no decoder", hint="pass --decoder")
    images = load_images(data_dir, max_images, crop)
    result = new_result("rd", machine_info(dev), {
        "models": mids, "decoder": dec_id, "precision": precision, "scales": [float(s) for s in scales],
        "formats": formats, "jpeg_qualities": list(jpeg_qualities), "webp_qualities": list(webp_qualities),
        "data_dir": str(data_dir), "max_images": max_images, "crop": crop})
    jobs = [("latent", f, None, s, mid) for mid in mids for s in scales for f in formats]
    jobs += [("jpeg", f"q{q}", q, None, None) for q in jpeg_qualities]
    jobs += [("webp", f"q{q}", q, None, None) for q in webp_qualities]
    try:
        # Encode once per (model, scale); every latent format re-decodes the same latents.
        recs: dict[tuple, list] = {}
        for i, (codec, variant, q, s, mid) in enumerate(jobs):
            pairs, bpps = [], []
            did = dec_id or mid
            with torch.inference_mode():
                if codec == "latent" and (mid, s) not in recs:
                    enc = reg.get(mid, "encoder", precision)
                    recs[(mid, s)] = [P.encode_tensor(enc, im, scale=float(s)) for _, im in images]
                for k, (_, x) in enumerate(images):
                    npx = x.shape[-2] * x.shape[-1]
                    if codec == "latent":
                        rec = recs[(mid, s)][k]
                        zq, bits = _latent_variant(rec.latent, variant)
                        dec = reg.get(did, "decoder", precision)
                        y = P.decode_record(dec, dataclasses.replace(rec, latent=zq))
                    else:
                        y, bits = _pil_codec(x, "JPEG" if codec == "jpeg" else "WEBP", q)
                    pairs.append((x, y.cpu()))
                    bpps.append(bits / npx)
            m = mean_metrics(pairs)
            row = {"codec": codec, "variant": variant, "quality_setting": q,
                   "model": mid if codec == "latent" else None, "decoder": did if codec == "latent" else None,
                   "scale": float(s) if s is not None else None, "bpp": sum(bpps) / len(bpps),
                   "psnr": m["psnr"], "ssim": m["ssim"], "ms_ssim": m["ms_ssim"], "haarpsi": m["haarpsi"],
                   "gmsd": m["gmsd"], "images": m["images"]}
            result["rows"].append(row)
            if progress:
                progress(i + 1, len(jobs), row)
    except KeyboardInterrupt:
        result["interrupted"] = True
    return result
