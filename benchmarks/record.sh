#!/usr/bin/env bash
# Record the benchmark suites on this machine into benchmarks/results/<machine>/ (JSON + Markdown).
# Run on an otherwise idle machine (latency); THREADS=N pins torch threads (default: torch's choice).
#   usage: MACHINE=amd-epyc-zen4-2c benchmarks/record.sh [step ...]   (default: all steps)
set -euo pipefail
cd "$(dirname "$0")/.."
export VAEPACK_MIRROR=${VAEPACK_MIRROR:-/work/shared/weights}
DEV=${DEV:-/work/shared/data/dev}
D=$(date -u +%Y%m%d)
OUT=benchmarks/results/${MACHINE:-$(hostname)}
mkdir -p "$OUT"
steps=${*:-table5 remap rd eps-nfe backends-b8 sweep interp}
py() { python - "$@"; }
for s in $steps; do
  echo "== $s" >&2
  case $s in
    table5|remap|rd)
      # Quality on center 256 px crops of the dev set (whole images at 2x cost minutes per image here).
      py <<PY
import torch
from vaepack.bench.report import plot, to_markdown
from vaepack.bench.schema import save
from vaepack.bench.suites import run_suite
if "${THREADS:-}":
    torch.set_num_threads(int("${THREADS:-0}"))
r = run_suite("$s", crop=256, progress=lambda d, t, row: print(f"[{d}/{t}]", flush=True))
save(r, "$OUT/$s-$D.json"); open("$OUT/$s-$D.md", "w").write(to_markdown(r) + "\n")
plot(r, "$OUT/$s-$D.png")
PY
      ;;
    eps-nfe)
      # The eps decoder per NFE, then the deterministic decoders on the same TAEF2 latents.
      py <<PY
import torch
from vaepack.bench.report import to_markdown
from vaepack.bench.schema import save
from vaepack.bench.suites import run_suite
if "${THREADS:-}":
    torch.set_num_threads(int("${THREADS:-0}"))
rows, first = [], None
for dec, nfe in (("taef2-eps", [1, 2, 3, 5, 10]), ("taef2", None), ("default", None)):
    r = run_suite("eps-nfe", decoder=dec, nfe=nfe, progress=lambda d, t, row: print(f"[{d}/{t}] {dec}", flush=True))
    first = first or r
    rows += r["rows"]
first["rows"] = rows
first["config"]["decoder"] = "taef2-eps, taef2, default"
save(first, "$OUT/eps-nfe-$D.json"); open("$OUT/eps-nfe-$D.md", "w").write(to_markdown(first) + "\n")
PY
      ;;
    backends-b8)
      vaepack bench --models default,taef2 --parts encoder,decoder --backends torch,onnxruntime,openvino \
        --precision fp32,bf16 --sizes 256,512 --batch 8 --repeat 3 --warmup 1 \
        --json "$OUT/backends-b8-$D.json" --markdown > "$OUT/backends-b8-$D.md" ;;
    int8)
      # The default encoder int8 (the shipped calibration: auto's choice since the QAT weights) against torch fp32 eager
      # and OpenVINO bf16,
      # same session, batch 1 and 8; quality is benchmarks/results/int8.md (vaepack roundtrip on the dev set).
      vaepack bench --models default --parts encoder,decoder --backends torch,openvino --precision fp32,bf16,int8 \
        --sizes 256,512 --batch 1,8 --repeat 5 --warmup 2 \
        --json "$OUT/int8-$D.json" --markdown > "$OUT/int8-$D.md" ;;
    sweep)
      # Paper 000 Table I / Fig. 3 on center 256 px crops, both encoders through each decoder.
      for dec in taef2 default; do
        vaepack sweep "$DEV" --model default --teacher taef2 --decoder $dec --scales 0.5,1,1.5,2,3,4 --crop 256 \
          --dtype bf16 --json --plot "$OUT/sweep-dec-$dec-$D.png" > "$OUT/sweep-dec-$dec-$D.json"
      done ;;
    interp)
      python benchmarks/interp_ablation.py --pairs default:default,default:taef2,taef2:taef2 --scale 1.5 --crop 256 \
        --json "$OUT/interp-$D.json" > "$OUT/interp-$D.md" ;;
    *) echo "unknown step $s" >&2; exit 2 ;;
  esac
done
