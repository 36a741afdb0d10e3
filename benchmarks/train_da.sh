#!/usr/bin/env bash
# DA-VAE on TAEF2 (issue 13, paper 002) and its ablations (benchmarks/results/da.md).
#
#   usage: benchmarks/train_da.sh shipped|proj05|ablations|init|long|dm|dmctl|dmjoint|export|measure
#
# `shipped` made vaepack/weights/taef2-da-{enc,dec}.safetensors (`export` copies the run's EMA there; then
# update sizes and sha256 in weights_manifest.yaml). Runs resume with --resume (the budget counts per
# session; the cosine learning rate follows --steps).
set -euo pipefail
DATA=${DATA:-../shared/data/train}
DEV=${DEV:-../shared/data/dev}
RUNS=${RUNS:-runs/da}
export VAEPACK_MIRROR=${VAEPACK_MIRROR:-$(cd .. && pwd)/shared/weights}
COMMON=(--data "$DATA" --batch 8 --crop 256 --lr 2e-4 --new-lr-mult 5 --resume)
mkdir -p "$RUNS"
case "${1:-}" in
  shipped)   # align none, one 6000-step schedule in three legs (da.md section 0): `init`'s 2000-step run, resumed with
             # --steps 3600 (`long`), resumed with --steps 6000; one pinned core and 1 thread, ~0.3 steps/s on the AMD
             # machine of da.md (about 5.5 h in all). `export` copies the result into vaepack/weights.
    N=(--align none --zero-init inject --detail-channels 32 --threads 1)
    vaepack train-da "${COMMON[@]}" "${N[@]}" --steps 2000 --out "$RUNS/main"
    vaepack train-da "${COMMON[@]}" "${N[@]}" --steps 3600 --out "$RUNS/main"
    vaepack train-da "${COMMON[@]}" "${N[@]}" --steps 6000 --out "$RUNS/main" ;;
  proj05)    # the model shipped before (2026-12-01, da.md sections 1-4): D = 32, lambda_align 0.5 (the paper's ImageNet
             # setting), stopped at step 1152 of 1600; 2 threads, ~3.2 s/step on the Xeon of the note
    vaepack train-da "${COMMON[@]}" --out "$RUNS/proj05" --detail-channels 32 --align proj --align-weight 0.5 \
      --steps 1600 --stop-at 1152 --threads 2 ;;
  ablations) # paper Table 4 (lambda_align), D = 64 and distribution matching (issue 15) at equal steps: the 1600-step
             # schedule of `proj05`, stopped at step 1152 (--stop-at). Two runs at a time, one per core (1 thread
             # each, pinned): 0.25 steps/s each on the Xeon of da.md vs 0.28 for one run on 2 threads.
    pair() {
      taskset -c 0 vaepack train-da "${COMMON[@]}" --threads 1 --steps 1600 --stop-at 1152 "${@:1:$(($# / 2))}" &
      taskset -c 1 vaepack train-da "${COMMON[@]}" --threads 1 --steps 1600 --stop-at 1152 "${@:$(($# / 2 + 1))}" &
      wait
    }
    pair --out "$RUNS/align0" --align-weight 0 --out "$RUNS/align0.1" --align-weight 0.1
    pair --out "$RUNS/align1.0" --align-weight 1.0 --out "$RUNS/d64" --detail-channels 64
    vaepack train-da "${COMMON[@]}" --threads 2 --steps 1600 --stop-at 1152 --out "$RUNS/dm" --align dm --align-weight 0.5 ;;
  init)      # da.md section 5: align none to the end of a 2000-step schedule, and where the zero-init sits (two runs at
             # a time, one pinned core and 1 thread each; 0.27-0.31 steps/s each on the AMD machine of da.md)
    N=(--steps 2000 --align none --threads 1)
    taskset -c 0 vaepack train-da "${COMMON[@]}" "${N[@]}" --zero-init inject --out "$RUNS/none-zinj" &
    taskset -c 1 vaepack train-da "${COMMON[@]}" "${N[@]}" --zero-init latent --stop-at 669 --out "$RUNS/none-zlat" &
    wait
    python benchmarks/da.py --data "$DEV" --model da --run "$RUNS/none-zinj" --size 512 --repeat 3 --threads 1 \
      --json benchmarks/results/da-none2000-$(date -u +%Y%m%d).json
    python benchmarks/da_probes.py --train "$DATA" --data "$DEV" --threads 1 \
      --json benchmarks/results/da-probes-$(date -u +%Y%m%d).json ;;
  long)      # lambda 0.1: as measured, a 6000-step schedule stopped at step 1898, then resumed with --steps 3800 (da.md
             # section 5, "Longer runs"); and align none continued from the finished 2000-step `init` run to 3600
    vaepack train-da "${COMMON[@]}" --steps 6000 --stop-at 1898 --align proj --align-weight 0.1 --threads 1 --out "$RUNS/a01-long"
    vaepack train-da "${COMMON[@]}" --steps 3800 --align proj --align-weight 0.1 --threads 1 --out "$RUNS/a01-long"
    [ -e "$RUNS/none-cont" ] || cp -r "$RUNS/none-zinj" "$RUNS/none-cont"   # once: a rerun resumes the copy
    vaepack train-da "${COMMON[@]}" --steps 3600 --align none --zero-init inject --threads 1 --out "$RUNS/none-cont" ;;
  dm)        # issue 15: the shipped `da` (align none) continued with distribution matching of z_d toward the base
             # channels' distribution (--init da, a 1200-step schedule at lr 1e-4), lambda 0.5 and 0.1, one pinned core
             # and 1 thread each (da.md, "align dm on the shipped model"); then reconstruction and modelability
    N=(--data "$DATA" --batch 8 --crop 256 --lr 1e-4 --new-lr-mult 5 --resume --init da --steps 1200 --align dm --threads 1)
    taskset -c 0 vaepack train-da "${N[@]}" --align-weight 0.5 --out "$RUNS/dmi05" &
    taskset -c 1 vaepack train-da "${N[@]}" --align-weight 0.1 --out "$RUNS/dmi01" &
    wait ;;
  dmctl)     # the control of `dm`: the same continuation with align none (what the restart alone does)
    taskset -c 1 vaepack train-da --data "$DATA" --batch 8 --crop 256 --lr 1e-4 --new-lr-mult 5 --resume --init da \
      --steps 1200 --align none --threads 1 --out "$RUNS/ctl" ;;
  dmjoint)   # issue 15: as `dm`, with --align dm-joint (each detail group matched beside the base latent of its photo
             # to (z, z)), lambda 0.5 and 0.1, one pinned core and 1 thread each (da.md section 7); then reconstruction
             # and modelability of each run on the same core
    N=(--data "$DATA" --batch 8 --crop 256 --lr 1e-4 --new-lr-mult 5 --resume --init da --steps 1200 --align dm-joint --threads 1)
    one() {
      taskset -c "$1" vaepack train-da "${N[@]}" --align-weight "$2" --out "$RUNS/$3"
      taskset -c "$1" python benchmarks/da.py --data "$DEV" --run "$RUNS/$3" --no-full --size 64 --repeat 1 --threads 1 \
        --json "benchmarks/results/da-$3-$(date -u +%Y%m%d).json"
      taskset -c "$1" python benchmarks/da_modelability.py --run "$RUNS/$3" --data "$DATA" --heldout "$DEV" \
        --parts full,detail --steps 600 --seed 0 --threads 1 --json "benchmarks/results/da-modelability-$3-$(date -u +%Y%m%d).json"
    }
    one 0 0.5 dj05 & one 1 0.1 dj01 & wait
    # dj01 (lambda 0.1) is the shipped taef2-da-dm (then update sizes and sha256 in weights_manifest.yaml)
    cp "$RUNS/dj01/encoder.safetensors" vaepack/weights/taef2-da-dm-enc.safetensors
    cp "$RUNS/dj01/decoder.safetensors" vaepack/weights/taef2-da-dm-dec.safetensors
    ls -l vaepack/weights/taef2-da-dm-*.safetensors && sha256sum vaepack/weights/taef2-da-dm-*.safetensors ;;
  export)
    vaepack train-da --out "$RUNS/main" --export-only
    cp "$RUNS/main/encoder.safetensors" vaepack/weights/taef2-da-enc.safetensors
    cp "$RUNS/main/decoder.safetensors" vaepack/weights/taef2-da-dec.safetensors
    ls -l vaepack/weights/taef2-da-*.safetensors && sha256sum vaepack/weights/taef2-da-*.safetensors ;;
  measure)   # the tables of benchmarks/results/da.md (torch fp32; latency at 512 px, batch 1) and the modelability
             # of the latents (the flow model of `vaepack modelability`, 600 steps, seed 0)
    python benchmarks/da.py --data "$DEV" --model da --run "$RUNS"/* --size 512 --repeat 3 \
      --json benchmarks/results/da-$(date -u +%Y%m%d).json
    python benchmarks/da_modelability.py --run "$RUNS"/* --data "$DATA" --heldout "$DEV" --steps 600 --seed 0 \
      --threads 1 --json benchmarks/results/da-modelability-$(date -u +%Y%m%d).json ;;
  *) echo "usage: $0 shipped|proj05|ablations|init|long|dm|dmctl|dmjoint|export|measure" >&2; exit 2 ;;
esac
