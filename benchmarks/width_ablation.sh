#!/usr/bin/env bash
# Width ablation of the student encoder (paper 000, Table II analogue) on an equal, short wall-clock
# budget per model, reusing the default encoder run's teacher cache. usage: benchmarks/width_ablation.sh
set -euo pipefail
RUNS=${RUNS:-/work/runs}
DATA=${DATA:-/work/shared/data/train}
BUDGET=${BUDGET:-7}
PY=${PY:-python3}
for spec in "s2-w16:16:{\"stem_stride\": 2}" "s2-w32:32:{\"stem_stride\": 2}" "s2-w64:64:{\"stem_stride\": 2}" "s1-w32:32:{}"; do
  name=${spec%%:*}; rest=${spec#*:}; width=${rest%%:*}; cfg=${rest#*:}
  $PY -m vaepack.distill encoder --data "$DATA" --run-dir "$RUNS/ablation/$name" --cache "$RUNS/enc-s32/teacher_cache.pt" \
    --width "$width" --config "$cfg" --schedule 128:40000,256:6000 --batch 16 --budget-minutes "$BUDGET" \
    --threads 1 --ckpt-every 100
  $PY -m vaepack.distill export --run-dir "$RUNS/ablation/$name" --data "$DATA" --out "$RUNS/ablation/$name.safetensors"
done
