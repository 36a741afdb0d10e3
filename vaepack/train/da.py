"""Train a DA-VAE (paper 002) on TAEF2: `vaepack train-da`.

Each step takes ``batch`` random ``crop`` px crops of the training photos (random mirror), computes
the frozen base latent z = TAEF2(half(x)) without gradients, and trains the detail encoder and the
decoder (vaepack.models.da) on the loss of ``DATrainConfig``. Both trainable parts start from TAEF2
(``da.warm_start``) with the detail paths zero-initialized, so step 0 reconstructs exactly the "base
only" image and the loss can only go down from there. The exported weights are the EMA, with the
base copied bit-exact from TAEF2 (its upstream file is fp16, and so is the export).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import torch

from vaepack.errors import UsageError
from vaepack.metrics import ms_ssim_loss
from vaepack.models import da
from vaepack.train.common import (StepLog, Stop, atomic_torch_save, autocast, ema_decay_at, ema_update, export_safetensors,
                                  load_images, log, provenance, random_crops, resume_checkpoint, run_summary,
                                  training_session, warmup_cosine_lr)
from vaepack.train.config import DATrainConfig

Progress = Callable[[dict], None]  # {"phase": "train", "step", "total", "loss", "steps_per_s"}


def da_config(cfg: DATrainConfig) -> da.DAConfig:
    return da.DAConfig(detail_channels=cfg.detail_channels, down_filter=cfg.down_filter, detail_trunk=cfg.detail_trunk,
                       detail_blocks=cfg.detail_blocks, head_blocks=cfg.head_blocks)


TRUNK_FROM = {"s2d": "default", "taef2": None}  # the encoder whose weights start the detail trunk (None: the base)


DM_ALIGN = ("dm", "dm-joint")  # the alignments that run a DistributionMatcher (vaepack.train.dm)


def da_loss(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, z_d: torch.Tensor, cfg: DATrainConfig,
            matcher=None) -> dict:
    """The training loss and its terms (x: photo, y: reconstruction, both [0, 1] fp32). ``matcher``
    (align dm, dm-joint): a vaepack.train.dm.DistributionMatcher on the base channels' distribution."""
    terms = {"l1": (y - x).abs().mean()}
    if cfg.w_msssim:
        terms["msssim"] = ms_ssim_loss(y.clamp(0, 1), x)
    terms["align"] = da.align_loss(z_d, z)  # logged even with align none/dm: the structure it would have
    loss = cfg.w_l1 * terms["l1"] + cfg.w_msssim * terms.get("msssim", 0.0)
    if cfg.align == "proj":
        loss = loss + cfg.align_weight * terms["align"]
    elif cfg.align in DM_ALIGN:
        terms["dm"] = matcher.loss(dm_sample(z, z_d, cfg.align))
        loss = loss + cfg.align_weight * terms["dm"]
    return {"loss": loss, **terms}


