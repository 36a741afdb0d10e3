"""modelability: how easy each model's latent space is to learn for a small flow model (vaepack.modelability)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vaepack.cli.common import BackendOpt, DeviceOpt, JsonOpt, csv_list, emit_json, nan_to_none, note, stdout_console


def modelability(
    models: str = typer.Option(..., "--models", help="ID or ID@SCALE, comma-separated (e.g. taef2,default@1.5): "
                               "encode at that resolution remap."),
    data: Path = typer.Option(..., "--data", help="Folder of training photos (the flow model's data and the "
                              "per-channel normalization statistics)."),
    heldout: Path = typer.Option(..., "--heldout", help="Folder of held-out photos (no file shared with --data)."),
    steps: int = typer.Option(1000, "--steps", help="Flow-model training steps (the same for every model)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the flow model's init, crops, t and noise."),
    batch: int = typer.Option(32, "--batch", help="16x16 latent crops per training step."),
    samples: int = typer.Option(128, "--samples", help="Generated crops for the Frechet distances."),
    sample_steps: int = typer.Option(10, "--sample-steps", help="Euler steps of the sampler."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (torch and the encoder's runner)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Encoder precision: fp32 (default: the same for every model), "
                              "bf16, or auto (each model's --backend auto choice)."),
    backend: str = BackendOpt, device: str = DeviceOpt, as_json: bool = JsonOpt,
):
    """Train the same small latent flow model on each model's latents (same steps and seed) and report the
    held-out flow-matching loss (overall and per t bucket) and Frechet distances of generated latents."""
    from vaepack import modelability as M

    cfg = M.ModelabilityConfig(models=csv_list(models), data=data, heldout=heldout,
                               train=M.FlowTrainConfig(steps=steps, batch=batch, seed=seed), samples=samples,
                               sample_steps=sample_steps, backend=backend,
                               dtype=None if dtype == "auto" else dtype,
                               device=None if device == "auto" else device, threads=threads)
    res = M.run_modelability(cfg, progress=note)  # progress on stderr, so --json on stdout stays clean
    if as_json:
        emit_json(nan_to_none(res))
    else:
        _print(res)


def _print(res: dict) -> None:
    from rich.table import Table

    c = res["config"]
    t = Table(title=f"Modelability: {c['train']['steps']} steps, batch {c['train']['batch']}, seed "
                    f"{c['train']['seed']}, {res['data']['images']} training / {res['heldout']['images']} "
                    "held-out photos")
    cols = ("model", "latent", "px/latent", "train loss", "held-out loss", "t<.25", ".25-.5", ".5-.75", ">=.75",
            "FD tokens (floor)", "FD 2x2 (floor)", "s")
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "latent") else "right")
    for r in res["models"]:
        ex = r["example"]["latent_shape"]
        t.add_row(r["spec"], f"{ex[0]}x{ex[1]}x{ex[2]}", f"{r['pixels_per_latent']:.2f}",
                  f"{r['train_loss_last']:.4f}", f"{r['heldout_loss']:.4f}",
                  *(f"{v:.4f}" for v in r["heldout_loss_buckets"]),
                  f"{r['fd_tokens']:.3f} ({r['fd_tokens_floor']:.3f})",
                  f"{r['fd_patches']:.3f} ({r['fd_patches_floor']:.3f})", f"{sum(r['seconds'].values()):.0f}")
    out = stdout_console()
    out.print(t)
    out.print(f"latent: C x h x w of {res['models'][0]['example']['source'] if res['models'] else '-'} "
              "(held-out); losses per latent element on per-channel-normalized latents; the floor is random "
              "training crops vs the held-out crops")
