"""Train a Bridge (paper 001): frozen source decoder up to a tap + a projector into another VAE space.

The training pairs: ``crops_per_image`` random ``crop`` px crops of every training photo (random
mirror), each encoded once by the frozen source encoder (the input z) and the frozen target encoder
(the target E_t(x)), and cached in ``pairs.pt``. Both encoders see the *crop*, so the pairs have the
edges an encoded image has and the bridge learns them too (a whole-image target cropped would not).
Each step runs the frozen tap on a batch of cached z (cheap for the latent/s0/s1 taps) and trains the
projector on

    w_mse * MSE(P, T) + w_l1 * L1(P, T) + w_attn * KL(A(T) || A(P)),

A(.) = row softmax of the cosine token affinities / tau (``attention_fidelity``), optionally
+ w_feat * the adapter's output vs the target encoder's own features at the point where the bridge
enters it (the crops are cached too, so those features are computed per batch). The projector
starts from the target encoder's own layers (``vaepack.models.bridge.warm_start``); the exported
weights are the EMA.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.errors import UsageError
from vaepack.models import bridge as B
from vaepack.models import tae
from vaepack.train.common import (StepLog, Stop, atomic_torch_save, autocast, ema_decay_at, ema_update, export_safetensors,
                                  load_images, log, provenance, resume_checkpoint, run_summary,
                                  training_session, warmup_cosine_lr)
from vaepack.train.config import BridgeTrainConfig

Progress = Callable[[dict], None]  # {"phase": "pairs" | "train", "step", "total", "loss", "steps_per_s"}
PAIRS_VERSION = 2


# ----------------------------------------------------------------------------- the loss
def attention_fidelity(pred: torch.Tensor, target: torch.Tensor, tau: float = 0.1, max_tokens: int = 32) -> torch.Tensor:
    """KL(A(target) || A(pred)) averaged over query tokens and the batch, with A the row softmax of
    <t_i, t_j> / tau over L2-normalised tokens (channels = token features), the latents average-pooled
    to at most ``max_tokens`` per side first. It asks the prediction to relate positions to each other
    as the target does (which tokens look alike), independent of a global scale."""
    h, w = pred.shape[-2:]
    if max(h, w) > max_tokens:
        size = (min(h, max_tokens), min(w, max_tokens))
        pred, target = F.adaptive_avg_pool2d(pred, size), F.adaptive_avg_pool2d(target, size)
    p = F.normalize(pred.flatten(2).transpose(1, 2).float(), dim=-1)  # (B, N, C)
    t = F.normalize(target.flatten(2).transpose(1, 2).float(), dim=-1)
    logp = torch.log_softmax(p @ p.transpose(1, 2) / tau, dim=-1)
    logt = torch.log_softmax(t @ t.transpose(1, 2) / tau, dim=-1)
    return (logt.exp() * (logt - logp)).sum(-1).mean()


def bridge_loss(pred: torch.Tensor, target: torch.Tensor, cfg: BridgeTrainConfig, feats: torch.Tensor | None = None,
                feats_target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The loss terms and their weighted sum ``loss``; ``feat`` (adapter output vs the target encoder's
    own features at the entry point, MSE / their variance) when ``cfg.w_feat`` > 0."""
    terms = {"mse": F.mse_loss(pred, target), "l1": F.l1_loss(pred, target)}
    if cfg.w_attn > 0:
        terms["attn"] = attention_fidelity(pred, target, cfg.attn_tau, cfg.attn_max_tokens)
    if cfg.w_feat > 0 and feats is not None and feats_target is not None:
        terms["feat"] = F.mse_loss(feats, feats_target) / feats_target.var().clamp_min(1e-8)
    terms["loss"] = (cfg.w_mse * terms["mse"] + cfg.w_l1 * terms["l1"] + cfg.w_attn * terms.get("attn", 0.0)
                     + cfg.w_feat * terms.get("feat", 0.0))
    return terms


