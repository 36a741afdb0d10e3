"""Distillation of compact encoders and decoders from a teacher autoencoder (paper 000, III-C).

Encoder: the student regresses the teacher's latent with Huber(beta=0.15), Adam lr 7.5e-4, a 128 px
stage then a 256 px stage (paper 000, IV-B). Decoder: a small decoder regresses the teacher
decoder's image plus an L1 pixel loss against the ground truth, from the teacher encoder's latents.

What a step sees comes from the view pool (vaepack.train.pool: teacher outputs cached per image
view, crops on the latent grid, masked crop borders). Warm-up then cosine LR decay, and an EMA of the
weights, which is what gets exported.

Everything a run needs to continue lives in ``out_dir``: ``checkpoint.pt`` (atomic writes),
``teacher_cache.pt``, ``train.log``. Re-running the same call resumes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.errors import UsageError, VaepackError
from vaepack.files import sha256_file
from vaepack.train.common import (Stop, atomic_torch_save, autocast, ema_decay_at, ema_update, export_safetensors,
                                  file_log, log, provenance, resume_checkpoint)
from vaepack.train.config import DistillConfig, DistillDecoderConfig, DistillOptions, check_schedule
from vaepack.train.pool import sample_batch, teacher_pool
from vaepack.train.warmstart import decoder_student, encoder_student, load_exported
from vaepack.vae import pick_device

HUBER_BETA = 0.15  # paper 000, eq. (1)
Progress = Callable[[dict], None]  # {"phase": "teacher" | "train", "step", "total", ...}


# --------------------------------------------------------------------------- the schedule
@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0
    work: int = 0  # sum of crop**2 over steps (the schedule's progress measure)
    finished: bool = False
    losses: list = field(default_factory=list)  # (step, ema loss)


def _progress(state: TrainState, schedule, budget_minutes: float | None) -> float:
    """Fraction of the run done. Work is steps weighted by crop area, so a 256 px step counts 4x a
    128 px one; with a wall-clock budget the run also ends (and the LR decays) on time."""
    total = sum(c * c * n for c, n in schedule)
    f = state.work / total if total else 1.0
    if budget_minutes:
        f = max(f, state.seconds / (budget_minutes * 60))
    return min(1.0, f)


def _crop_at(frac: float, schedule) -> int:
    total = sum(c * c * n for c, n in schedule)
    acc = 0
    for crop, n in schedule:
        acc += crop * crop * n
        if frac < acc / total:
            return crop
    return schedule[-1][0]


def _lr_at(frac: float, base: float, warmup: int, step: int, final_frac: float, kind: str) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if kind == "constant":
        return base
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def _masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.expand_as(loss)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


# ------------------------------------------------------------------------------- the trainer
def _train(
    *,
    kind: str,
    student: nn.Module,
    student_meta: dict,
    teacher: nn.Module,
    teacher_decoder: nn.Module | None,
    cfg: DistillOptions,
    pixel_weight: float,
    progress: Progress | None,
    latent_encoder: nn.Module | None = None,
    latent_encoder_frac: float = 0.0,
) -> tuple[nn.Module, TrainState, Path]:
    schedule = check_schedule(cfg.schedule)
    if cfg.batch < 1:
        raise UsageError("batch must be at least 1")
    total = sum(s for _, s in schedule)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with file_log(run_dir):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        rng = random.Random(cfg.seed)
        teacher = teacher.to(device).eval().float()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if latent_encoder is not None:
            latent_encoder = latent_encoder.to(device).eval().float().requires_grad_(False)
        if teacher_decoder is not None:
            teacher_decoder = teacher_decoder.to(device).eval().float()
        pool = teacher_pool(teacher=teacher, teacher_decoder=teacher_decoder, data_dir=cfg.data_dir, run_dir=run_dir,
                            views=cfg.all_views, teacher_id=cfg.teacher_id, seed=cfg.seed, max_side=cfg.view_max_side,
                            device=device, bf16=cfg.bf16, cache=cfg.cache, progress=progress)

        student = student.to(device)
        channels_last = device.type == "cpu"
        if channels_last:
            student = student.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        ema = copy.deepcopy(student).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
        matcher = _dm_matcher(cfg, teacher, run_dir, device) if kind == "encoder" else None
        state = TrainState()
        ckpt = run_dir / "checkpoint.pt"
        c = resume_checkpoint(ckpt, student_meta, device, rng, "model")
        if c is not None:
            student.load_state_dict(c["student"])
            ema.load_state_dict(c["ema"])
            opt.load_state_dict(c["opt"])
            if matcher is not None:
                matcher.load_state_dict(c)
            state = TrainState(**c["state"])

        def save():
            atomic_torch_save({"student": student.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                               "state": asdict(state), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                               "meta": student_meta, "schedule": schedule, "teacher_id": cfg.teacher_id,
                               "data_dir": str(cfg.data_dir),
                               **(matcher.state_dict() if matcher is not None else {})}, ckpt)

        log.info("%s distillation: %s, schedule %s, batch %d, lr %g (%s), %d views, device %s, threads %d",
                 kind, json.dumps(student_meta), schedule, cfg.batch, cfg.lr, cfg.lr_kind, len(pool), device,
                 torch.get_num_threads())
        t_last, s_last = time.time(), state.step
        ema_loss = state.losses[-1][1] if state.losses else None
        sec0 = state.seconds
        on_interrupt = lambda: log.warning("interrupt: writing a checkpoint and stopping (Ctrl-C again to abort)")  # noqa: E731
        with Stop(cfg.max_minutes, on_interrupt) as stop:
            student.train()
            while True:
                frac = _progress(state, schedule, cfg.budget_minutes)
                if frac >= 1.0:
                    break
                crop = _crop_at(frac, schedule)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(frac, cfg.lr, cfg.warmup, state.step, cfg.lr_final, cfg.lr_kind)
                img, lat, mask, dec = sample_batch(pool, crop, cfg.batch, 8, cfg.border, rng, kind == "decoder")
                if channels_last:
                    img = img.contiguous(memory_format=torch.channels_last)
                img, lat, mask = img.to(device), lat.to(device), mask.to(device)
                with autocast(device, cfg.bf16):
                    if kind == "encoder":
                        out = student(img).float()
                        loss = _masked_mean(F.smooth_l1_loss(out, lat, beta=HUBER_BETA, reduction="none"), mask)
                        if matcher is not None:  # paper 003: k fake-flow updates, then the DMD term
                            matcher.fake_step(out.detach())
                            loss = loss + cfg.dm_weight * matcher.loss(out)
                    else:
                        if latent_encoder is not None:  # the paired encoder's latents for the first k crops
                            k = max(1, round(latent_encoder_frac * lat.shape[0]))
                            with torch.no_grad():
                                lat = torch.cat([latent_encoder(img[:k]).float(), lat[k:]])
                        if channels_last:
                            lat = lat.contiguous(memory_format=torch.channels_last)
                        out = student(lat).float()
                        mf = F.interpolate(mask, scale_factor=8, mode="nearest")
                        dec = dec.to(device)
                        loss = _masked_mean((out - dec).abs(), mf) + pixel_weight * _masked_mean((out - img).abs(), mf)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state.step += 1
                state.work += crop * crop
                ema_update(ema, student, ema_decay_at(state.step, cfg.ema_decay))
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise VaepackError(f"loss became {lv} at step {state.step}", path=str(run_dir),
                                       hint="lower --lr or resume from the last checkpoint")
                ema_loss = lv if ema_loss is None else 0.98 * ema_loss + 0.02 * lv
                now = time.time()
                state.seconds = sec0 + now - stop.start
                if state.step % 50 == 0:
                    sps = (state.step - s_last) / max(1e-9, now - t_last)
                    t_last, s_last = now, state.step
                    state.losses.append((state.step, ema_loss))
                    log.info("step %d/%d (%.1f%%) crop %d loss %.5f (ema %.5f) lr %.2e %.2f steps/s", state.step,
                             total, 100 * frac, crop, lv, ema_loss, opt.param_groups[0]["lr"], sps)
                if progress:
                    progress({"phase": "train", "step": state.step, "total": total, "frac": frac, "loss": ema_loss,
                              "step_loss": lv, "crop": crop, "lr": opt.param_groups[0]["lr"],
                              "steps_per_s": state.step / max(1e-9, state.seconds), "elapsed": state.seconds})
                timed_out = stop.timed_out()
                done = _progress(state, schedule, cfg.budget_minutes) >= 1.0
                if state.step % cfg.ckpt_every == 0 or stop.interrupted or timed_out or done:
                    save()
                if stop.interrupted or timed_out:
                    log.info("stopped at step %d (%s); rerun the same command to resume", state.step,
                             "interrupt" if stop.interrupted else "max_minutes")
                    break
            if _progress(state, schedule, cfg.budget_minutes) >= 1.0:
                state.finished = True
                save()
                log.info("finished at step %d after %.0f s of training", state.step, state.seconds)
        return ema.eval(), state, run_dir


def _provenance(teacher_id, data_dir, schedule, state, batch, command, family, part, cfg) -> dict[str, str]:
    return provenance(command or None, vaepack_family=family, vaepack_part=part,
                      config=json.dumps(cfg, sort_keys=True), teacher=teacher_id, data_dir=str(data_dir),
                      schedule=json.dumps([list(s) for s in schedule]), steps=state.step,
                      train_seconds=f"{state.seconds:.0f}", batch=batch)


# ------------------------------------------------------------------------------ public API
def _dm_matcher(cfg: DistillOptions, teacher: nn.Module, run_dir: Path, device: torch.device):
    """The DistributionMatcher of ``--dm-weight W --dm-reference R`` (None when off): the frozen real
    flow trained on the reference (cached in the run folder), a fake flow updated on the student's
    latents (paper 003; vaepack.train.dm)."""
    if not getattr(cfg, "dm_weight", 0.0):
        return None
    from vaepack.modelability import FlowTrainConfig
    from vaepack.train.dm import DMConfig, build_matcher

    with torch.no_grad():
        channels = int(teacher(torch.zeros(1, 3, 16, 16, device=device)).shape[1])
    dm = DMConfig(weight=cfg.dm_weight, reference=cfg.dm_reference, real=FlowTrainConfig(steps=cfg.dm_real_steps))
    return build_matcher(dm, channels=channels, data_dir=cfg.data_dir, device=device, cache=run_dir,
                         progress=lambda m: log.info("%s", m))


def run_distill(teacher: nn.Module, cfg: DistillConfig, progress: Progress | None = None) -> Path:
    """Distill an encoder from ``teacher`` (images [0,1] -> latent at H/8) as ``cfg`` says.

    Returns the exported fp16 safetensors (BatchNorm folded) once the schedule is complete, else the
    checkpoint path (stopped by ``max_minutes`` or Ctrl-C); calling again resumes.
    """
    from vaepack.models import student as sfam

    cfg.validate()
    if cfg.init_from_teacher and cfg.teacher_config is None:
        raise UsageError("--init-from-teacher warm-starts a 'tae' student from a TAE teacher (and excludes --init)",
                         hint="pass the teacher's TAEConfig as teacher_config")
    model, arch = encoder_student(teacher, cfg)
    meta = {"family": cfg.family, "part": "encoder", "config": asdict(arch),
            **({"dm": {"weight": cfg.dm_weight, "reference": cfg.dm_reference, "real_steps": cfg.dm_real_steps}}
               if cfg.dm_weight else {})}
    ema, state, run_dir = _train(kind="encoder", student=model, student_meta=meta, teacher=teacher,
                                 teacher_decoder=None, cfg=cfg, pixel_weight=0.0, progress=progress)
    if not state.finished:
        return run_dir / "checkpoint.pt"
    out = ema.float().cpu().to(memory_format=torch.contiguous_format)
    if cfg.family == "student":
        out = sfam.fuse_bn(out)
        arch = out.cfg
    md = _provenance(cfg.teacher_id, cfg.data_dir, cfg.schedule, state, cfg.batch, cfg.command, cfg.family,
                     "encoder", asdict(arch))
    name = cfg.export_name or (f"vaepack-enc-s{cfg.width}.safetensors" if cfg.family == "student"
                               else f"vaepack-enc-tae{cfg.width}.safetensors")
    return export_safetensors(out, run_dir / name, md)


def run_distill_decoder(teacher_encoder: nn.Module, teacher_decoder: nn.Module, cfg: DistillDecoderConfig,
                        progress: Progress | None = None) -> Path:
    """Distill a small TAE-family decoder in the teacher's latent space as ``cfg`` says.

    Input: the teacher encoder's latent of a crop's image; loss: L1 to the teacher decoder's image
    (clamped to [0, 1]) + ``pixel_weight`` * L1 to the ground-truth image. ``cfg.cache`` may point at
    an encoder run's ``teacher_cache.pt`` made with the same data, views and seed (only the decoder
    pass is added). Returns the export once finished, else the checkpoint path.
    """
    cfg.validate()
    model, arch = decoder_student(teacher_encoder, teacher_decoder, cfg)
    meta = {"family": "tae", "part": "decoder", "config": asdict(arch)}
    paired = None
    if cfg.latent_encoder is not None:
        paired = load_exported(cfg.latent_encoder, "encoder")
        writes = [m for m in paired.modules() if isinstance(m, nn.Conv2d)][-1].out_channels  # its output conv
        if writes != arch.latent_channels:
            raise UsageError(f"the --latent-encoder writes {writes} latent channels, the "
                             f"teacher's space has {arch.latent_channels}", path=str(cfg.latent_encoder),
                             hint="pass an encoder of the teacher's latent space")
        # resuming with another encoder or share is refused by the checkpoint's meta check
        meta["latent_encoder"] = {"sha256": sha256_file(cfg.latent_encoder), "frac": cfg.latent_encoder_frac}
    ema, state, run_dir = _train(kind="decoder", student=model, student_meta=meta, teacher=teacher_encoder,
                                 teacher_decoder=teacher_decoder, cfg=cfg, pixel_weight=cfg.pixel_weight,
                                 progress=progress, latent_encoder=paired, latent_encoder_frac=cfg.latent_encoder_frac)
    if not state.finished:
        return run_dir / "checkpoint.pt"
    md = _provenance(cfg.teacher_id, cfg.data_dir, cfg.schedule, state, cfg.batch, cfg.command, "tae", "decoder",
                     asdict(arch))
    if paired is not None:
        md.update(latent_encoder=cfg.latent_encoder.name, latent_encoder_sha256=meta["latent_encoder"]["sha256"],
                  latent_encoder_frac=str(cfg.latent_encoder_frac))
    out = ema.float().cpu().to(memory_format=torch.contiguous_format)
    return export_safetensors(out, run_dir / (cfg.export_name or f"vaepack-dec-w{cfg.width}.safetensors"), md)


def export_checkpoint(run_dir: str | os.PathLike, out: str | os.PathLike, *, teacher_id: str | None = None,
                      data_dir: str | None = None, command: str | None = None, use_ema: bool = True) -> dict:
    """Export a run's current checkpoint (finished or not) as fp16 safetensors with provenance.

    The teacher id and data folder the checkpoint records win; ``teacher_id``/``data_dir`` fill in for
    checkpoints that predate those records. Returns a summary: output path, part, step, finished,
    teacher, data_dir and ``ignored`` (the given values that disagreed with the recorded ones).
    """
    from vaepack.models import student as sfam
    from vaepack.models import tae

    run_dir = Path(run_dir)
    ck = run_dir / "checkpoint.pt"
    if not ck.exists():
        raise VaepackError("no checkpoint.pt", path=str(run_dir), hint="run `vaepack distill` with --out there first")
    c = torch.load(ck, weights_only=False, map_location="cpu")
    meta = c["meta"]
    if meta["family"] == "student":
        arch = sfam.StudentConfig(**meta["config"])
        m = sfam.build("encoder", arch)
        m.load_state_dict(c["ema" if use_ema else "student"])
        m = sfam.fuse_bn(m.eval())
        cfg_out = asdict(m.cfg)
    else:
        arch = tae.TAEConfig(**meta["config"])
        m = tae.build(meta["part"], arch)
        m.load_state_dict(c["ema" if use_ema else "student"])
        cfg_out = asdict(arch)
    state = TrainState(**c["state"])
    ignored = {k: v for k, v, rec in (("teacher", teacher_id, c.get("teacher_id")), ("data_dir", data_dir, c.get("data_dir")))
               if v is not None and rec is not None and str(v) != str(rec)}
    teacher_id = str(c.get("teacher_id") or teacher_id or "unknown")
    data_dir = str(c.get("data_dir") or data_dir or "")
    md = _provenance(teacher_id, data_dir, c["schedule"], state, None, command, meta["family"], meta["part"], cfg_out)
    path = export_safetensors(m.eval(), Path(out), md)
    return {"output": str(path), "family": meta["family"], "part": meta["part"], "step": state.step,
            "finished": state.finished, "teacher": teacher_id, "data_dir": data_dir, "ignored": ignored}
