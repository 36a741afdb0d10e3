#!/usr/bin/env bash
# The FLUX.2 -> Sana bridges of issue 14 (paper 001) and the variants in benchmarks/results/bridge.md.
#
#   usage: benchmarks/train_bridge.sh shipped|skip|hidden|freeze|rot90|reg|variants|old|export
#
# `variants` (the first table of benchmarks/results/bridge.md) share one training-pair cache (PAIRS: 8 random 256 px crops of each training photo, mirrored
# at random, through TAEF2's and TAESana's encoders in fp32; built by the first run, ~14 min on 2 cores)
# and one tap-feature cache per tap beside it (PAIRS.tap-<tap>.pt). `skip` (the latent-skip table) shares
# PAIRS16: 16 crops per photo from the photo shrunk by a random factor in [0.5, 1], TAEF2's latents and
# decoded crops from OpenVINO bf16 (`--pairs-backend auto`, the runtime `convert` runs the bridge on),
# TAESana's targets in torch fp32 (~7 min on 2 cores); `shipped` has PAIRS32 (32 crops per photo, ~16 min).
# Runs resume with --resume. `shipped` made vaepack/weights/bridge-taef2-taesana-rgb-skip.safetensors
# (`export` copies it there).
set -euo pipefail
DATA=${DATA:-../shared/data/train}
RUNS=${RUNS:-runs/bridge}
PAIRS=${PAIRS:-$RUNS/pairs256.pt}
PAIRS16=${PAIRS16:-$RUNS/pairs16.pt}
PAIRS32=${PAIRS32:-$RUNS/pairs32.pt}
PAIRS32R=${PAIRS32R:-$RUNS/pairs32-rot90.pt}
JIT=(--tap rgb --min-scale 0.5 --pairs-backend auto)
COMMON=(--source taef2 --target taesana --data "$DATA" --cache "$PAIRS" --threads 1)
mkdir -p "$RUNS"
case "${1:-}" in
  shipped)   # the rgb tap + the latent at 1/8: TAESana's encoder fine-tuned on TAEF2's decoded crops (starts as the pixel path)
    vaepack train-bridge --source taef2 --target taesana --data "$DATA" --cache "$PAIRS32" "${JIT[@]}" --crops-per-image 32 \
      --latent-skip 1 --steps 6000 --lr 1e-4 --threads 2 --out "$RUNS/rgb32-s1" --resume ;;
  skip)      # 16 crops per photo: no skip / skip at 1/8 (3000, 8000 steps) / at 1/8, 1/16, 1/32 / only the skip learns
    S=(--source taef2 --target taesana --data "$DATA" --cache "$PAIRS16" "${JIT[@]}" --crops-per-image 16 --lr 1e-4 --threads 1 --resume)
    vaepack train-bridge "${S[@]}" --steps 3000 --out "$RUNS/rgb16"
    vaepack train-bridge "${S[@]}" --steps 3000 --latent-skip 1 --out "$RUNS/rgb16-s1-3k"
    vaepack train-bridge "${S[@]}" --steps 8000 --latent-skip 1 --out "$RUNS/rgb16-s1-8k"
    vaepack train-bridge "${S[@]}" --steps 8000 --latent-skip 3 --out "$RUNS/rgb16-s3-8k"   # measured stopped (Ctrl-C) at 5212
    vaepack train-bridge "${S[@]}" --steps 3000 --latent-skip 3 --train skip --lr 1e-3 --out "$RUNS/rgb16-s3-skiponly" ;;
  hidden)    # the latent read through conv 3x3 + ReLU before the skip's 1x1 conv (PAIRS32, 3000 steps, one core)
    vaepack train-bridge --source taef2 --target taesana --data "$DATA" --cache "$PAIRS32" "${JIT[@]}" --crops-per-image 32 \
      --latent-skip 1 --skip-hidden 64 --steps 3000 --lr 1e-4 --threads 1 --out "$RUNS/rgb32-s1h64-3k" --resume ;;
  freeze)    # the projector's stem and stage 0 (layers 0-4) kept at TAESana's weights (PAIRS32, 3000 steps, one core)
    vaepack train-bridge --source taef2 --target taesana --data "$DATA" --cache "$PAIRS32" "${JIT[@]}" --crops-per-image 32 \
      --latent-skip 1 --freeze 5 --steps 3000 --lr 1e-4 --threads 1 --out "$RUNS/rgb32-s1-f5-3k" --resume ;;
  rot90)     # PAIRS32's recipe with every crop also turned by a random multiple of 90 degrees (PAIRS32R), 3000 steps
    vaepack train-bridge --source taef2 --target taesana --data "$DATA" --cache "$PAIRS32R" "${JIT[@]}" --crops-per-image 32 \
      --rot90 --latent-skip 1 --steps 3000 --lr 1e-4 --threads 1 --out "$RUNS/rgb32r-s1-3k" --resume ;;
  reg)       # rot90's recipe against memorizing the crops: MSE only (no L1), and L2-SP toward TAESana's weights
    R=(--source taef2 --target taesana --data "$DATA" --cache "$PAIRS32R" "${JIT[@]}" --crops-per-image 32 --rot90
       --latent-skip 1 --steps 3000 --lr 1e-4 --threads 1 --resume)
    vaepack train-bridge "${R[@]}" --w-l1 0 --out "$RUNS/rgb32r-mse"
    vaepack train-bridge "${R[@]}" --l2sp 1e-3 --out "$RUNS/rgb32r-l2sp1e-3"
    vaepack train-bridge "${R[@]}" --l2sp 3e-4 --out "$RUNS/rgb32r-l2sp3e-4" ;;
  old)       # the bridge shipped before (8 crops per photo at scale 1, no latent skip)
    vaepack train-bridge "${COMMON[@]}" --out "$RUNS/rgb" --tap rgb --steps 1500 --lr 1e-4 --resume ;;
  variants)  # the comparison of taps and loss terms (each from TAESana's layers; the adapter is new)
    vaepack train-bridge "${COMMON[@]}" --out "$RUNS/s0-a2f0" --tap s0 --adapter-blocks 2 --steps 3000 --resume
    vaepack train-bridge "${COMMON[@]}" --out "$RUNS/s0-a2f0-att" --tap s0 --adapter-blocks 2 --w-attn 1 --steps 3000 --resume
    vaepack train-bridge "${COMMON[@]}" --out "$RUNS/s0-a2f1" --tap s0 --adapter-blocks 2 --w-feat 1 --steps 3000 --resume
    vaepack train-bridge "${COMMON[@]}" --out "$RUNS/s1-a2f1" --tap s1 --adapter-blocks 2 --w-feat 1 --steps 3000 --resume
    vaepack train-bridge "${COMMON[@]}" --out "$RUNS/s2-a1f1" --tap s2 --adapter-blocks 1 --w-feat 1 --steps 3000 --resume
    vaepack train-bridge "${COMMON[@]}" --out "$RUNS/prergb" --tap pre_rgb --w-feat 1 --steps 400 --batch 4 --resume
    vaepack train-bridge "${COMMON[@]}" --out "$RUNS/rgb2" --tap rgb --steps 3000 --lr 5e-5 --resume ;;
  export)
    cp "$RUNS/rgb32-s1/bridge.safetensors" vaepack/weights/bridge-taef2-taesana-rgb-skip.safetensors
    sha256sum vaepack/weights/bridge-taef2-taesana-rgb-skip.safetensors ;;
  *) echo "usage: $0 shipped|skip|hidden|freeze|rot90|reg|variants|old|export" >&2; exit 2 ;;
esac