# ----------------------------------------------------------------------------- the frozen parts
def frozen_parts(source: str, target: str, device: torch.device):
    """(source encoder, source decoder, its roles, target encoder, {sha256 by part}) in eval mode, fp32.
    The source must be a TAE-family model (its decoder is cut by role), the target any encoder."""
    from vaepack.loader import load_part

    senc, sentry, ssha = load_part(source, "encoder")
    sdec, _, sdsha = load_part(source, "decoder")
    tenc, tentry, tsha = load_part(target, "encoder")
    spec = sentry.part("decoder")
    if spec.family != "tae":
        raise UsageError(f"the bridge's source decoder must be a TAE model; '{source}' is '{spec.family}'")
    roles = tae.roles("decoder", tae.TAEConfig(**spec.config))
    if sentry.space.name == tentry.space.name:
        raise UsageError(f"'{source}' and '{target}' share the '{sentry.space.name}' space: nothing to bridge")
    mods = [m.to(device).eval().float().requires_grad_(False) for m in (senc, sdec, tenc)]
    shas = {"source_encoder": ssha, "source_decoder": sdsha, "target_encoder": tsha}
    return mods[0], mods[1], roles, mods[2], shas, sentry, tentry


# ----------------------------------------------------------------------------- training pairs
def training_crops(cfg: BridgeTrainConfig) -> torch.Tensor:
    """uint8 (N, 3, crop, crop): ``crops_per_image`` random crops of every photo, each mirrored with
    probability 1/2, in a fixed order from ``cfg.seed``; with ``cfg.min_scale`` < 1 each crop comes
    from the photo shrunk (antialiased bilinear, vaepack.tiling.resize) by a random factor in
    [min_scale, 1], never below the crop size; with ``cfg.rot90`` each crop is also turned by a random
    multiple of 90 degrees (with the mirror: the 8 symmetries of the square). More views of the same
    279 photos (the bridge's limit was its training set, benchmarks/results/bridge.md)."""
    from vaepack.tiling import resize

    rng = random.Random(cfg.seed)
    images = load_images(cfg.data_dir, min_side=cfg.crop)
    crops = []
    for _, img in images:
        _, h0, w0 = img.shape
        for _ in range(cfg.crops_per_image):
            src = img
            if cfg.min_scale < 1:
                s = max(rng.uniform(cfg.min_scale, 1.0), cfg.crop / min(h0, w0))
                size = (max(cfg.crop, round(h0 * s)), max(cfg.crop, round(w0 * s)))
                if size != (h0, w0):
                    src = (resize(img[None].float() / 255, size)[0].clamp(0, 1) * 255).round().to(torch.uint8)
            _, h, w = src.shape
            y, x = rng.randint(0, h - cfg.crop), rng.randint(0, w - cfg.crop)
            c = src[:, y:y + cfg.crop, x:x + cfg.crop]
            c = c.flip(-1) if rng.random() < 0.5 else c
            if cfg.rot90:  # drawn only when asked, so the crops (and caches) without it stay as they were
                c = torch.rot90(c, rng.randrange(4), (-2, -1))
            crops.append(c)
    return torch.stack(crops)


def pairs_key(cfg: BridgeTrainConfig, shas: dict) -> dict:
    return {"version": PAIRS_VERSION, "data": str(cfg.data_dir.resolve()), "crop": cfg.crop,
            "crops_per_image": cfg.crops_per_image, "seed": cfg.seed, "min_scale": cfg.min_scale,
            "pairs_backend": cfg.pairs_backend, **({"rot90": True} if cfg.rot90 else {}),
            "source_encoder": shas["source_encoder"], "target_encoder": shas["target_encoder"]}


