#!/usr/bin/env bash
# int8 quantization-aware fine-tuning of the default encoder (issue 17 part 3; vaepack/train/qat.py) and its
# check against the auto precision policy (benchmarks/results/int8.md).
#
#   usage: benchmarks/qat.sh train|measure
#
# train:   two runs at once, one per core (1 thread each, pinned): loss mse (relative latent MSE) and loss
#          image (the fp32 decoder's pixels of the int8 latents vs of the fp32 latents); 128 px crops at --scale 1.5
#          (192 px seen by the encoder), batch 4, 200 steps, Adam 1e-5, cosine. Run mse ships (int8.md).
# measure: dev round trips (18 photos, --scale 1.5) with the encoder int8 (the shipped calibration, and each
#          run's) and the decoder at auto's float precision, against torch fp32; then the policy table.
set -euo pipefail
DATA=${DATA:-../shared/data/train}
DEV=${DEV:-../shared/data/dev}
RUNS=${RUNS:-runs/qat}
STEPS=${STEPS:-200}
BATCH=${BATCH:-4}
export VAEPACK_MIRROR=${VAEPACK_MIRROR:-$(cd .. && pwd)/shared/weights}
# CALIBRATION: the activation ranges (default: the part's shipped calibration, whose ranges are those of
# `benchmarks/train_defaults.sh calibrate-int8`)
COMMON=(--model default --part encoder --data "$DATA" --steps "$STEPS" --batch "$BATCH" --crop 128 --scale 1.5 --lr 1e-5
        --threads 1 --resume ${CALIBRATION:+--calibration "$CALIBRATION"})
mkdir -p "$RUNS"
case "${1:-}" in
  train)
    taskset -c 0 vaepack train-qat "${COMMON[@]}" --loss mse --out "$RUNS/mse" &
    taskset -c 1 vaepack train-qat "${COMMON[@]}" --loss image --out "$RUNS/image" &
    wait ;;
  measure)
    out=$RUNS/measure
    mkdir -p "$out"
    vaepack roundtrip "$DEV" --model default --scale 1.5 --backend torch --dtype fp32 --json > "$out/fp32.json"
    home=$(mktemp -d)
    VAEPACK_HOME=$home vaepack roundtrip "$DEV" --model default --scale 1.5 --dtype int8 --json > "$out/shipped.json"
    rm -rf "$home"
    args=()
    for run in "$RUNS"/mse "$RUNS"/image; do
      cal=$(ls "$run"/*-encoder.qat.int8.json 2>/dev/null | head -1)
      [ -n "$cal" ] || continue
      home=$(mktemp -d)
      VAEPACK_HOME=$home vaepack export default --part encoder --precision int8 --calibration "$cal" \
        -o "$home/artifacts" >/dev/null
      VAEPACK_HOME=$home vaepack roundtrip "$DEV" --model default --scale 1.5 --dtype int8 --json > "$out/$(basename "$run").json"
      rm -rf "$home"
      args+=("qat-$(basename "$run")=$out/$(basename "$run").json")
    done
    python benchmarks/qat_policy.py "$out/fp32.json" "shipped calibration=$out/shipped.json" "${args[@]}" ;;
  *) echo "usage: $0 train|measure" >&2; exit 2 ;;
esac
