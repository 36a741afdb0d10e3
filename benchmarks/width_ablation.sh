#!/usr/bin/env bash
# Width ablation of the student encoder (paper 000, Table II analogue) on an equal, short wall-clock
# budget per model, reusing the first-generation default encoder run's teacher cache (1 view per image;
# see benchmarks/train_defaults.sh). Rerun to resume (--resume also starts a missing run).
#   usage: benchmarks/width_ablation.sh
set -euo pipefail
RUNS=${RUNS:-/work/runs}
DATA=${DATA:-/work/shared/data/train}
BUDGET=${BUDGET:-7}
export VAEPACK_MIRROR=${VAEPACK_MIRROR:-/work/shared/weights}  # the teacher (taef2) comes from the manifest
for spec in "s2-w16:16:{\"stem_stride\": 2}" "s2-w32:32:{\"stem_stride\": 2}" "s2-w64:64:{\"stem_stride\": 2}" "s1-w32:32:{}"; do
  name=${spec%%:*}; rest=${spec#*:}; width=${rest%%:*}; cfg=${rest#*:}
  vaepack distill --teacher taef2 --data "$DATA" --out "$RUNS/ablation/$name" --cache "$RUNS/enc-s32/teacher_cache.pt" \
    --width "$width" --config "$cfg" --schedule 128:40000,256:6000 --batch 16 --budget-minutes "$BUDGET" \
    --threads 1 --ckpt-every 100 --resume
  vaepack distill-export "$RUNS/ablation/$name" -o "$RUNS/ablation/$name.safetensors" --teacher taef2 --data "$DATA" --force
done
