#!/usr/bin/env bash
# Train vaepack's embedded FLUX.2-space models by distilling TAEF2.
#
#   usage: benchmarks/train_defaults.sh pruned-encoder|pruned-decoder|export-pruned|joint-decoder|joint-decoder2|export-joint|calibrate-int8|calibrate-int8-decoder
#          (the default, vaepack-f2-p64)
#          benchmarks/train_defaults.sh encoder|decoder|export                        (the paper-000 student, vaepack-f2-s32)
#
# The default (generation 3, vaepack-f2-p64) is TAEF2 itself, depth-pruned and distilled back
# (vaepack.train.warmstart.tae_from_teacher): the encoder drops the full-resolution stage and one H/2 block and
# starts at H/2 with a space-to-depth conv initialized as the exact composition of TAEF2's two stem convs;
# the decoder keeps (3, 2, 1, 1) of TAEF2's (3, 3, 3, 1) blocks per stage. Both start from TAEF2's
# weights, so the distillation only has to recover what the dropped layers did (benchmarks/results/distill_defaults.md).
# The teacher cache (560 views: 2 random windows per image) is shared: the decoder run builds it with the
# decoded views, the encoder run reuses it (CACHE; the shipped runs used the one of the earlier `decoder` run,
# same key: data, views, seed). Run pruned-decoder first, or both at once (the encoder then builds its own).
#
# Below: the student (vaepack-f2-s32, generation 2 encoder, generation 1 decoder).
#
# The shipped encoder is the second generation: a warm-started continuation (--init) of the first
# generation, with 2 teacher-cached views per image and a lower LR. The shipped decoder is still the
# first generation: its continuation (`decoder` below) gave no gain in 1630 steps (23.96 vs 23.99 dB on
# the dev crops, benchmarks/results/distill_defaults.md) and was stopped; `export` skips it. Resumable: rerun the same command;
# state lives in $RUNS/<run>/ (checkpoint.pt, teacher_cache.pt, train.log). --resume is always passed:
# it continues an existing run and starts a new one in an empty or missing run dir. Budgets are
# wall-clock minutes over all sessions (--budget-minutes); EXTRA="--max-minutes N" stops one session early.
#

# Starting point. --init reads a copy of the first-generation file in $RUNS/init/, made from
# vaepack/weights/ on first use, so exporting (which replaces vaepack/weights/) never changes where a
# rerun starts. The copy is only made while vaepack/weights/ still holds the first generation (sha256).
#
# Lineage: the first generation (the files these runs start from, shipped with commit 01f09e5) came
# from these commands, translated from the retired `python -m vaepack.distill` to the Typer CLI:
#   # encoder, from scratch (norm batch, the default); the 105-minute budget ended at 6504 steps there
#   vaepack distill --teacher taef2 --data "$DATA" --out "$RUNS/enc-s32" --width 32 --config '{"stem_stride": 2}' \
#     --schedule 128:40000,256:6000 --batch 16 --budget-minutes 105 --threads 1 --ckpt-every 100 --resume
#   # decoder, warm start from TAEF2's strongest decoder channels; 3915 steps in its 85-minute budget
#   vaepack distill --part decoder --teacher taef2 --data "$DATA" --out "$RUNS/dec-w32" --width 32 --init-from-teacher \
#     --cache "$RUNS/enc-s32/teacher_cache.pt" --schedule 128:40000,256:6000 --batch 8 --pixel-weight 1.0 \
#     --budget-minutes 85 --threads 1 --ckpt-every 100 --resume
# They write $RUNS/enc-s32/vaepack-enc-s32.safetensors and $RUNS/dec-w32/vaepack-dec-w32.safetensors
# (or `vaepack distill-export RUN -o FILE` for an unfinished run). To rerun the whole lineage from
# scratch, put those as $RUNS/init/vaepack-f2-enc-s32.safetensors and $RUNS/init/vaepack-f2-dec-w32.safetensors
# before running this script. Wall-clock budgets make step counts depend on the machine's load.
set -euo pipefail
RUNS=${RUNS:-/work/runs}
DATA=${DATA:-/work/shared/data/train}
THREADS=${THREADS:-1}
OUT=${OUT:-$(dirname "$0")/../vaepack/weights}
export VAEPACK_MIRROR=${VAEPACK_MIRROR:-/work/shared/weights}  # the teacher (taef2) comes from the manifest
INIT="$RUNS/init"

# sha256 of the first-generation files (benchmarks/results/distill_defaults.md)
gen1_sha() {
  case "$1" in
    vaepack-f2-enc-s32.safetensors) echo 38e84290c83e8f98a54a83bffd7180a8ba74f3afb1b71cd25b5695bf056028cf ;;
    vaepack-f2-dec-w32.safetensors) echo 656bb65f01d4d5cc374a15a9f62d4154c7f6f9a18c38d593446099bcb271453b ;;
  esac
}

