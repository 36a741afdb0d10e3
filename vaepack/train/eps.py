"""Train an eps-VAE diffusion decoder (paper 004) for a frozen encoder's latent space.

``run_train_eps(EpsTrainConfig(encoder_id, data_dir, out_dir, ...))`` trains
``vaepack.models.eps_unet.EpsDecoder`` on latents of the frozen encoder (e.g. ``taef2``) and exports
the EMA weights as a safetensors file the loader can use (family ``eps``). Objectives, each
switchable with its weight (0 disables it):

* ``w_vel``  velocity MSE of rectified flow, Eq. 9, with t ~ logit-normal(0, 1) [3.3, Table 4 (b)];
* ``w_perc`` perceptual matching on x0_hat of Eq. 10 [3.2, Table 4 (d)] (vaepack.train.eps_losses);
* ``w_adv``  adversarial denoising-trajectory matching, Eq. 11-12 [Table 4 (e)]: a time-conditioned
  (AdaGN) discriminator sees concat(x_0, x_t) as real and concat(x0_hat, x_t) as fake, non-saturating
  loss, R1 penalty on real inputs (Mescheder et al. 2018; lazy, every ``r1_every`` steps).
Paper weights (C.2): lambda_LPIPS = 0.5, lambda_adv = 0.5; Adam, EMA decay 0.999 (here with the
usual warm-up min(decay, (1 + n) / (10 + n)) so short CPU runs are not dominated by the init).

The training set is cached once per run (vaepack.train.eps_data). CPU training runs under bf16
autocast with channels_last.

Checkpoints (``checkpoint.pt``, written atomically, read with ``weights_only=True``) hold model, EMA,
discriminator, optimizers, RNG states and step; ``resume=True`` continues from it. SIGINT or
``max_minutes`` stop the loop after the current step and leave a usable checkpoint + exported EMA.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from vaepack.errors import UsageError, WeightsError
from vaepack.files import command_line, sha256_file
from vaepack.io import load_image
from vaepack.models.eps_unet import EpsConfig, EpsDecoder, flow_scale
from vaepack.train.common import (Stop, atomic_torch_save, autocast, ema_decay_at, ema_update, provenance,
                                  save_safetensors, training_images)
from vaepack.train.config import EpsTrainConfig
from vaepack.train.eps_data import LatentCache, Progress, build_cache, image_names
from vaepack.train.eps_losses import Perceptual, TimeDiscriminator
from vaepack.vae import pick_device

CKPT_NAME = "checkpoint.pt"
EXPORT_NAME = "eps_decoder.safetensors"
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ============================================================================= helpers
def default_config(encoder_id: str, **overrides) -> EpsConfig:
    """An EpsConfig for the encoder's space; ``base="tae"`` when the model has a TAE decoder."""
    from vaepack.manifest import get_model

    entry = get_model(encoder_id)
    kw: dict = {"latent_channels": entry.space.channels, "factor": entry.space.factor}
    dec = entry.parts.get("decoder")
    if dec is not None and dec.family == "tae" and entry.space.factor == 8:
        kw.update(base="tae", base_width=int(dec.config.get("width", 64)),
                  base_midblock_gn=bool(dec.config.get("midblock_gn", False)))
    kw.update(overrides)
    return EpsConfig(**kw)


def _load_base(model: EpsDecoder, encoder_id: str) -> str:
    """Copy the frozen base decoder weights (the encoder model's own TAE decoder) into ``model``."""
    from vaepack.loader import load_part

    dec, _, digest = load_part(encoder_id, "decoder")
    try:
        model.base.load_state_dict(dec.state_dict(), strict=True)
    except RuntimeError as e:
        raise WeightsError(f"the decoder of '{encoder_id}' does not fit the eps base config: "
                           f"{str(e).splitlines()[0]}") from None
    return digest