def source_runtime(cfg: BridgeTrainConfig):
    """The source model on ``cfg.pairs_backend`` (None for torch: the frozen fp32 modules are used),
    for the pairs' latents and, with the rgb tap, their decoded images."""
    if cfg.pairs_backend == "torch":
        return None
    from vaepack.runtime import load_vae

    parts = ("encoder", "decoder") if cfg.tap == "rgb" else ("encoder",)
    return load_vae(cfg.source, parts=parts, device=cfg.device, dtype=None, backend=cfg.pairs_backend)


@torch.no_grad()
def build_pairs(cfg: BridgeTrainConfig, senc: nn.Module, tenc: nn.Module, shas: dict, device: torch.device,
                progress: Progress | None = None, runtime=None) -> dict:
    """The training crops (``x``, uint8) through both frozen encoders (``z``, ``t``, fp16), cached in
    ``cfg.cache_path`` (reused when made from the same photos, crops, weights and runtime). The target
    always in torch fp32; the source in fp32 or on ``runtime`` (a ``VAE`` from ``source_runtime``)."""
    path = cfg.cache_path or cfg.out_dir / "pairs.pt"
    key = pairs_key(cfg, shas)
    if path.exists():
        c = torch.load(path, weights_only=True)
        if c.get("key") == key:
            log.info("training pairs from %s (%d crops)", path, c["z"].shape[0])
            return c
        log.info("%s was made with other options; rebuilding", path)
    t0 = time.time()
    x = training_crops(cfg)
    zs, ts = [], []
    for i in range(0, x.shape[0], 16):
        x01 = x[i:i + 16].to(device).float() / 255
        zs.append((runtime.encode(x01) if runtime is not None else senc(x01)).half().cpu())
        ts.append(tenc(x01).half().cpu())
        if progress:
            progress({"phase": "pairs", "step": min(i + 16, x.shape[0]), "total": x.shape[0]})
    out = {"key": key, "x": x, "z": torch.cat(zs), "t": torch.cat(ts)}
    atomic_torch_save(out, path)
    log.info("encoded %d crops in %.0f s -> %s", x.shape[0], time.time() - t0, path)
    return out


@torch.no_grad()
def tap_features(tap: nn.Module, z_all: torch.Tensor, device: torch.device, cfg: BridgeTrainConfig,
                 pairs_key: dict, decoder_sha: str, runtime=None) -> torch.Tensor | None:
    """The frozen tap's output for every training pair, computed once (fp16) and kept beside the pair
    cache (``<cache>.tap-<tap>.pt``), when it fits in ``cfg.cache_tap_gb``: the deep taps (s2, rgb)
    cost more than the projector's training step. With a ``runtime`` (rgb tap), its decoder decodes:
    the images a converted latent's bridge sees when the tap runs on that runtime."""
    path = (cfg.cache_path or cfg.out_dir / "pairs.pt").with_suffix(f".tap-{cfg.tap}.pt")
    key = {"pairs": pairs_key, "source_decoder": decoder_sha, "tap": cfg.tap, "bf16": cfg.bf16,
           "runtime": runtime.runtime("decoder") if runtime is not None and cfg.tap == "rgb" else None}
    if runtime is not None and cfg.tap == "rgb":
        tap = runtime.decode
    if path.exists():
        c = torch.load(path, weights_only=True)
        if c.get("key") == key:
            log.info("tap features from %s", path)
            return c["f"]
    with autocast(device, cfg.bf16):
        one = tap(z_all[:1].to(device).float())
    gb = one.numel() * 2 * z_all.shape[0] / 2**30
    if gb > cfg.cache_tap_gb:
        if runtime is not None and cfg.tap == "rgb":  # per step they would come from torch, not the runtime
            raise UsageError(f"the decoded crops would take {gb:.1f} GB, over the {cfg.cache_tap_gb:.1f} GB tap cache "
                             f"that --pairs-backend {cfg.pairs_backend} needs",
                             hint="use fewer --crops-per-image, or --pairs-backend torch")
        log.info("tap features would take %.1f GB (> %.1f): computed per step", gb, cfg.cache_tap_gb)
        return None
    t0, out = time.time(), []
    for i in range(0, z_all.shape[0], 16):
        with autocast(device, cfg.bf16):
            out.append(tap(z_all[i:i + 16].to(device).float()).half().cpu())
    log.info("tap features of %d pairs (%.1f GB) in %.0f s", z_all.shape[0], gb, time.time() - t0)
    f = torch.cat(out)
    atomic_torch_save({"key": key, "f": f}, path)
    return f