# init_copy NAME: print the path of the starting-point copy, making it from $OUT the first time.
init_copy() {
  local name=$1
  if [ ! -f "$INIT/$name" ]; then
    local sha
    sha=$(sha256sum "$OUT/$name" | cut -d' ' -f1)
    if [ "$sha" != "$(gen1_sha "$name")" ]; then
      echo "error: $OUT/$name is not the first-generation file (sha256 $sha); put that file at $INIT/$name" \
        "(git show 01f09e5:vaepack/weights/$name > $INIT/$name, or rerun the lineage in this script's header)" >&2
      exit 1
    fi
    mkdir -p "$INIT"
    cp "$OUT/$name" "$INIT/$name.tmp" && mv "$INIT/$name.tmp" "$INIT/$name"
  fi
  echo "$INIT/$name"
}

# export_runs RUN:DONE_NAME:OUT_NAME ...: a finished run has already written its export (with the training
# command in its metadata); an unfinished one is exported from its checkpoint (EMA weights, fp16).
export_runs() {
  local pair run done_name out_name
  for pair in "$@"; do
    IFS=: read -r run done_name out_name <<< "$pair"
    if [ -f "$RUNS/$run/$done_name.safetensors" ]; then
      cp "$RUNS/$run/$done_name.safetensors" "$OUT/$out_name.safetensors.tmp"
      mv "$OUT/$out_name.safetensors.tmp" "$OUT/$out_name.safetensors"
    else
      vaepack distill-export "$RUNS/$run" -o "$OUT/$out_name.safetensors" --teacher taef2 --data "$DATA" --force
    fi
    sha256sum "$OUT/$out_name.safetensors"; stat -c '%s bytes' "$OUT/$out_name.safetensors"
  done
}

# calibrate_part PART DEST [EXTRA...]: a post-training int8 calibration of the default's PART (64 training photos,
# one random 256 px crop each at --scale 1.5), made in a throwaway VAEPACK_HOME and copied to DEST.
calibrate_part() {
  local part=$1 dest=$2 tmp
  shift 2
  tmp=$(mktemp -d)
  VAEPACK_HOME="$tmp" vaepack export default --part "$part" --precision int8 --calibration "$DATA" \
    --calibration-images 64 --calibration-scale 1.5 "$@" -o "$tmp/art"
  cp "$tmp"/int8/vaepack-f2-p64-"$part"-*.json "$dest"
  sha256sum "$dest"
  rm -rf "$tmp"
}

