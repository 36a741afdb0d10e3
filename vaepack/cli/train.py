"""distill, distill-export, train-eps: the training entry points (each builds one typed config)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from vaepack.cli.common import DeviceOpt, ForceOpt, JsonOpt, emit_json, note, stderr_console
from vaepack.errors import UsageError


def _train_progress(label: str):
    """A rich progress line (loss, steps/s) for the training loops; returns (context, callback)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = stderr_console()
    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), console=err, disable=not err.is_terminal)
    task = prog.add_task(label, total=None, info="")

    def cb(d: dict):
        if d.get("phase") in ("teacher", "pairs"):
            prog.update(task, completed=d["step"], total=d["total"], info="caching teacher outputs" if d["phase"] == "teacher" else "encoding training pairs")
        else:
            prog.update(task, completed=d["step"], total=d.get("total"),
                        info=f"loss {d.get('loss', float('nan')):.4f}  {d.get('steps_per_s', 0):.2f} steps/s")
    return prog, cb


def distill(
    teacher: str = typer.Option("taef2", "--teacher", help="Teacher model id (any encoder in the zoo)."),
    data: Path = typer.Option(..., "--data", help="Folder of training images (never the evaluation set)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoint, teacher cache, log, exported weights."),
    part: str = typer.Option("encoder", "--part", help="encoder (paper 000 student) or decoder (small TAE "
                             "decoder distilled from the teacher's decoder + a pixel loss)."),
    family: str = typer.Option("student", "--family", help="Encoder: student (paper 000, section III-B) or tae "
                               "(a TAE encoder, e.g. the teacher depth-pruned: --config '{\"blocks\": [0,2,3,3], \"stem\": \"s2d\"}')."),
    width: int = typer.Option(32, "--width", help="Student width (channels after the stem)."),
    config: str = typer.Option("{}", "--config", help="JSON: more StudentConfig / TAEConfig fields."),
    schedule: str = typer.Option("128:10000,256:10000", "--schedule", help="CROP:STEPS stages (paper: 128 then 256)."),
    batch: int = typer.Option(64, "--batch"),
    lr: float = typer.Option(7.5e-4, "--lr", help="Adam learning rate (paper: 7.5e-4)."),
    pixel_weight: float = typer.Option(1.0, "--pixel-weight", help="Decoder: weight of the L1 loss to the image."),
    init_from_teacher: bool = typer.Option(True, "--init-from-teacher/--random-init",
                                           help="TAE students (decoders, --family tae encoders): warm start from the "
                                           "teacher (fewer blocks: its first blocks per stage; narrower: its strongest channels)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop cleanly after N minutes."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Total wall-clock budget over "
                                                    "all resumed sessions; LR decay and stages follow it."),
    ckpt_every: int = typer.Option(200, "--ckpt-every"),
    seed: int = typer.Option(0, "--seed"),
    device: str = DeviceOpt,
    threads: Optional[int] = typer.Option(None, "--threads"),
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="CPU: bf16 autocast + channels_last."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Reuse another run's teacher_cache.pt."),
    init: Optional[Path] = typer.Option(None, "--init", help="Warm start from a .safetensors of the same "
                                        "architecture; a shipped BatchNorm-folded student gets its BatchNorms back from data statistics)."),
    views_per_image: int = typer.Option(1, "--views-per-image", min=1, help="Teacher-cached random windows per image."),
    dm_weight: float = typer.Option(0.0, "--dm-weight", help="Encoder: weight of the distribution-matching loss "
                                    "(paper 003's DMD toward --dm-reference); 0 = off."),
    dm_reference: str = typer.Option("model:taef2", "--dm-reference", help="gaussian, model:ID[@SCALE] (its latents "
                                     "of --data) or a folder of latent files."),
    dm_real_steps: int = typer.Option(2000, "--dm-real-steps", help="Training steps of the frozen real flow."),
    latent_encoder: Optional[Path] = typer.Option(None, "--latent-encoder", help="Decoder: a frozen encoder "
                                                  "(.safetensors export) whose latents feed part of each batch: "
                                                  "the decoder half of a joint continuation."),
    latent_encoder_frac: float = typer.Option(0.5, "--latent-encoder-frac", help="Decoder: share of each batch "
                                              "from --latent-encoder (the rest: the teacher's latents)."),
):
    """Distill a compact encoder (Chu et al. 2026: Huber beta 0.15, Adam 7.5e-4, 128 then 256 px) or decoder."""
    from dataclasses import replace

    from vaepack.files import command_line
    from vaepack.train.common import check_resume
    from vaepack.train.config import distill_config, parse_model_config, parse_schedule
    from vaepack.train.distill import run_distill, run_distill_decoder
    from vaepack.train.teachers import load_teacher

    # Options and --data are checked before any model loads.
    cfg = distill_config(part, family=family, pixel_weight=pixel_weight, init_from_teacher=init_from_teacher,
                         data_dir=data, out_dir=out, width=width, model_config=parse_model_config(config),
                         schedule=parse_schedule(schedule), batch=batch, lr=lr, max_minutes=max_minutes,
                         ckpt_every=ckpt_every, seed=seed, device=device, bf16=bf16, threads=threads,
                         command=command_line(), budget_minutes=budget_minutes, cache=cache, init=init,
                         views_per_image=views_per_image,
                         **({"dm_weight": dm_weight, "dm_reference": dm_reference, "dm_real_steps": dm_real_steps}
                            if part == "encoder" else
                            {"latent_encoder": latent_encoder, "latent_encoder_frac": latent_encoder_frac}))
    if dm_weight and part != "encoder":
        raise UsageError("--dm-weight shapes an encoder's latent distribution; use it with --part encoder")
    if latent_encoder is not None and part != "decoder":
        raise UsageError("--latent-encoder feeds a decoder's training; use it with --part decoder")
    check_resume(out, resume)
    t = load_teacher(teacher, part, device=device, seed=seed, warm_start=cfg.init_from_teacher)
    cfg = replace(cfg, teacher_id=t.id, teacher_config=t.config)  # the manifest states the teacher's config
    prog, cb = _train_progress(f"distill {part}")
    with prog:
        if part == "encoder":
            path = run_distill(t.encoder, cfg, progress=cb)
        else:
            path = run_distill_decoder(t.encoder, t.decoder, cfg, progress=cb)
    if path.name == "checkpoint.pt":
        note(f"stopped before the schedule ended; checkpoint {path} (rerun with --resume to continue); "
              f"`vaepack distill-export {out} -o FILE` exports it as it is")
    else:
        note(f"done: {path}")


