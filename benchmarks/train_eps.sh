#!/usr/bin/env bash
# Trains the eps-VAE diffusion decoder (paper 004) for the FLUX.2 latent space (frozen TAEF2 encoder,
# TAEF2 decoder as the base reconstruction) and exports the EMA weights shipped as
# vaepack/weights/vaepack-f2-eps-w32.safetensors. These are the commands that produced them
# (1 CPU thread, bf16 autocast, niced below a concurrent training job); the run was stopped with
# SIGINT (Ctrl-C: checkpoint + export) after the step count given in benchmarks/results/eps_nfe.md.
# Once the CLI is wired this is `vaepack train-eps --encoder taef2 --data DATA --out RUN_DIR ...`.
set -euo pipefail
DATA=${DATA:-/work/shared/data/train}
RUNS=${RUNS:-/work/runs/eps}
export VAEPACK_MIRROR=${VAEPACK_MIRROR:-/work/shared/weights}   # TAEF2 weights (encoder + base decoder)
export OMP_NUM_THREADS=1

# 1) cache: TAEF2 latents + TAEF2 reconstructions of the 280 training images (~35 min here, once)
python -c "
import torch; torch.set_num_threads(1)
from pathlib import Path
from vaepack.train.eps_data import build_cache
p = Path('$RUNS/cache_taef2_train.safetensors')
p.exists() or build_cache('taef2', Path('$DATA'), p, progress=print)
"

# 2) training; resumable: rerun to continue from $RUNS/f2/checkpoint.pt; Ctrl-C stops cleanly
python -c "
import torch; torch.set_num_threads(1)
from vaepack.train.config import EpsTrainConfig
from vaepack.train.eps import run_train_eps
print(run_train_eps(EpsTrainConfig('taef2', '$DATA', '$RUNS/f2', steps=20000, batch=8, crop=128, lr=5e-4, ema=0.999,
      w_vel=1.0, w_perc=5.0, w_adv=0.0, t_grid_frac=0.5, max_minutes=76, seed=0, device='cpu',
      cache_path='$RUNS/cache_taef2_train.safetensors', log_every=50,
      command='benchmarks/train_eps.sh'), progress=print))
"

# 3) fp16 export of the EMA weights into the package
python -c "
from vaepack.train.eps import export_weights
print(export_weights('$RUNS/f2', 'vaepack/weights/vaepack-f2-eps-w32.safetensors', 'fp16',
      command='benchmarks/train_eps.sh'))
"