# ----------------------------------------------------------------------------- the run

def frozen_layers(model: B.Bridge, n: int, start: int) -> int:
    """Freeze the projector's first ``n`` layers after ``start`` (they keep the warm start; the EMA copies
    them unchanged); they must end before the latent skip enters. Returns ``n``."""
    if not n:
        return 0
    most = min(min(model.skip_at, default=len(model.layers)), len(model.layers) - 1) - start
    if n > most:
        raise UsageError(f"--freeze {n}: only the first {most} layers of this projector come before "
                         f"{'the latent skip enters' if model.skip_at else 'its output conv'}",
                         hint=f"use --freeze {most} or less")
    model.layers[start:start + n].requires_grad_(False)
    return n


def bridge_meta(cfg: BridgeTrainConfig, bcfg: B.BridgeConfig) -> dict:
    return {"source": cfg.source, "target": cfg.target, "tap": bcfg.tap, "tap_channels": bcfg.tap_channels,
            "target_channels": bcfg.target_channels, "width": bcfg.width,
            "blocks": list(bcfg.blocks) if bcfg.blocks else None, "adapter_blocks": bcfg.adapter_blocks,
            "latent_skip": bcfg.latent_skip, "skip_stages": bcfg.skip_stages,
            **({"skip_hidden": bcfg.skip_hidden} if bcfg.skip_hidden else {}),  # older runs stay resumable
            **({"freeze": cfg.freeze} if cfg.freeze else {}),  # training only: not part of the exported config
            **({"l2sp": cfg.l2sp} if cfg.l2sp else {})}