def dm_sample(z: torch.Tensor, z_d: torch.Tensor, align: str) -> torch.Tensor:
    """What the distribution matcher sees of a batch. ``dm``: the detail groups alone (B r, C, h, w),
    matched to the base channels' marginal distribution. ``dm-joint``: each group beside the base latent
    of its photo (B r, 2C, h, w), matched to the base channels' distribution in both slots, (z, z): the
    pair, not only the marginal, so the match also asks for paper 002's structure - a detail group that
    reads like the base latent at the same place (Proj(z_d) ~ z, Eq. 3) - as a distribution, not per sample.
    (A marginal match adds no dependence on z and cannot make the joint latent easier to model: da.md
    section 6.)"""
    g = da.groups(z_d, z.shape[1])
    if align == "dm-joint":
        return torch.cat([z.repeat_interleave(g.shape[0] // z.shape[0], 0), g], 1)
    return g


def base_matcher(enc: da.DAEncoder, images: list[torch.Tensor], cfg: DATrainConfig, run_dir: Path,
                 device: torch.device):
    """align dm: the reference is the base channels' own distribution - z of every training photo
    (half size, padded to 16 px) - its frozen real flow trained once and cached in the run folder;
    dm-joint: the same latents in both slots, (z, z) (``dm_sample``)."""
    from vaepack.modelability import FlowTrainConfig
    from vaepack.pipeline import pad_to_multiple
    from vaepack.train.dm import DistributionMatcher, DMConfig, Reference, real_flow

    lat = []
    with torch.no_grad():
        for img in images:
            x = pad_to_multiple(img[None].float().to(device) / 255, 16)[0]
            z = enc.base(da.half(x, enc.cfg.down_filter))[0].float().cpu()
            lat.append(torch.cat([z, z]) if cfg.align == "dm-joint" else z)
    # DA latents of 256 px crops are 16x16, whole photos' base latents ~20x30: the flow trains on 8x8 crops
    # (smaller where the photos are; the flow is convolutional, so it runs at any size)
    crop = max(4, min(8, *(min(z.shape[-2:]) for z in lat)) // 2 * 2)
    dm = DMConfig(weight=cfg.align_weight, reference="base", real=FlowTrainConfig(steps=cfg.dm_real_steps, crop=crop))
    name = "base channels of the training photos" + (", in both slots (z, z)" if cfg.align == "dm-joint" else "")
    rf = real_flow(Reference(name, lat), dm.real, cache=run_dir, device=device,
                   progress=lambda m: log.info("%s", m))
    return DistributionMatcher.from_real_flow(rf, dm)


def init_from_model(enc: da.DAEncoder, dec: da.DADecoder, model: str, shas: dict) -> None:
    """``--init``: load a manifest DA model's weights into the freshly built ``enc``/``dec`` (refused
    unless its architecture is this run's) and record their sha256 in ``shas``."""
    from vaepack.loader import load_part

    for part, mod in (("encoder", enc), ("decoder", dec)):
        src, entry, shas[f"init_{part}"] = load_part(model, part)
        if entry.part(part).family != "da" or getattr(src, "cfg", None) != mod.cfg:
            raise UsageError(f"--init '{model}' is not a DA-VAE of this run's architecture "
                             f"({getattr(src, 'cfg', entry.part(part).family)} vs {mod.cfg})",
                             hint="pass the same --detail-channels/--detail-trunk as the model, or another --init")
        mod.load_state_dict(src.state_dict())
    log.info("initialized from %s (%s)", entry.id,
             ", ".join(f"{k} {v[:12]}" for k, v in shas.items() if k.startswith("init_")))


def run_meta(cfg: DATrainConfig, dcfg: da.DAConfig) -> dict:
    """What a checkpoint must agree on to be resumed (steps and budget may change between sessions)."""
    return {"base": cfg.base, "config": {k: getattr(dcfg, k) for k in dcfg.__dataclass_fields__},
            "align": cfg.align, "align_weight": cfg.align_weight, "w_l1": cfg.w_l1, "w_msssim": cfg.w_msssim,
            "crop": cfg.crop, "batch": cfg.batch, "lr": cfg.lr, "new_lr_mult": cfg.new_lr_mult,
            **({"zero_init": cfg.zero_init} if cfg.zero_init != "inject" else {}),  # older runs: inject
            **({"init": cfg.init} if cfg.init else {}),
            **({"dm_real_steps": cfg.dm_real_steps} if cfg.align in DM_ALIGN else {})}


def run_train_da(cfg: DATrainConfig, progress: Progress | None = None) -> dict:
    """Train (or continue, ``cfg.resume``) a DA-VAE in ``cfg.out_dir``; exports ``encoder.safetensors``
    and ``decoder.safetensors`` (EMA, fp16) with config and provenance. Returns a summary dict."""
    from vaepack.loader import load_part
    cfg.validate()
    with training_session(cfg.out_dir, cfg.resume, cfg.threads, cfg.device, cfg.seed) as (run_dir, ckpt, device, rng):
        dcfg = da_config(cfg)
        shas = {}
        enc, dec = da.build("encoder", dcfg), da.build("decoder", dcfg)
        if cfg.init:  # every weight comes from the model (its base is TAEF2's, bit-exact): no warm start
            init_from_model(enc, dec, cfg.init, shas)
        else:
            trunk = None
            if TRUNK_FROM[dcfg.detail_trunk]:
                tmod, tentry, shas["trunk_encoder"] = load_part(TRUNK_FROM[dcfg.detail_trunk], "encoder")
                trunk = tmod.state_dict()
                log.info("detail trunk from %s's encoder", tentry.id)
            for part, mod in (("encoder", enc), ("decoder", dec)):
                base, entry, shas[f"{cfg.base}_{part}"] = load_part(cfg.base, part)
                if entry.space.channels != dcfg.base_channels or entry.space.factor != 8:
                    raise UsageError(f"--base '{cfg.base}' is not a 32-channel f8 model (DA-VAE builds on TAEF2)")
                da.warm_start(mod, part, base.state_dict(), trunk)
            if cfg.zero_init == "latent":
                da.zero_at_latent(enc, dec)
        enc, dec = enc.to(device), dec.to(device)
        enc.base.requires_grad_(False).eval()  # frozen, never trained (paper Sec. 3.1)
        warm = list(enc.detail.trunk.parameters()) + list(dec.base.parameters())
        ids = {id(p) for p in warm}
        new = [p for p in list(enc.parameters()) + list(dec.parameters()) if p.requires_grad and id(p) not in ids]
        params = warm + new
        ema_enc, ema_dec = copy.deepcopy(enc).eval().requires_grad_(False), copy.deepcopy(dec).eval().requires_grad_(False)
        opt = torch.optim.Adam([{"params": warm, "mult": 1.0}, {"params": new, "mult": cfg.new_lr_mult}], lr=cfg.lr)
        meta = run_meta(cfg, dcfg)
        images = [img for _, img in load_images(cfg.data_dir, min_side=cfg.crop)]
        matcher = base_matcher(enc, images, cfg, run_dir, device) if cfg.align in DM_ALIGN else None
        step = 0
        c = resume_checkpoint(ckpt, meta, device, rng, "DA-VAE")
        if c is not None:
            enc.load_state_dict(c["enc"])
            dec.load_state_dict(c["dec"])
            ema_enc.load_state_dict(c["ema_enc"])
            ema_dec.load_state_dict(c["ema_dec"])
            opt.load_state_dict(c["opt"])
            if matcher is not None:
                matcher.load_state_dict(c)
            step = c["step"]

        def save():
            atomic_torch_save({"meta": meta, "enc": enc.state_dict(), "dec": dec.state_dict(),
                               "ema_enc": ema_enc.state_dict(), "ema_dec": ema_dec.state_dict(),
                               "opt": opt.state_dict(), "step": step, "rng": rng.getstate(),
                               "torch_rng": torch.get_rng_state(), "shas": shas, "command": cfg.command,
                               **(matcher.state_dict() if matcher is not None else {})}, ckpt)

        log.info("DA-VAE: %d photos, D=%d, align %s %.3g, %d trainable parameters", len(images),
                 dcfg.detail_channels, cfg.align, cfg.align_weight, sum(p.numel() for p in params))
        slog = StepLog(cfg.steps, cfg.log_every, step, cfg.save_every_minutes, progress)
        with Stop(cfg.max_minutes) as stop:
            while step < (cfg.stop_at or cfg.steps) and not stop.interrupted and not stop.timed_out():
                x = random_crops(images, cfg.batch, cfg.crop, rng).to(device)
                for g in opt.param_groups:
                    g["lr"] = warmup_cosine_lr(step, cfg.steps, cfg.lr) * g["mult"]
                with autocast(device, cfg.bf16):
                    with torch.no_grad():
                        z = enc.base(da.half(x, dcfg.down_filter))
                    z_d = enc.detail(x)
                    y = dec(torch.cat([z, z_d], 1))
                if matcher is not None:  # k fake-flow updates on the current (detached) detail groups
                    matcher.fake_step(dm_sample(z.float(), z_d.detach().float(), cfg.align))
                terms = da_loss(x, y.float(), z.float(), z_d.float(), cfg, matcher)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                opt.step()
                d = ema_decay_at(step, cfg.ema)
                ema_update(ema_enc, enc, d)
                ema_update(ema_dec, dec, d)
                step += 1
                slog.add(step, terms)
                if slog.due_save():
                    save()
        save()
        return run_summary(step, cfg.steps, [str(p) for p in export_da(run_dir, cfg.command)], slog.minutes, meta)


def export_da(run_dir: str | Path, command: str | None = None, out_dir: str | Path | None = None) -> list[Path]:
    """The EMA weights of a run's checkpoint as ``encoder.safetensors`` and ``decoder.safetensors``
    (fp16: the base is TAEF2's fp16 upstream weights, bit-exact) with config and provenance (``command``:
    the training command recorded in the checkpoint unless given)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    c = torch.load(run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")
    command = command if command is not None else c.get("command")  # the training command, not the export's
    dcfg = da.DAConfig(**c["meta"]["config"])
    outs = []
    for part, key in (("encoder", "ema_enc"), ("decoder", "ema_dec")):
        mod = da.build(part, dcfg)
        mod.load_state_dict(c[key])
        meta = provenance(command, kind=f"da-{part}", config=json.dumps(c["meta"]["config"], sort_keys=True),
                          training=json.dumps(c["meta"], sort_keys=True), steps=c["step"],
                          **{f"{k}_sha256": v for k, v in c["shas"].items()})
        outs.append(export_safetensors(mod, out_dir / f"{part}.safetensors", meta))
    return outs