def distill_export(
    run_dir: Path = typer.Argument(..., help="A `vaepack distill` run folder (holds checkpoint.pt)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output .safetensors file."),
    raw: bool = typer.Option(False, "--raw", help="Export the raw student weights instead of their EMA."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher id for the metadata when the "
                                          "checkpoint does not record it (else 'unknown')."),
    data: Optional[str] = typer.Option(None, "--data", help="Training data folder for the metadata when the "
                                       "checkpoint does not record it."),
    force: bool = ForceOpt, as_json: bool = JsonOpt,
):
    """Export a distill run's current checkpoint (finished or not) as fp16 safetensors with provenance.

    Encoders are written BatchNorm-folded, like a finished run's own export.
    """
    from vaepack.files import command_line
    from vaepack.io import check_output
    from vaepack.train.distill import export_checkpoint

    if output.is_dir():
        raise UsageError(f"{output}: -o must be a file, not a folder")
    check_output(output, force)
    info = export_checkpoint(run_dir, output, teacher_id=teacher, data_dir=data, command=command_line(),
                             use_ema=not raw)
    for key, given in info.pop("ignored").items():
        note(f"warning: --{key.replace('_dir', '')} {given} ignored: the checkpoint records {info[key]}")
    res = {"run_dir": str(run_dir), **info, "weights": "student" if raw else "ema"}
    if as_json:
        emit_json(res)
    else:
        note(f"{run_dir} -> {info['output']}  ({info['part']}, {'raw' if raw else 'EMA'} weights at step {info['step']}"
              f"{'' if info['finished'] else ', run not finished'})")


