#!/usr/bin/env bash
# Trains the eps-VAE diffusion decoder (paper 004) for the FLUX.2 latent space (TAEF2 encoder) and
# exports the EMA weights shipped as vaepack/weights/vaepack-f2-eps-w32.safetensors.
# This is the exact command that produced them (1 CPU thread, bf16 autocast; see
# benchmarks/results/eps_nfe.md for the machine, the training time and the dev-set numbers).
# Once the CLI is wired this is `vaepack train-eps --encoder taef2 --data DATA --out RUN_DIR ...`.
set -euo pipefail
DATA=${DATA:-/work/shared/data/train}
RUN=${RUN:-/work/runs/eps/f2}
export VAEPACK_MIRROR=${VAEPACK_MIRROR:-/work/shared/weights}   # TAEF2 weights (frozen encoder + base)
export OMP_NUM_THREADS=1

# 1) cache: TAEF2 latents + TAEF2 reconstructions of every training image (done once, ~25 min here)
python -c "
import torch; torch.set_num_threads(1)
from pathlib import Path
from vaepack.train_eps import build_cache
p = Path('$RUN/cache_taef2.safetensors')
p.exists() or build_cache('taef2', Path('$DATA'), p, progress=print)
"

# 2) training (resumable: rerun the same command to continue from $RUN/checkpoint.pt)
python -c "
import torch; torch.set_num_threads(1)
from vaepack.train_eps import run_train_eps
run_train_eps('taef2', '$DATA', '$RUN', steps=20000, batch=8, crop=128, lr=5e-4, ema=0.999,
              w_vel=1.0, w_perc=PERC, w_adv=0.0, t_grid_frac=0.5, max_minutes=MINUTES, seed=0,
              device='cpu', progress=print)
"

# 3) fp16 export of the EMA weights into the package
python -c "
from vaepack.train_eps import export_weights
print(export_weights('$RUN', 'vaepack/weights/vaepack-f2-eps-w32.safetensors', 'fp16',
      command='benchmarks/train_eps.sh'))
"
