#!/usr/bin/env bash
# Train vaepack's embedded default models (FLUX.2 latent space) by distilling TAEF2.
# Resumable: rerun the same command; state lives in $RUNS/<run>/ (checkpoint.pt, teacher_cache.pt,
# train.log). Budgets are wall-clock minutes over all sessions (--budget-minutes); --max-minutes
# stops one session early. Set THREADS to the cores you can spare.
#   usage: benchmarks/train_defaults.sh encoder|decoder|export
set -euo pipefail
RUNS=${RUNS:-/work/runs}
DATA=${DATA:-/work/shared/data/train}
THREADS=${THREADS:-2}
OUT=${OUT:-$(dirname "$0")/../vaepack/weights}
PY=${PY:-python3}
case "${1:-}" in
  encoder)
    # Student encoder: paper-000 width 32, 2x2 space-to-depth stem (see benchmarks/results/distill_defaults.md).
    $PY -m vaepack.distill encoder --data "$DATA" --run-dir "$RUNS/enc-s32" \
      --width 32 --config '{"stem_stride": 2}' --schedule 128:40000,256:6000 --batch 16 \
      --budget-minutes ${ENC_BUDGET:-105} --threads "$THREADS" --ckpt-every 100 ${EXTRA:-} ;;
  decoder)
    # Small TAE decoder (width 32), initialized from TAEF2's decoder channels, reusing the encoder's teacher cache.
    $PY -m vaepack.distill decoder --data "$DATA" --run-dir "$RUNS/dec-w32" --cache "$RUNS/enc-s32/teacher_cache.pt" \
      --width 32 --init-from-teacher --schedule 128:40000,256:6000 --batch 8 --pixel-weight 1.0 \
      --budget-minutes ${DEC_BUDGET:-90} --threads "$THREADS" --ckpt-every 100 ${EXTRA:-} ;;
  export)
    # A finished run has already written its export (with the training command in its metadata);
    # an unfinished one is exported from its checkpoint (EMA weights, BatchNorm folded, fp16).
    for pair in "enc-s32:vaepack-enc-s32:vaepack-f2-enc-s32" "dec-w32:vaepack-dec-w32:vaepack-f2-dec-w32"; do
      IFS=: read -r run done_name out_name <<< "$pair"
      if [ -f "$RUNS/$run/$done_name.safetensors" ]; then
        cp "$RUNS/$run/$done_name.safetensors" "$OUT/$out_name.safetensors"
      else
        $PY -m vaepack.distill export --run-dir "$RUNS/$run" --data "$DATA" --out "$OUT/$out_name.safetensors"
      fi
      sha256sum "$OUT/$out_name.safetensors"; stat -c '%s bytes' "$OUT/$out_name.safetensors"
    done ;;
  *) echo "usage: $0 encoder|decoder|export" >&2; exit 2 ;;
esac