def train_eps(
    encoder: str = typer.Option("taef2", "--encoder", help="Frozen encoder whose latents the decoder learns."),
    data: Path = typer.Option(..., "--data", help="Folder of training images."),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoint, log, exported EMA weights)."),
    steps: int = typer.Option(2000, "--steps"),
    batch: int = typer.Option(8, "--batch"),
    crop: int = typer.Option(128, "--crop"),
    lr: float = typer.Option(5e-4, "--lr"),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the exported weights."),
    w_vel: float = typer.Option(1.0, "--w-vel", help="Velocity MSE weight."),
    w_perc: float = typer.Option(0.5, "--w-perc", help="Perceptual weight (LPIPS, or MS-SSIM + L1 without "
                                 "LPIPS weights; paper 0.5)."),
    w_adv: float = typer.Option(0.5, "--w-adv", help="Adversarial trajectory matching weight (paper 0.5)."),
    perceptual: str = typer.Option("auto", "--perceptual", help="auto, lpips or msssim_l1."),
    t_grid_frac: float = typer.Option(0.5, "--t-grid-frac", help="Share of t drawn on the sampler's grid "
                                      "(0 = the paper's logit-normal only)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes"),
    seed: int = typer.Option(0, "--seed"),
    device: str = DeviceOpt,
    cache: Optional[Path] = typer.Option(None, "--cache", help="Latent/reconstruction cache file to reuse."),
):
    """Train the eps-VAE diffusion decoder (Zhao et al.): rectified flow, gamma-scaled x_t, few-step Euler."""
    from vaepack.files import command_line
    from vaepack.train.common import check_resume
    from vaepack.train.config import EpsTrainConfig
    from vaepack.train.eps import run_train_eps

    check_resume(out, resume)
    cfg = EpsTrainConfig(encoder, data, out, steps=steps, batch=batch, crop=crop, lr=lr, ema=ema, resume=resume,
                         max_minutes=max_minutes, seed=seed, device=device, w_vel=w_vel, w_perc=w_perc,
                         w_adv=w_adv, perceptual=perceptual, t_grid_frac=t_grid_frac, cache_path=cache,
                         command=command_line())
    # run_train_eps reports progress as log lines (step, losses, steps/s): print them as they come.
    res = run_train_eps(cfg, progress=note)
    note(json.dumps(res, default=str))



def train_bridge(
    source: str = typer.Option("taef2", "--source", help="Source model: its TAE decoder, frozen, is the spatial prior."),
    target: str = typer.Option("taesana", "--target", help="Target model: the bridge learns its encoder's latents."),
    data: Path = typer.Option(..., "--data", help="Folder of training images (never the evaluation set)."),
    out: Path = typer.Option(..., "--out", help="Run folder: training pairs, checkpoint, log, bridge.safetensors."),
    tap: str = typer.Option("s0", "--tap", help="Where the source decoder stops: latent, s0, s1, s2 (end of that "
                            "stage: 1x/2x/4x the latent size), pre_rgb or rgb."),
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Projector blocks per f32-encoder stage, e.g. 1,3,3,3 "
                                         "(default: the target encoder's)."),
    steps: int = typer.Option(3000, "--steps"),
    batch: int = typer.Option(8, "--batch"),
    crop: int = typer.Option(256, "--crop", help="Training crop in px (a multiple of 32)."),
    crops_per_image: int = typer.Option(8, "--crops-per-image", help="Random crops per photo, encoded once and cached."),
    min_scale: float = typer.Option(1.0, "--min-scale", help="Shrink each photo by a random factor in [this, 1] before "
                                    "each crop (1: no scale jitter)."),
    rot90: bool = typer.Option(False, "--rot90", help="Also turn each training crop by a random multiple of 90 degrees."),
    l2sp: float = typer.Option(0.0, "--l2sp", help="Pull the warm-started layers toward the warm start (L2-SP: this "
                               "weight x their squared distance from it; 0: off)."),
    pairs_backend: str = typer.Option("torch", "--pairs-backend", help="Runtime that encodes the source latents (and "
                                      "decodes them for the rgb tap) when building pairs: torch, openvino, auto..."),
    latent_skip: int = typer.Option(0, "--latent-skip", help="The projector also reads the source latent at its 1/8 "
                                    "point (1), also pooled at 1/16 (2) and 1/32 (3): zero-initialized 1x1 convs."),
    skip_hidden: int = typer.Option(0, "--skip-hidden", help="With --latent-skip: read the latent through a 3x3 conv to "
                                    "this many channels + ReLU before its 1x1 conv (0: the 1x1 conv alone)."),
    lr: float = typer.Option(3e-4, "--lr"),
    train_what: str = typer.Option("all", "--train", help="all (the whole projector learns) or skip (only the "
                                   "latent-skip convs; the projector stays the target encoder)."),
    freeze: int = typer.Option(0, "--freeze", help="Keep the projector's first N layers at the warm start (the "
                               "full-resolution stem and stage 0 are layers 0-4); they run without gradients."),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the exported weights."),
    w_mse: float = typer.Option(1.0, "--w-mse", help="Latent MSE weight."),
    w_l1: float = typer.Option(0.1, "--w-l1", help="Latent L1 weight."),
    w_attn: float = typer.Option(0.0, "--w-attn", help="Attention-fidelity weight (token-affinity KL)."),
    w_feat: float = typer.Option(0.0, "--w-feat", help="Weight of the adapter's output vs the target encoder's own "
                                 "features where the bridge enters it."),
    adapter_blocks: int = typer.Option(0, "--adapter-blocks", help="TAE blocks in the adapter (0: one conv)."),
    attn_tau: float = typer.Option(0.1, "--attn-tau", help="Attention-fidelity temperature."),
    no_warm_start: bool = typer.Option(False, "--no-warm-start", help="Projector from scratch, not from the "
                                       "target encoder's layers."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Stop (checkpoint + export) after this long."),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    device: str = DeviceOpt,
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="bf16 autocast of the tap and projector (weights and loss fp32)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Training-pair cache to reuse across runs."),
    as_json: bool = JsonOpt,
):
    """Train a Bridge (paper 001): the frozen source decoder up to --tap + a projector into --target's space."""
    from vaepack.files import command_line
    from vaepack.train.bridge import run_train_bridge
    from vaepack.train.config import BridgeTrainConfig

    try:
        blk = tuple(int(b) for b in blocks.split(",")) if blocks else None
    except ValueError:
        raise UsageError(f"--blocks must be 4 comma-separated counts, got {blocks!r}") from None
    cfg = BridgeTrainConfig(data, out, source=source, target=target, tap=tap, blocks=blk, adapter_blocks=adapter_blocks,
                            warm_start=not no_warm_start, w_feat=w_feat,
                            steps=steps, batch=batch, crop=crop, crops_per_image=crops_per_image,
                            min_scale=min_scale, rot90=rot90, pairs_backend=pairs_backend, latent_skip=latent_skip, lr=lr, ema=ema,
                            train=train_what, skip_hidden=skip_hidden, freeze=freeze, l2sp=l2sp,
                            w_mse=w_mse, w_l1=w_l1, w_attn=w_attn, attn_tau=attn_tau, resume=resume,
                            max_minutes=budget_minutes, seed=seed, threads=threads, device=device, bf16=bf16,
                            cache_path=cache,
                            command=command_line())
    prog, cb = _train_progress("train-bridge")
    with prog:
        res = run_train_bridge(cfg, progress=cb)
    if as_json:
        emit_json(res)
    else:
        note(f"step {res['step']}/{res['steps']} -> {res['exported']}")