def export_weights(run_dir: Path, out_path: Path, dtype: str = "fp16", command: str | None = None) -> dict:
    """Write the EMA weights of a run's checkpoint as a loader-ready safetensors (atomic).

    Metadata: format, family, part, config (JSON), encoder, train steps, command, base weights sha.
    Returns {"path", "sha256", "size", "params"}.
    """
    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"unknown export dtype '{dtype}' ({', '.join(EXPORT_DTYPES)})")
    ck = _read_checkpoint(Path(run_dir) / CKPT_NAME)
    dt = EXPORT_DTYPES[dtype]
    sd = {k: (v.to(dt) if v.is_floating_point() else v).contiguous() for k, v in ck["ema"].items()}
    meta = provenance(command or ck.get("command", ""), format="vaepack.weights", family="eps", part="decoder",
                      config=ck["config"], encoder=ck["encoder"], train_steps=ck["step"], dtype=dtype,
                      base_sha256=ck.get("base_sha256", ""),
                      license_note="base.* = TAE decoder weights (MIT, madebyollin/taesd)" if ck.get("base_sha256") else "")
    p = save_safetensors(sd, out_path, meta)
    n = sum(v.numel() for k, v in sd.items() if not k.startswith("base."))
    return {"path": str(p), "sha256": sha256_file(p), "size": p.stat().st_size, "params": n}


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                           path=str(path)) from None


