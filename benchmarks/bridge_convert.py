"""`vaepack convert` end to end on full photos (issue 14): latents written by `encode` (TAEF2 at 1x, the
default model at its --scale 1.5 remap) converted to the Sana space by the pixel path and by the
shipped bridge, compared with TAESana's own latent of the original photo.

Everything runs through the library (vaepack.pipeline.encode_tensor, vaepack.convert.Converter), so
padding, remap and the bridge's feature resampling are the product's. Only latent cells that lie
wholly inside the photo are compared (the padding conventions differ: reflect for an encode, the
source's padding / replicate for a bridge). Times are per photo, in this process, after one warm-up.

    python benchmarks/bridge_convert.py --data ../shared/data/dev [--sources taef2@1,default@1.5] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--sources", default="taef2@1,default@1.5")
    ap.add_argument("--to", default="taesana")
    ap.add_argument("--vias", default="pixel,bridge")
    ap.add_argument("--backend", default="torch", help="backend of both paths (auto: OpenVINO when installed; "
                    "an rgb-tap bridge runs there too)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    from vaepack.convert import Converter
    from vaepack.io import list_images, load_image
    from vaepack.metrics import latent_agreement
    from vaepack.pipeline import encode_tensor
    from vaepack.runtime import load_vae

    photos = list_images(a.data, recursive=True, require=True)
    images = [load_image(p) for p in photos]
    tgt = load_vae(a.to, parts=("encoder",), backend="torch")
    with torch.no_grad():
        refs = [encode_tensor(tgt, x).latent for x in images]
    rows = []
    for spec in a.sources.split(","):
        model, _, scale = spec.partition("@")
        scale = float(scale or 1)
        src = load_vae(model, parts=("encoder",), backend="torch")
        with torch.no_grad():
            recs = [encode_tensor(src, x, scale, model_id=model) for x in images]
        for via in a.vias.split(","):
            conv = Converter(a.to, via=via, backend=a.backend)
            with torch.no_grad():
                conv.convert(recs[0], str(photos[0]))  # load and warm up
                preds, times, used = [], [], set()
                for rec, p in zip(recs, photos):
                    t0 = time.perf_counter()
                    out = conv.convert(rec, str(p))
                    times.append(time.perf_counter() - t0)
                    preds.append(out.latent)
                    used.add(out.provenance.get("bridge") or out.provenance["via"])
                    runtime = f"{out.backend} {out.dtype}"
            cut = [(pr[..., : x.shape[-2] // 32, : x.shape[-1] // 32], r[..., : x.shape[-2] // 32, : x.shape[-1] // 32])
                   for pr, r, x in zip(preds, refs, images)]
            row = {"source": spec, "via": via, "used": sorted(used), "backend": runtime,
                   **latent_agreement([c[0] for c in cut], [c[1] for c in cut]),
                   "ms_per_photo": 1000 * sum(times) / len(times)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print("| source latent | via | runtime | rel MSE | cosine | mean gap | std gap | ms / photo |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['via']} ({', '.join(r['used'])}) | {r['backend']} | {r['rel_mse']:.4f} | "
              f"{r['cosine']:.4f} | {r['mean_gap']:.4f} | {r['std_gap']:.4f} | {r['ms_per_photo']:.0f} |")
    if a.json:
        from vaepack.bench.machine import machine_info

        a.json.write_text(json.dumps({"machine": machine_info(), "photos": len(photos), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
