"""Bridge (issue 14) measurements: how close converted latents come to the target encoder's own latent
of the original photo, and what each conversion costs.

For every dev photo x: reference T = E_t(x) (TAESana's encoder), source z = E_s(x) (TAEF2's encoder).
- pixel path: E_t(clamp(D_s(z)))          (decode, re-encode; what `vaepack convert --via pixel` does)
- bridge:     P(tap(z)[, z])              (each trained bridge file given; z too with latent_skip)
- a manifest bridge as `vaepack convert --via bridge` runs it (--manifest-bridge ID, on --backend auto:
  an rgb-tap bridge = the source decoder's runner + its projector's ONNX export on OpenVINO)
Latent agreement (vaepack.metrics.latent_agreement: relative MSE = MSE / variance of the targets,
cosine, per-channel mean/std gaps) on center crops (default 256 px, the issue's protocol) and on the
full photos (cropped to a multiple of 32 px, so no padding convention enters the comparison). Cost:
MACs (vaepack.flops) and latency at --size px, batch 1, same process: after all accuracy rows, --repeat
interleaved rounds (each round times every path once, vaepack.bench.run.time_call), median per path, so
a slow spell of the machine hits every path alike.

    python benchmarks/bridge.py --data ../shared/data/dev --bridge RUN/bridge.safetensors ... [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch


def load_bridge_file(path: Path):
    """A bridge projector from a training export (config in its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from vaepack.models import bridge as B

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    conf = json.loads(meta["config"])
    model = B.Bridge(B.BridgeConfig(**{k: v for k, v in conf.items() if k not in ("source", "target")}))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return model.eval(), conf, meta


class _NoSkip(torch.nn.Module):
    """A latent-skip projector without the skip, for the MAC counter (one input)."""

    def __init__(self, proj):
        super().__init__()
        self.layers = proj.layers

    def forward(self, f):
        return self.layers(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--bridge", type=Path, nargs="*", default=[], help="bridge.safetensors files (training exports)")
    ap.add_argument("--source", default="taef2")
    ap.add_argument("--target", default="taesana")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--size", type=int, default=512, help="latency image size (px)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-full", action="store_true", help="skip the full-photo rows")
    ap.add_argument("--pixel-auto", action="store_true", help="also the pixel path on --backend auto (OpenVINO)")
    ap.add_argument("--bridge-bf16", action="store_true", help="also each bridge under torch bf16 autocast")
    ap.add_argument("--manifest-bridge", nargs="*", default=[], help="manifest bridge ids, run as `convert` runs "
                    "them on --backend auto")
    ap.add_argument("--per-photo", action="store_true", help="also each crop's error (MSE / the pooled target "
                    "variance: the crop rel MSE is their mean) and a per-photo table vs the pixel path")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    from vaepack.bench.run import TimedCall, time_call
    from vaepack.flops import count_macs, param_count
    from vaepack.io import list_images, load_image
    from vaepack.metrics import latent_agreement
    from vaepack.models import bridge as B
    from vaepack.train.bridge import attention_fidelity, frozen_parts

    dev = torch.device("cpu")
    senc, sdec, roles, tenc, shas, _, _ = frozen_parts(a.source, a.target, dev)
    photos = list_images(a.data, recursive=True, require=True)

    sets = {"crop": [], "full": []}
    crop_names = []
    for p in photos:
        x = load_image(p)
        h, w = x.shape[-2:]
        c = a.crop
        if min(h, w) >= c:
            y0, x0 = (h - c) // 2, (w - c) // 2
            sets["crop"].append(x[:, y0:y0 + c, x0:x0 + c][None])
            crop_names.append(p.stem)
        if not a.no_full:
            sets["full"].append(x[:, : h // 32 * 32, : w // 32 * 32][None])
    paths = {"pixel": (lambda z: tenc(sdec(z).clamp(0, 1)), None, {"runtime": "torch fp32"})}
    if a.pixel_auto:
        # The pixel path as `vaepack convert --via pixel` runs it by default (--backend auto).
        from vaepack.runtime import load_vae

        vdec = load_vae(a.source, parts=("decoder",), dtype=None, backend="auto")
        venc = load_vae(a.target, parts=("encoder",), dtype=None, backend="auto")
        rt = f"{vdec.runtime('decoder')['backend']} {vdec.runtime('decoder')['dtype']} + " \
             f"{venc.runtime('encoder')['backend']} {venc.runtime('encoder')['dtype']}"
        paths["pixel-auto"] = (lambda z: venc.encode(vdec.decode(z)), None, {"runtime": rt})
    for f in a.bridge:
        proj, conf, meta = load_bridge_file(f)
        tap = B.Tap(sdec, roles, conf["tap"]).eval()
        info = {"file": str(f), "tap": conf["tap"], "steps": meta.get("steps"), "command": meta.get("command")}
        skip = bool(conf.get("latent_skip"))
        paths[f.parent.name or f.stem] = ((lambda z, tap=tap, proj=proj, skip=skip: proj(tap(z), z if skip else None)),
                                          (tap, proj), {**info, "runtime": "torch fp32"})
        if a.bridge_bf16:
            def run16(z, tap=tap, proj=proj, skip=skip):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return proj(tap(z), z if skip else None).float()
            paths[(f.parent.name or f.stem) + "-bf16"] = (run16, (tap, proj), {**info, "runtime": "torch bf16"})
    for bid in a.manifest_bridge:
        from vaepack.convert import Converter
        from vaepack.manifest import load_manifest

        br = Converter(a.target, via="bridge", bridge=bid, backend="auto")._bridge_run(load_manifest().get_bridge(bid))
        info = {"bridge": bid, "sha256": br.lb.sha256, "runtime": f"{br.backend} {br.dtype}"}
        paths[f"{bid}-auto"] = (br, (br.lb.tap, br.lb.projector), info)

    rows = []
    with torch.no_grad():
        refs = {k: [(senc(x), tenc(x)) for x in xs] for k, xs in sets.items()}
        s = a.size
        zlat = senc(torch.rand(1, 3, s, s))
        for name, (fn, parts, info) in paths.items():
            row = {"path": name, **info}
            for k, pairs in refs.items():
                if pairs:
                    preds = [fn(z) for z, _ in pairs]
                    row[k] = latent_agreement(preds, [t for _, t in pairs])
                    # the attention-fidelity objective's own measure (token-affinity KL, tau 0.1)
                    row[k]["attn_kl"] = sum(attention_fidelity(p, t).item() for p, (_, t) in zip(preds, pairs)) / len(pairs)
                    if a.per_photo and k == "crop":
                        var = torch.cat([t.double().flatten() for _, t in pairs]).var().item()
                        row[k]["per_photo"] = {n: ((p.double() - t.double()) ** 2).mean().item() / var
                                               for n, p, (_, t) in zip(crop_names, preds, pairs)}
            zshape = (1, zlat.shape[1], s // 8, s // 8)
            if parts is None:
                macs = count_macs(sdec, zshape) + count_macs(tenc, (1, 3, s, s))
                params = param_count(tenc)
            else:
                tap, proj = parts
                params = param_count(proj)
                fshape = tuple(tap(torch.zeros(zshape)).shape)
                # count_macs feeds one input: the latent skips are counted on their own
                skip = sum(count_macs(proj.skip[k], (1, proj.cfg.latent_skip, s // 8 // 2 ** k, s // 8 // 2 ** k))
                           for k in range(proj.cfg.skip_stages)) if proj.cfg.latent_skip else 0
                if skip:
                    proj = _NoSkip(proj)
                macs = (count_macs(tap, zshape) if len(tap.layers) else 0) + count_macs(proj, fshape) + skip
            row.update({"gmacs": macs / 1e9, "trainable_params": params})
            time_call(TimedCall(fn), zlat, 1, 0, dev)  # warm-up (compiles a graph runtime)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        times: dict[str, list[float]] = {r["path"]: [] for r in rows}
        for _ in range(a.repeat):
            for r in rows:
                times[r["path"]] += time_call(TimedCall(paths[r["path"]][0]), zlat, 0, 1, dev).times
        for r in rows:
            r["latency_ms"] = 1000 * statistics.median(times[r["path"]])
            r["latency_runs_ms"] = [round(1000 * t, 1) for t in times[r["path"]]]
    base = rows[0]
    lines = [f"| path | runtime | crop rel MSE | crop cosine | crop attn KL | full rel MSE | full cosine | mean gap | std gap | GMAC @{a.size} | ms @{a.size} | vs pixel: error / MACs / ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, fu = r.get("crop", {}), r.get("full", {})
        g = fu or c
        lines.append(f"| {r['path']} | {r['runtime']} | {c.get('rel_mse', float('nan')):.4f} | {c.get('cosine', float('nan')):.4f} | {c.get('attn_kl', float('nan')):.4f} | "
                     f"{fu.get('rel_mse', float('nan')):.4f} | {fu.get('cosine', float('nan')):.4f} | "
                     f"{g.get('mean_gap', float('nan')):.4f} | {g.get('std_gap', float('nan')):.4f} | {r['gmacs']:.2f} | "
                     f"{r['latency_ms']:.1f} | {c.get('rel_mse', 0) / base['crop']['rel_mse']:.2f}x / "
                     f"{r['gmacs'] / base['gmacs']:.3f}x / {r['latency_ms'] / base['latency_ms']:.3f}x |")
    print("\n".join(lines))
    if a.per_photo and crop_names:
        print(f"\n| crop | {' | '.join(r['path'] for r in rows)} | {' | '.join(r['path'] + ' / pixel' for r in rows[1:])} |")
        print("|---" * (2 * len(rows)) + "|")
        for n in crop_names:
            v = [r["crop"]["per_photo"][n] for r in rows]
            print(f"| {n} | {' | '.join(f'{e:.4f}' for e in v)} | {' | '.join(f'{e / v[0]:.2f}x' for e in v[1:])} |")
    if a.json:
        from vaepack.bench.machine import machine_info

        a.json.write_text(json.dumps({"machine": machine_info(),
                                      "photos": len(photos), "crop": a.crop, "size": a.size, "shas": shas,
                                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