def load_eps_decoder(path: Path) -> EpsDecoder:
    """An EpsDecoder (fp32, eval) from an exported safetensors file, config from its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("family") != "eps":
            raise WeightsError("not an eps decoder weights file (metadata family != 'eps')", path=str(path))
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    model = EpsDecoder(EpsConfig.from_json(meta["config"]))
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ============================================================================= training
def run_train_eps(cfg: EpsTrainConfig, progress: Progress | None = None) -> dict:
    """Train (or resume) an eps decoder; returns a summary dict (paths, step, last losses, export).

    ``cfg.t_grid_frac``: fraction of each batch whose t is drawn (uniformly) from the times the
    sampler actually visits for NFE in ``t_grid_steps`` (the Eq. 13 grid, all >= 0.64 for NFE <= 10;
    t = 1 for NFE = 1) instead of the logit-normal, which puts only ~0.2% of its mass above t = 0.95.
    A vaepack addition for short CPU runs (measured: after 150 steps on logit-normal only, NFE = 1
    was 0.2 dB *below* the untrained start, with 0.5 it was 0.1 dB above); 0 is the paper's setting.
    ``progress`` receives every log line.
    """
    from vaepack.samplers import time_grid

    cfg.validate()
    encoder_id, batch, crop, lr, warmup = cfg.encoder_id, cfg.batch, cfg.crop, cfg.lr, cfg.warmup
    dev = pick_device(cfg.device)
    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train.log"
    command = cfg.command or command_line()

    def log(msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        with open(log_path, "a") as fh:
            fh.write(line + "\n")
        if progress:
            progress(msg)

    ckpt_path = out_dir / CKPT_NAME
    ck = _read_checkpoint(ckpt_path) if cfg.resume and ckpt_path.is_file() else None
    if ck is not None and ck["encoder"] != encoder_id:
        raise UsageError(f"{ckpt_path} was trained for encoder '{ck['encoder']}', not '{encoder_id}'")

    # -- architecture and data ------------------------------------------------------------------
    given = cfg.model_config
    if ck is not None:
        arch = EpsConfig.from_json(ck["config"])
    elif isinstance(given, EpsConfig):
        arch = given
    else:
        arch = default_config(encoder_id, **(given or {}))
    files = training_images(cfg.data_dir)
    cpath = cfg.cache_path or out_dir / f"cache_{encoder_id}.safetensors"
    if not cpath.is_file():
        log(f"building latent cache {cpath} ({len(files)} images)")
        build_cache(encoder_id, cfg.data_dir, cpath, base=arch.base != "none", progress=None)
    data = LatentCache(cpath, encoder_id, image_names(cfg.data_dir, files), base=arch.base != "none")
    if data.factor != arch.factor:
        raise UsageError(f"{cpath}: cache factor {data.factor} does not match the config's {arch.factor}")
    if crop < 16 or crop % arch.factor:
        raise UsageError(f"--crop must be a multiple of {arch.factor} (and >= 16), got {crop}")
    pool = data.usable(crop)
    if not pool:
        raise UsageError(f"no training image is at least {crop}x{crop}; use a smaller --crop")
    if ck is None and not (isinstance(given, EpsConfig) or (given and "data_scale" in given)):
        std = data.residual_std()
        scale = float(f"{1.0 / std:.2g}")  # make x0 ~unit variance (sigma_data = 1)
        arch = replace(arch, data_scale=scale, sigma_data=1.0)
        log(f"data std {std:.4f} (in [-1,1] units, {'residual over base' if arch.base != 'none' else 'image'})"
            f" -> data_scale {scale}")

    # -- models -----------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = EpsDecoder(arch)
    base_sha = _load_base(model, encoder_id) if arch.base != "none" else ""
    if model.base is not None:
        model.base.requires_grad_(False)
    model_ema = copy.deepcopy(model).requires_grad_(False)
    disc = TimeDiscriminator() if cfg.w_adv > 0 else None
    params = [p for p in model.unet.parameters()]
    opt = torch.optim.Adam(params, lr=lr, betas=cfg.betas)
    disc_lr = cfg.disc_lr or lr
    opt_d = torch.optim.Adam(disc.parameters(), lr=disc_lr, betas=(0.0, 0.99)) if disc else None
    g = torch.Generator("cpu").manual_seed(cfg.seed + 1)
    step = 0
    if ck is not None:
        model.load_state_dict(ck["model"])
        model_ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        if disc is not None and "disc" in ck:
            disc.load_state_dict(ck["disc"])
            opt_d.load_state_dict(ck["opt_d"])
        g.set_state(ck["data_rng"])
        torch.set_rng_state(ck["torch_rng"])
        step = int(ck["step"])
        base_sha = ck.get("base_sha256", base_sha)
        log(f"resumed from {ckpt_path} at step {step}")
    for m in (model, model_ema, disc):
        if m is not None:
            m.to(dev)
            if dev.type == "cpu":
                m.to(memory_format=torch.channels_last)
    perc = Perceptual(cfg.perceptual, dev) if cfg.w_perc > 0 else None
    use_amp = cfg.bf16 and (dev.type == "cpu" or torch.cuda.is_bf16_supported())
    n_params = sum(p.numel() for p in params)
    log(f"config {arch.to_json()}")
    log(f"unet params {n_params}, device {dev}, bf16 {use_amp}, perceptual {perc.kind if perc else 'off'}, "
        f"adversarial {'on' if disc else 'off'}, images {len(pool)}/{len(data.img)} usable at crop {crop}")

    def save() -> None:
        state = {"model": model.state_dict(), "ema": model_ema.state_dict(), "opt": opt.state_dict(),
                 "step": step, "config": arch.to_json(), "encoder": encoder_id, "data_rng": g.get_state(),
                 "torch_rng": torch.get_rng_state(), "base_sha256": base_sha, "command": command,
                 "cache": str(cpath)}
        if disc is not None:
            state["disc"], state["opt_d"] = disc.state_dict(), opt_d.state_dict()
        atomic_torch_save(state, ckpt_path)

    grid_times = torch.tensor(sorted({round(x, 6) for n in cfg.t_grid_steps for x in time_grid(n, arch.schedule)[:-1]}))
    weights = {"vel": cfg.w_vel, "perc": cfg.w_perc, "adv": cfg.w_adv}
    acc: dict[str, float] = {}
    n_acc = 0
    gam = arch.gamma
    # bf16 on CUDA as on the CPU (use_amp checked support): fp16 autocast would need a grad scaler
    amp = lambda on: autocast(dev, on, torch.bfloat16)  # noqa: E731
    with Stop(cfg.max_minutes, lambda: log("interrupt: checkpointing after this step (Ctrl-C again to abort)")) as stop:
        last_save = stop.start
        while step < cfg.steps and not stop.interrupted:
            if stop.timed_out():
                log(f"max_minutes {cfg.max_minutes} reached")
                break
            x, z, b = data.batch(batch, crop, g, pool)
            x, z = x.to(dev), z.to(dev)
            b = b.to(dev) if b is not None else None
            cl = dict(memory_format=torch.channels_last) if dev.type == "cpu" else {}
            with torch.no_grad():
                cond = model.condition(z, base=b)  # cached base: the TAE decoder is not rerun
                x0 = arch.data_scale * (x - b if b is not None else x)
                t = torch.sigmoid(torch.randn(batch, device=dev))  # logit-normal(0, 1) [3.3]
                if cfg.t_grid_frac > 0:  # some t exactly where few-step sampling evaluates G
                    pick = torch.rand(batch, device=dev) < cfg.t_grid_frac
                    idx = torch.randint(len(grid_times), (batch,), device=dev)
                    t = torch.where(pick, grid_times.to(dev)[idx], t)
                tt = t.view(-1, 1, 1, 1)
                eps = torch.randn_like(x0)
                x_t = ((1 - tt) * gam * x0 + tt * eps).contiguous(**cl)  # Eq. 5 with gamma [3.3]
                v_target = eps - gam * x0
            for pg in opt.param_groups:
                pg["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
            with amp(use_amp):
                v = model.step_cond(x_t, t, cond.contiguous(**cl))
            losses: dict[str, torch.Tensor] = {}
            if cfg.w_vel > 0:
                losses["vel"] = F.mse_loss(v, v_target)  # Eq. 9
            x0_hat = None
            if perc is not None or disc is not None:
                x0_hat = model.x0_hat(x_t, t, v, cond)  # Eq. 10, pixels in [-1, 1]
            if perc is not None:
                with amp(use_amp and perc.kind == "lpips"):
                    losses["perc"] = perc(x0_hat, x)
            adv_on = disc is not None and step >= cfg.adv_start
            x_in = (x_t / flow_scale(tt, arch)).detach()
            if adv_on:
                disc.requires_grad_(False)
                with amp(use_amp):
                    logits = disc(x0_hat, x_in, t)
                losses["adv"] = F.softplus(-logits.float()).mean()  # non-saturating G loss
            total = sum(weights[k] * v_ for k, v_ in losses.items())
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if adv_on:  # discriminator: real (x_0, x_t) vs fake (x0_hat, x_t) [Eq. 12]
                disc.requires_grad_(True)
                real = x.detach().requires_grad_(step % cfg.r1_every == 0 and cfg.r1 > 0)
                with amp(use_amp):
                    lr_ = disc(real, x_in, t).float()
                    lf_ = disc(x0_hat.detach(), x_in, t).float()
                d_loss = F.softplus(-lr_).mean() + F.softplus(lf_).mean()
                if real.requires_grad:  # lazy R1 (Mescheder et al. 2018), scaled by the interval
                    (gr,) = torch.autograd.grad(lr_.sum(), real, create_graph=True)
                    r1_pen = gr.float().pow(2).flatten(1).sum(1).mean()
                    d_loss = d_loss + 0.5 * cfg.r1 * cfg.r1_every * r1_pen
                    losses["r1"] = r1_pen.detach()
                for pg in opt_d.param_groups:
                    pg["lr"] = disc_lr * min(1.0, (step + 1 - cfg.adv_start) / max(1, warmup))
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                losses["d"] = d_loss.detach()
            step += 1
            ema_update(model_ema.unet, model.unet, ema_decay_at(step, cfg.ema))
            for k, v_ in losses.items():
                acc[k] = acc.get(k, 0.0) + float(v_.detach())
            acc["total"] = acc.get("total", 0.0) + float(total.detach())
            n_acc += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                el = time.time() - stop.start
                log(f"step {step}/{cfg.steps} " + " ".join(f"{k} {v_ / n_acc:.5f}" for k, v_ in acc.items())
                    + f" ({el / 60:.1f} min)")
                acc, n_acc = {}, 0
            if not math.isfinite(float(total.detach())):
                raise RuntimeError(f"training diverged at step {step} (loss {float(total.detach())})")
            if time.time() - last_save >= cfg.save_every_minutes * 60:
                save()
                last_save = time.time()
    save()
    log(f"checkpoint {ckpt_path} at step {step}" + (" (interrupted)" if stop.interrupted else ""))
    summary: dict = {"checkpoint": str(ckpt_path), "step": step, "log": str(log_path),
                     "config": json.loads(arch.to_json()), "interrupted": stop.interrupted,
                     "unet_params": n_params}
    if cfg.export:
        info = export_weights(out_dir, out_dir / EXPORT_NAME, cfg.export_dtype, command)
        log(f"exported EMA weights {info['path']} sha256 {info['sha256']} ({info['size']} bytes)")
        summary["export"] = info
    return summary


# ============================================================================= evaluation
@torch.no_grad()
def eval_nfe(weights: Path, encoder_id: str, data_dir: Path, nfes=(1, 2, 3, 5, 10), crop: int = 256,
             seed: int = 0, deterministic: bool = True, progress: Progress | None = None,
             schedule: str | None = None) -> dict:
    """PSNR/SSIM on center crops (side min(crop, H, W) rounded down to the latent factor) of every
    image in ``data_dir`` (and its subfolders): the encoder's own decoder vs the eps decoder at each
    NFE, same latents.

    The eps decoder's base reconstruction is the encoder model's decoder output computed once per
    image (the same TAE weights the eps file carries), so every NFE costs only its UNet evaluations;
    the result equals ``EpsDecoder.forward`` with ``steps = n``. ``schedule`` overrides the
    decoder's time grid ("reversed_log" or "uniform"; paper 004 Table 4 spacing ablation).
    """
    from vaepack import metrics
    from vaepack.samplers import SCHEDULES, make_noise, sample
    from vaepack.vae import load_torch_vae

    if schedule is not None and schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule '{schedule}' ({', '.join(SCHEDULES)})")
    vae = load_torch_vae(encoder_id, device="cpu")
    dec = load_eps_decoder(Path(weights))
    dec.seed, dec.deterministic_noise = seed, deterministic
    if schedule is not None:
        dec.schedule = schedule
    f = vae.factor
    res: dict = {"base": {"psnr": [], "ssim": []}, **{n: {"psnr": [], "ssim": []} for n in nfes}}
    for p in training_images(data_dir):
        x = load_image(p)
        s = (min(crop, x.shape[1], x.shape[2]) // f) * f
        y0, x0 = (x.shape[1] - s) // 2, (x.shape[2] - s) // 2
        x = x[None, :, y0:y0 + s, x0:x0 + s]
        z = vae.encode(x)
        yb = vae.decode(z)
        res["base"]["psnr"].append(metrics.psnr(yb, x))
        res["base"]["ssim"].append(metrics.ssim(yb, x))
        cond = dec.condition(z, base=yb * 2 - 1 if dec.base is not None else None)
        noise = make_noise(dec.image_shape(z), seed=dec.seed, deterministic=dec.deterministic_noise,
                           origin=dec.noise_origin)
        memo: dict = {}

        def model_fn(x_t, t, c):  # every NFE starts with the same evaluation at (noise, t = 1)
            if float(t[0]) != 1.0:
                return dec.step_cond(x_t, t, c)
            if "v1" not in memo:
                memo["v1"] = dec.step_cond(x_t, t, c)
            return memo["v1"]

        for n in nfes:
            xs = sample(model_fn, cond, n, noise=noise, schedule=dec.schedule)
            y = ((dec.finish(xs, cond) + 1) / 2).clamp(0, 1)
            res[n]["psnr"].append(metrics.psnr(y, x))
            res[n]["ssim"].append(metrics.ssim(y, x))
        if progress:
            progress(f"{p.name} {s}x{s} base {res['base']['psnr'][-1]:.2f} dB " +
                     " ".join(f"nfe{n} {res[n]['psnr'][-1]:.2f}" for n in nfes))
    out = {str(k): {m: sum(v[m]) / len(v[m]) for m in ("psnr", "ssim")} for k, v in res.items()}
    out["images"] = len(res["base"]["psnr"])
    return out