def _export_checkpoint(out: Path, what: str, command: str, export) -> dict:
    """--export-only of a resumable trainer: the run's current checkpoint through ``export``."""
    if not (out / "checkpoint.pt").is_file():
        raise UsageError(f"{out} holds no {what} checkpoint", hint=f"train first: vaepack {command} --data DIR --out RUN")
    return {"exported": [str(p) for p in export(out)]}


def _report_run(res: dict, as_json: bool) -> None:
    if as_json:
        emit_json(res)
    else:
        note(f"step {res['step']}/{res['steps']} -> {', '.join(res['exported'])}" if "step" in res
             else f"exported {', '.join(res['exported'])}")


def train_da(
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of training images (never the evaluation set)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoint, log, encoder/decoder.safetensors."),
    detail_channels: int = typer.Option(32, "--detail-channels", help="D: detail channels, a multiple of 32."),
    align: str = typer.Option("proj", "--align", help="Detail alignment: proj (paper 002 Eq. 3-4), dm (paper 003's "
                              "distribution matching to the base channels' distribution), dm-joint (the same, each "
                              "detail group matched beside the base latent of its photo to (z, z)) or none."),
    dm_real_steps: int = typer.Option(2000, "--dm-real-steps", help="--align dm/dm-joint: training steps of the frozen real flow."),
    align_weight: float = typer.Option(0.5, "--align-weight", help="lambda_align (paper: 0.5 ImageNet, 1.0 SD3.5)."),
    detail_trunk: str = typer.Option("s2d", "--detail-trunk", help="Detail encoder trunk: s2d (the default encoder's, "
                                     "warm-started from it) or taef2 (TAEF2's, ~3x the cost)."),
    down_filter: str = typer.Option("bicubic", "--down-filter", help="The base branch's 2x downsample (antialiased)."),
    zero_init: str = typer.Option("inject", "--zero-init", help="Where the detail path starts at zero: inject (the "
                                  "decoder's injections; measured better) or latent (z_d itself; an ablation)."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from a shipped DA model (manifest id, e.g. da) "
                                       "instead of TAEF2: a regularizer on a trained model, short schedule."),
    steps: int = typer.Option(3000, "--steps"),
    stop_at: Optional[int] = typer.Option(None, "--stop-at", help="Stop (checkpoint + export) at this step, keeping "
                                          "the learning-rate schedule of --steps (equal-step ablations)."),
    batch: int = typer.Option(8, "--batch"),
    crop: int = typer.Option(256, "--crop", help="Training crop in px (a multiple of 16)."),
    lr: float = typer.Option(2e-4, "--lr", help="Learning rate of the warm-started layers."),
    new_lr_mult: float = typer.Option(5.0, "--new-lr-mult", help="The new layers' learning rate, as a multiple of --lr."),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the exported weights."),
    w_l1: float = typer.Option(1.0, "--w-l1", help="Pixel L1 weight."),
    w_msssim: float = typer.Option(0.2, "--w-msssim", help="(1 - MS-SSIM) weight."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    export_only: bool = typer.Option(False, "--export-only", help="Export the run's current checkpoint (EMA) and stop."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Stop (checkpoint + export) after this long."),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    device: str = DeviceOpt,
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="bf16 autocast of the forward passes (weights and loss fp32)."),
    as_json: bool = JsonOpt,
):
    """Train a DA-VAE (paper 002): TAEF2's latent of the half-size image + D detail channels, one decoder."""
    from vaepack.files import command_line

    if export_only:
        from vaepack.train.da import export_da

        res = _export_checkpoint(out, "DA-VAE", "train-da", export_da)
    else:
        from vaepack.train.config import DATrainConfig
        from vaepack.train.da import run_train_da

        if data is None:
            raise UsageError("--data is required to train", hint="or pass --export-only")
        cfg = DATrainConfig(data, out, detail_channels=detail_channels, align=align, align_weight=align_weight,
                            dm_real_steps=dm_real_steps,
                            detail_trunk=detail_trunk, down_filter=down_filter, zero_init=zero_init, init=init, steps=steps, stop_at=stop_at, batch=batch, crop=crop,
                            lr=lr, new_lr_mult=new_lr_mult, ema=ema, w_l1=w_l1, w_msssim=w_msssim, resume=resume, max_minutes=budget_minutes,
                            seed=seed, threads=threads, device=device, bf16=bf16, command=command_line())
        prog, cb = _train_progress("train-da")
        with prog:
            res = run_train_da(cfg, progress=cb)
    _report_run(res, as_json)


def train_qat(
    model: str = typer.Option("default", "--model", help="Manifest model whose part gets an int8-aware copy."),
    part: str = typer.Option("encoder", "--part", help="encoder or decoder."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of training images (never the evaluation set)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoint, log, MODEL-PART.qat.safetensors and .qat.int8.json."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Calibration JSON with the activation "
                                               "ranges (default: the part's shipped or cached one, else made from --data)."),
    scale: float = typer.Option(1.5, "--scale", help="Remap of the crops before encoding (the model's usual --scale)."),
    crop: int = typer.Option(128, "--crop", help="Training crop in px, before --scale."),
    batch: int = typer.Option(8, "--batch"),
    steps: int = typer.Option(400, "--steps"),
    lr: float = typer.Option(1e-5, "--lr"),
    loss: str = typer.Option("mse", "--loss", help="mse (relative to the fp32 outputs' mean square) or l1."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    export_only: bool = typer.Option(False, "--export-only", help="Export the run's current checkpoint and stop."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Stop (checkpoint + export) after this long."),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Quantization-aware fine-tuning: a copy of a model's part that keeps its fp32 outputs under int8
    arithmetic. Use it with: vaepack export MODEL --part PART --precision int8 --calibration RUN/MODEL-PART.qat.int8.json"""
    from vaepack.files import command_line

    if export_only:
        from vaepack.train.qat import export_qat

        res = _export_checkpoint(out, "QAT", "train-qat", export_qat)
    else:
        from vaepack.train.config import QATTrainConfig
        from vaepack.train.qat import run_train_qat

        if data is None:
            raise UsageError("--data is required to train", hint="or pass --export-only")
        cfg = QATTrainConfig(model, part, data, out, calibration=calibration, scale=scale, crop=crop, batch=batch,
                             steps=steps, lr=lr, loss=loss, resume=resume, max_minutes=budget_minutes, seed=seed,
                             threads=threads, device=device, command=command_line())
        prog, cb = _train_progress("train-qat")
        with prog:
            res = run_train_qat(cfg, progress=cb)
    _report_run(res, as_json)