CACHE=${CACHE:-$RUNS/dec-tae/teacher_cache.pt}
case "${1:-}" in
  pruned-encoder)
    vaepack distill --teacher taef2 --data "$DATA" --out "$RUNS/enc-tae" --family tae --width 64 \
      --config '{"blocks": [0, 2, 3, 3], "stem": "s2d"}' --views-per-image 2 --cache "$CACHE" \
      --schedule 128:40000,256:6000 --batch 16 --lr 3e-4 --budget-minutes "${ENC_BUDGET:-95}" --threads "$THREADS" \
      --ckpt-every 100 --resume ${EXTRA:-} ;;
  pruned-decoder)
    vaepack distill --part decoder --teacher taef2 --data "$DATA" --out "$RUNS/dec-tae" --width 64 \
      --config '{"blocks": [3, 2, 1, 1]}' --views-per-image 2 --cache "$CACHE" \
      --schedule 128:40000,256:6000 --batch 8 --pixel-weight 1.0 --lr 2e-4 --budget-minutes "${DEC_BUDGET:-90}" \
      --threads "$THREADS" --ckpt-every 100 --resume ${EXTRA:-} ;;
  export-pruned)   # the encoder ships as is; the generation-3 decoder is the start of joint-decoder
    export_runs "enc-tae:vaepack-enc-tae64:vaepack-f2-enc-p64"
    OUT="$RUNS" export_runs "dec-tae:vaepack-dec-w64:dec-tae-gen3" ;;
  joint-decoder)   # generation 3b: the decoder continued where half of each batch is the shipped encoder's latents
    # (--latent-encoder), so it learns what that encoder writes at --scale 1.5 (benchmarks/results/distill_defaults.md)
    vaepack distill --part decoder --teacher taef2 --data "$DATA" --out "$RUNS/dec-joint" --width 64 \
      --config '{"blocks": [3, 2, 1, 1]}' --init "$RUNS/dec-tae-gen3.safetensors" --views-per-image 2 --cache "$CACHE" \
      --schedule 128:1000 --batch 8 --pixel-weight 1.0 --lr 1e-4 --threads "$THREADS" --ckpt-every 100 \
      --latent-encoder "$OUT/vaepack-f2-enc-p64.safetensors" --latent-encoder-frac 0.5 --resume ${EXTRA:-} ;;
  joint-decoder2)  # generation 3c (shipped): from 3b (the finished joint-decoder run), 3/4 of each batch from the
    # encoder, a third of the lr (3b's own continuation at lr 1e-4, F 0.5 lost PSNR; distill_defaults.md)
    vaepack distill --part decoder --teacher taef2 --data "$DATA" --out "$RUNS/dec-joint2" --width 64 \
      --config '{"blocks": [3, 2, 1, 1]}' --init "$RUNS/dec-joint/vaepack-dec-w64.safetensors" --views-per-image 2 \
      --cache "$CACHE" --schedule 128:800 --batch 8 --pixel-weight 1.0 --lr 3e-5 --threads "$THREADS" --ckpt-every 100 \
      --latent-encoder "$OUT/vaepack-f2-enc-p64.safetensors" --latent-encoder-frac 0.75 --resume ${EXTRA:-} ;;
  export-joint)
    export_runs "dec-joint2:vaepack-dec-w64:vaepack-f2-dec-p64v3" ;;
  calibrate-int8)
    # Post-training int8 calibration of the default encoder (vaepack/quantize.py; 64 training photos, one random
    # 256 px crop each at --scale 1.5). Run after export-pruned: a calibration belongs to one set of weights.
    # Its activation ranges start the quantization-aware run that ships (benchmarks/qat.sh train with
    # CALIBRATION=runs/ptq/vaepack-f2-enc-p64.int8.json; its own dev round trip misses the auto policy:
    # benchmarks/results/int8.md).
    mkdir -p runs/ptq
    calibrate_part encoder runs/ptq/vaepack-f2-enc-p64.int8.json ;;
  calibrate-int8-decoder)
    # The decoder's int8 calibration that ships (vaepack/weights/vaepack-f2-p64-decoder.int8.json, auto: false):
    # post-training, 64 training crops at 1.5x through the default encoder, the 4 Convs whose int8 error is
    # largest kept float (--keep-float; benchmarks/results/int8.md). Run after export-joint.
    calibrate_part decoder "$OUT/vaepack-f2-p64-decoder.int8.json" --keep-float 4 ;;
  encoder)
    # Student encoder: paper-000 width 32, 2x2 space-to-depth stem (see benchmarks/results/distill_defaults.md);
    # the folded first generation is unfolded back to BatchNorm (statistics from training crops) and continued.
    init=$(init_copy vaepack-f2-enc-s32.safetensors)
    vaepack distill --teacher taef2 --data "$DATA" --out "$RUNS/enc3" --width 32 --config '{"stem_stride": 2}' \
      --init "$init" --views-per-image 2 --schedule 128:40000,256:6000 --batch 16 --lr 3e-4 \
      --budget-minutes "${ENC_BUDGET:-95}" --threads "$THREADS" --ckpt-every 100 --resume ${EXTRA:-} ;;
  decoder)
    # Small TAE decoder (width 32) continued from the first generation, reusing the encoder run's teacher cache.
    # Not shipped (no gain measured at this budget); kept so the experiment can be rerun or run longer.
    init=$(init_copy vaepack-f2-dec-w32.safetensors)
    vaepack distill --part decoder --teacher taef2 --data "$DATA" --out "$RUNS/dec3" --width 32 \
      --init "$init" --views-per-image 2 --cache "$RUNS/enc3/teacher_cache.pt" --schedule 128:40000,256:6000 \
      --batch 8 --pixel-weight 1.0 --lr 3e-4 --budget-minutes "${DEC_BUDGET:-60}" --threads "$THREADS" \
      --ckpt-every 100 --resume ${EXTRA:-} ;;
  export)
    # A finished run has already written its export (with the training command in its metadata);
    # an unfinished one is exported from its checkpoint (EMA weights, BatchNorm folded, fp16).
    init_copy vaepack-f2-enc-s32.safetensors >/dev/null  # keep the starting points before replacing them
    init_copy vaepack-f2-dec-w32.safetensors >/dev/null
    # Only the encoder: add "dec3:vaepack-dec-w32:vaepack-f2-dec-w32" once a decoder run beats the shipped one.
    export_runs "enc3:vaepack-enc-s32:vaepack-f2-enc-s32" ;;
  *) echo "usage: $0 pruned-encoder|pruned-decoder|export-pruned|joint-decoder|joint-decoder2|export-joint|calibrate-int8|calibrate-int8-decoder|encoder|decoder|export" >&2; exit 2 ;;
esac