def run_train_bridge(cfg: BridgeTrainConfig, progress: Progress | None = None) -> dict:
    """Train (or continue, ``cfg.resume``) a bridge in ``cfg.out_dir``; exports ``bridge.safetensors``
    (EMA, fp16) with its config and provenance. Returns a summary dict."""
    cfg.validate()
    with training_session(cfg.out_dir, cfg.resume, cfg.threads, cfg.device, cfg.seed) as (run_dir, ckpt, device, rng):
        senc, sdec, roles, tenc, shas, sentry, tentry = frozen_parts(cfg.source, cfg.target, device)
        runtime = source_runtime(cfg)
        pairs = build_pairs(cfg, senc, tenc, shas, device, progress, runtime)
        del senc
        tap = B.Tap(sdec, roles, cfg.tap).eval()
        bcfg = B.BridgeConfig(tap=cfg.tap, tap_channels=tap.out_channels(sentry.space.channels),
                              target_channels=tentry.space.channels, blocks=cfg.blocks,
                              adapter_blocks=cfg.adapter_blocks,
                              latent_skip=sentry.space.channels if cfg.latent_skip else 0,
                              skip_stages=max(1, cfg.latent_skip), skip_hidden=cfg.skip_hidden)
        model = B.Bridge(bcfg).to(device)
        if cfg.warm_start:
            n = B.warm_start(model, {k: v.float() for k, v in tenc.state_dict().items()})
            log.info("warm start: %d tensors from %s's encoder", n, cfg.target)
        # The target encoder's layers before the bridge's entry point give the adapter's feature target.
        prefix = tenc[:B.entry_index(bcfg)] if cfg.w_feat > 0 and bcfg.tap != "rgb" else None
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        if cfg.train == "skip":  # only the latent-skip convs learn: the projector stays the target encoder
            model.requires_grad_(False)
            model.skip.requires_grad_(True)
        start = 0 if bcfg.tap == "rgb" else 1  # where the projector's tail begins (after the adapter)
        n_frozen = frozen_layers(model, cfg.freeze, start)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        # L2-SP's anchor: the warm start itself (taken before a resume loads the trained weights)
        anchor = [(p, p.detach().clone()) for p in model.layers.parameters() if p.requires_grad] if cfg.l2sp else []
        meta = bridge_meta(cfg, bcfg)
        step = 0
        c = resume_checkpoint(ckpt, meta, device, rng, "bridge")
        if c is not None:
            model.load_state_dict(c["model"])
            ema.load_state_dict(c["ema"])
            opt.load_state_dict(c["opt"])
            step = c["step"]

        def save():
            atomic_torch_save({"meta": meta, "model": model.state_dict(), "ema": ema.state_dict(),
                               "opt": opt.state_dict(), "step": step, "rng": rng.getstate(),
                               "torch_rng": torch.get_rng_state(), "shas": shas}, ckpt)

        z_all, t_all, x_all = pairs["z"], pairs["t"], pairs["x"]
        f_all = tap_features(tap, z_all, device, cfg, pairs["key"], shas["source_decoder"], runtime) \
            if cfg.cache_tap_gb > 0 else None
        n_pairs = z_all.shape[0]
        slog = StepLog(cfg.steps, cfg.log_every, step, cfg.save_every_minutes, progress)
        with Stop(cfg.max_minutes) as stop:
            while step < cfg.steps and not stop.interrupted and not stop.timed_out():
                idx = torch.tensor([rng.randrange(n_pairs) for _ in range(cfg.batch)])
                z, t = z_all[idx].to(device).float(), t_all[idx].to(device).float()
                with torch.no_grad(), autocast(device, cfg.bf16):
                    feats = f_all[idx].to(device).float() if f_all is not None else tap(z)
                    ft = prefix(x_all[idx].to(device).float() / 255).float() if prefix is not None else None
                for g in opt.param_groups:
                    g["lr"] = warmup_cosine_lr(step, cfg.steps, cfg.lr)
                with autocast(device, cfg.bf16):
                    a = model.adapt(feats)
                    h = a
                    if n_frozen:  # the frozen leading layers need no graph
                        with torch.no_grad():
                            h = model.layers[start:start + n_frozen](a)
                    pred = model.tail(h, start + n_frozen, z if bcfg.latent_skip else None)
                terms = bridge_loss(pred.float(), t, cfg, a.float(), ft)
                if anchor:
                    terms["l2sp"] = sum(((p - p0) ** 2).sum() for p, p0 in anchor)
                    terms["loss"] = terms["loss"] + cfg.l2sp * terms["l2sp"]
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                opt.step()
                ema_update(ema, model, ema_decay_at(step, cfg.ema))
                step += 1
                slog.add(step, terms)
                if slog.due_save():
                    save()
        save()
        return run_summary(step, cfg.steps, str(export_bridge(run_dir, cfg.command)), slog.minutes, meta, pairs=n_pairs)


def export_bridge(run_dir: str | Path, command: str | None = None, out: str | Path | None = None) -> Path:
    """The EMA weights of a run's checkpoint as ``bridge.safetensors`` (fp16) with config and provenance."""
    import json

    run_dir = Path(run_dir)
    c = torch.load(run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")
    # the exported config: architecture + spaces (freeze and l2sp are training only)
    conf = {k: v for k, v in c["meta"].items() if k not in ("freeze", "l2sp")}
    model = B.Bridge(B.BridgeConfig(**{k: v for k, v in conf.items() if k not in ("source", "target")}))
    model.load_state_dict(c["ema"])
    meta = provenance(command, kind="bridge", config=json.dumps(conf, sort_keys=True), steps=c["step"],
                      **{f"{k}_sha256": v for k, v in c["shas"].items()})
    return export_safetensors(model, Path(out) if out else run_dir / "bridge.safetensors", meta)
