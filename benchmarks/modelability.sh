#!/usr/bin/env bash
# Modelability of TAEF2, the default encoder and the s32 student (issue 15, section 1): the same small latent flow
# model trained for STEPS steps with seed 0 on each model's latents of the training photos, evaluated on the dev
# photos (vaepack.modelability). One CPU thread (a training job may share the machine).
# Writes benchmarks/results/modelability-<date>.json and benchmarks/results/modelability.md.
#   usage: STEPS=600 benchmarks/modelability.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export VAEPACK_MIRROR=${VAEPACK_MIRROR:-$(cd .. && pwd)/shared/weights}
DATA=${DATA:-../shared/data/train}
DEV=${DEV:-../shared/data/dev}
STEPS=${STEPS:-600}
MODELS=${MODELS:-taef2,default@1.5,vaepack-f2-s32@1.5}
D=$(date -u +%Y%m%d)
OUT=benchmarks/results
JSON=$OUT/modelability-$D.json
CMD="vaepack modelability --models $MODELS --data $DATA --heldout $DEV --steps $STEPS --seed 0 --threads 1 --json"
echo "$CMD" >&2
start=$(date +%s)
$CMD > "$JSON.tmp"
mv "$JSON.tmp" "$JSON"
echo "wall: $(( $(date +%s) - start )) s" >&2
python - "$JSON" "$CMD" "$(lscpu | sed -n 's/^Model name: *//p' | head -1)" <<'PY'
import json, os, sys

path, cmd, cpu = sys.argv[1:4]
r = json.load(open(path))
c = r["config"]
lines = [
    "# Modelability (issue 15, section 1)", "",
    f"Machine: `lscpu` \"{cpu}\", {r['threads']} torch thread(s), torch {r['torch']}; whole run "
    f"{r['elapsed_s'] / 60:.1f} min. Data: {r['data']['images']} training photos ({r['data']['dir']}), "
    f"{r['heldout']['images']} held-out ({r['heldout']['dir']}). JSON: `{path.split('/')[-1]}`.", "",
    "```sh", f"export VAEPACK_MIRROR={os.environ.get('VAEPACK_MIRROR', '')}", cmd, "```", "",
    f"Flow model: `LatentFlow` width {c['train']['width']}, {c['train']['blocks']} blocks "
    f"({r['models'][0]['flow_params']:,} parameters at 32 channels), {c['train']['steps']} AdamW steps, batch "
    f"{c['train']['batch']} random {c['train']['crop']}x{c['train']['crop']} crops of per-channel-normalized latents, "
    f"lr {c['train']['lr']:g} (warm-up {c['train']['warmup']}, cosine to 10%), t ~ U(0, 1), velocity target "
    "(x_t = (1-t) x0 + t eps). Encoders: "
    + ", ".join(sorted({f"{m['encoder']['backend']} {m['encoder']['dtype']}" for m in r["models"]})) + ".",
    "Held-out loss: MSE per latent element on every 16x16 grid crop of the dev latents, "
    f"{c['t_per_crop']} seeded (t, eps) per crop stratified over the 4 t buckets (t = 1 is noise). An untrained "
    "model (v = 0) scores about 2 (1 + E x0^2). FD: Frechet distance of Gaussian fits, "
    f"{c['samples']} generated crops ({c['sample_steps']} Euler steps, {c['sample_schedule']} grid) vs the held-out "
    "crops, on C-dim tokens and 4C-dim 2x2 patches; floor = as many random training crops vs the held-out crops.", "",
    "| model | latent (C x h x w of the 1st dev photo) | px / latent px | held-out crops | train loss (last 10%) "
    "| held-out loss | t [0,.25) | [.25,.5) | [.5,.75) | [.75,1] | FD tokens | floor | FD 2x2 | floor | min |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for m in r["models"]:
    s = m["example"]["latent_shape"]
    b = m["heldout_loss_buckets"]
    lines.append(
        f"| {m['spec']} | {s[0]}x{s[1]}x{s[2]} | {m['pixels_per_latent']:.2f} | {m['heldout_crops']} | "
        f"{m['train_loss_last']:.4f} | **{m['heldout_loss']:.4f}** | {b[0]:.4f} | {b[1]:.4f} | {b[2]:.4f} | {b[3]:.4f} | "
        f"{m['fd_tokens']:.3f} | {m['fd_tokens_floor']:.3f} | {m['fd_patches']:.2f} | {m['fd_patches_floor']:.2f} | "
        f"{sum(m['seconds'].values()) / 60:.1f} |")
open("benchmarks/results/modelability.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
