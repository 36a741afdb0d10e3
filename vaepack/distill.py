"""Distillation of compact encoders and decoders from a teacher autoencoder (paper 000, III-C).

Encoder: the student regresses the teacher's latent with Huber(beta=0.15), Adam lr 7.5e-4, a 128 px
stage then a 256 px stage (paper 000, IV-B). Decoder: a small decoder regresses the teacher
decoder's image plus an L1 pixel loss against the ground truth, from the teacher encoder's latents.

CPU budget tricks (documented because they change what "a step" means versus the paper):
- Teacher outputs are computed once per image view and cached in the run directory (the teacher
  encoder costs more than a student forward+backward). A view is the whole image at a scale
  (1x, and 1.5x bilinear like the paper-000 evaluation protocol, table III "Bilinear Pre") and
  optionally mirrored. Crops are taken on the 8 px latent grid, so a crop's target is the teacher
  latent computed with the full image as context; crop edges that are not image edges are masked
  out of the loss (``border`` latent pixels), since the student cannot see that context.
- Flips are applied to the whole image before the teacher runs (a conv net is not flip
  equivariant, so flipping a cached latent would give a wrong target).
- Warm-up then cosine LR decay, and an EMA of the weights, which is what gets exported.

Everything a run needs to continue lives in ``run_dir``: ``checkpoint.pt`` (atomic writes),
``teacher_cache.pt``, ``train.log``. Re-running the same call resumes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ImageError, UsageError, VaepackError

from vaepack.io import IMAGE_SUFFIXES as IMAGE_EXTS  # one list of readable image suffixes
DEFAULT_SCHEDULE: tuple[tuple[int, int], ...] = ((128, 10000), (256, 10000))
HUBER_BETA = 0.15  # paper 000, eq. (1)
LR = 7.5e-4  # paper 000, IV-B

log = logging.getLogger("vaepack.distill")


# --------------------------------------------------------------------------------------- utils
def count_macs(model: nn.Module, shape) -> int:
    """Multiply-accumulates of one forward pass (convs and linears only; they are >99% of the cost)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        p = next(model.parameters(), None)
        with torch.no_grad():
            model(torch.zeros(shape, dtype=p.dtype if p is not None else torch.float32))
    finally:
        for h in hs:
            h.remove()
    return total


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def list_images(data_dir: str | os.PathLike) -> list[Path]:
    d = Path(data_dir)
    if not d.is_dir():
        raise ImageError("is not a folder", path=str(d), hint="pass a folder of training images")
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ImageError(
            "contains no images", path=str(d), hint=f"add {'/'.join(sorted(IMAGE_EXTS))} files or pick another folder"
        )
    return files


def load_rgb(path: Path) -> torch.Tensor:
    """uint8 (3, H, W) under vaepack's one image policy (vaepack.io.load_image: EXIF orientation,
    transparency on white, 16-bit, size guard), so training sees images as `encode` does."""
    from vaepack.io import load_image

    return load_image(path).mul(255).round().to(torch.uint8)


def load_images(data_dir, min_side: int = 16) -> list[tuple[Path, torch.Tensor]]:
    """All readable images of a folder; unreadable or too small ones are skipped with a warning."""
    out, bad = [], []
    for p in list_images(data_dir):
        try:
            img = load_rgb(p)
        except ImageError as e:
            bad.append(str(e))
            log.warning("skipping %s", e)
            continue
        if min(img.shape[1:]) < min_side:
            bad.append(f"{p}: smaller than {min_side} px")
            log.warning("skipping %s: smaller than %d px", p, min_side)
            continue
        out.append((p, img))
    if not out:
        raise ImageError(
            f"no readable images ({len(bad)} skipped, first: {bad[0]})", path=str(data_dir), hint="fix or replace the files"
        )
    return out


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Float (B,3,H,W) resize: bilinear with antialias (paper 000 table III: bilinear 'pre')."""
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16)


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from .errors import BackendUnavailableError

        raise BackendUnavailableError("CUDA requested but not available", hint="use --device cpu")
    return torch.device(device)


def _progress(state, schedule, budget_minutes: float | None) -> float:
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


# ---------------------------------------------------------------------------------- the pool
@dataclass
class View:
    image: torch.Tensor  # uint8 (3, H, W), H and W multiples of 8
    latent: torch.Tensor  # fp16 (C, H/8, W/8): teacher encoder output on the whole view
    decoded: torch.Tensor | None = None  # uint8 (3, H, W): teacher decoder output (decoder runs)


def _pool_state(pool: list[View]) -> list[dict]:
    # Plain dicts of tensors, so the cache loads whatever module name this file ran under.
    return [{"image": v.image, "latent": v.latent, "decoded": v.decoded} for v in pool]


def _pool_from_state(items) -> list[View]:
    return [View(**d) if isinstance(d, dict) else View(d.image, d.latent, d.decoded) for d in items]


def _views_of(img: torch.Tensor, views: Sequence[tuple], factor: int, rng: random.Random, max_side: int | None):
    """Float (1,3,h,w) views of an image, sizes on the latent grid.

    A view is ``(scale, flip[, reup[, reup_prob]])``: resize by ``scale``; mirror if ``flip`` (True,
    False or "random"); with probability ``reup_prob`` downscale by ``reup`` and upscale back, so the
    view has the content of an image enlarged ``reup`` times (what the student sees in the paper-000
    1.5x protocol) at the teacher cost of a 1x view. ``max_side`` then keeps a random window.
    """
    x = img[None].float() / 255
    for view in views:
        scale, flip = float(view[0]), view[1]
        reup = float(view[2]) if len(view) > 2 else 1.0
        if len(view) > 3 and rng.random() >= float(view[3]):
            reup = 1.0
        h = max(factor, int(round(img.shape[1] * scale / factor)) * factor)
        w = max(factor, int(round(img.shape[2] * scale / factor)) * factor)
        if reup != 1.0:
            v = _resize(_resize(x, max(1, round(h / reup)), max(1, round(w / reup))), h, w)
        else:
            v = _resize(x, h, w)
        if max_side:
            wh, ww = min(h, max_side // factor * factor), min(w, max_side // factor * factor)
            y0 = rng.randint(0, (h - wh) // factor) * factor
            x0 = rng.randint(0, (w - ww) // factor) * factor
            v = v[..., y0:y0 + wh, x0:x0 + ww]
        if flip == "random":
            flip = rng.random() < 0.5
        yield v.flip(-1) if flip else v


@torch.no_grad()
def build_pool(
    images: list[tuple[Path, torch.Tensor]],
    teacher: nn.Module,
    views: Sequence[tuple[float, bool | str]],
    device: torch.device,
    factor: int = 8,
    teacher_bf16: bool = False,
    teacher_decoder: nn.Module | None = None,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
    max_side: int | None = None,
) -> list[View]:
    rng = random.Random(seed)
    pool: list[View] = []
    t0 = time.time()
    for i, (path, img) in enumerate(images):
        for v in _views_of(img, views, factor, rng, max_side):
            v = v.to(device)
            with _autocast(device, teacher_bf16):
                z = teacher(v).float()
            if z.shape[-2:] != (v.shape[-2] // factor, v.shape[-1] // factor):
                raise VaepackError(
                    f"teacher latent {tuple(z.shape)} is not the image size / {factor}",
                    hint="the teacher must be a factor-8 encoder",
                )
            dec = None
            if teacher_decoder is not None:
                with _autocast(device, teacher_bf16):
                    dec = teacher_decoder(z).float().clamp(0, 1)
                dec = (dec[0] * 255).round().to(torch.uint8).cpu()
            pool.append(View((v[0] * 255).round().to(torch.uint8).cpu(), z[0].half().cpu(), dec))
        if progress:
            progress({"phase": "teacher", "step": i + 1, "total": len(images), "elapsed": time.time() - t0})
    return pool


def _sample_batch(pool: list[View], crop: int, batch: int, factor: int, border: int, rng: random.Random, decoded: bool):
    """Random crops on the latent grid. Returns images, latents, loss mask (latent res), decoded."""
    smallest = min(min(v.image.shape[1:]) for v in pool)
    crop = min(crop, smallest // factor * factor)
    eligible = [v for v in pool if min(v.image.shape[1:]) >= crop]
    lc = crop // factor
    imgs, lats, masks, decs = [], [], [], []
    for _ in range(batch):
        v = rng.choice(eligible)
        lh, lw = v.latent.shape[1:]
        y, x = rng.randint(0, lh - lc), rng.randint(0, lw - lc)
        imgs.append(v.image[:, y * factor:(y + lc) * factor, x * factor:(x + lc) * factor])
        lats.append(v.latent[:, y:y + lc, x:x + lc])
        m = torch.ones(lc, lc)
        if border and lc > 2 * border:  # mask crop edges that are not image edges
            if y > 0:
                m[:border] = 0
            if y + lc < lh:
                m[-border:] = 0
            if x > 0:
                m[:, :border] = 0
            if x + lc < lw:
                m[:, -border:] = 0
        masks.append(m)
        if decoded:
            decs.append(v.decoded[:, y * factor:(y + lc) * factor, x * factor:(x + lc) * factor])
    img = torch.stack(imgs).float() / 255
    out = img, torch.stack(lats).float(), torch.stack(masks)[:, None]
    return out + ((torch.stack(decs).float() / 255,) if decoded else (None,))


def _masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.expand_as(loss)
    return (loss * mask).sum() / mask.sum().clamp_min(1)


# ------------------------------------------------------------------------------- the trainer
@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0
    work: int = 0  # sum of crop**2 over steps (the schedule's progress measure)
    finished: bool = False
    losses: list = field(default_factory=list)  # (step, ema loss)


class _Stop:
    """SIGINT sets a flag; the loop checkpoints and returns. A second Ctrl-C raises at once."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)

            def handler(sig, frame):
                if self.flag:
                    raise KeyboardInterrupt
                self.flag = True
                log.warning("interrupt: writing a checkpoint and stopping (Ctrl-C again to abort)")

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _setup_log(run_dir: Path) -> logging.Handler:
    h = logging.FileHandler(run_dir / "train.log")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.INFO)
    return h


def _train(
    *,
    kind: str,
    student: nn.Module,
    student_meta: dict,
    teacher: nn.Module,
    teacher_decoder: nn.Module | None,
    data_dir,
    run_dir,
    schedule,
    batch: int,
    lr: float,
    warmup: int,
    lr_final: float,
    lr_kind: str,
    views,
    border: int,
    pixel_weight: float,
    ckpt_every: int,
    max_minutes: float | None,
    seed: int,
    device,
    bf16: bool,
    threads: int | None,
    progress,
    teacher_id: str,
    ema_decay: float,
    cache: str | os.PathLike | None = None,
    budget_minutes: float | None = None,
    view_max_side: int | None = None,
) -> tuple[nn.Module, TrainState, Path]:
    schedule = [(int(c), int(s)) for c, s in schedule]
    if not schedule or any(c < 8 or c % 8 or s < 0 for c, s in schedule):
        raise UsageError(f"bad schedule {schedule}", hint="use crop sizes that are multiples of 8, e.g. 128:10000,256:10000")
    if batch < 1:
        raise UsageError("batch must be at least 1")
    total = sum(s for _, s in schedule)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _setup_log(run_dir)
    try:
        if threads:
            torch.set_num_threads(threads)
        device = _pick_device(device)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        teacher = teacher.to(device).eval().float()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if teacher_decoder is not None:
            teacher_decoder = teacher_decoder.to(device).eval().float()

        own = run_dir / "teacher_cache.pt"
        files = list_images(data_dir)
        key = {"teacher": teacher_id, "files": [str(p) for p in files], "views": [list(map(str, v)) for v in views],
               "decoder": teacher_decoder is not None, "max_side": view_max_side, "seed": seed}
        pool = None
        for cand in [own] + ([Path(cache)] if cache else []):
            if not cand.exists():
                continue
            cached = torch.load(cand, weights_only=False)
            ck = cached.get("key", {})
            if ck == key or (teacher_decoder is None and {**ck, "decoder": False} == key):
                # (an encoder run can reuse a decoder run's cache: the decoded images are unused extras)
                pool = _pool_from_state(cached["pool"])
            elif teacher_decoder is not None and {**ck, "decoder": True} == key:
                # Reuse another run's teacher latents (e.g. the encoder run's) and add decoded views.
                pool = _pool_from_state(cached["pool"])
                t0 = time.time()
                with torch.no_grad():
                    for i, v in enumerate(pool):
                        with _autocast(device, bf16):
                            dec = teacher_decoder(v.latent[None].float().to(device)).float().clamp(0, 1)
                        v.decoded = (dec[0] * 255).round().to(torch.uint8).cpu()
                        if progress:
                            progress({"phase": "teacher", "step": i + 1, "total": len(pool), "elapsed": time.time() - t0})
                _atomic_save({"key": key, "pool": _pool_state(pool)}, own)
            if pool is not None:
                log.info("teacher cache: %d views from %s", len(pool), cand)
                break
        if pool is None:
            images = load_images(data_dir)
            t0 = time.time()
            pool = build_pool(images, teacher, views, device, teacher_bf16=bf16, teacher_decoder=teacher_decoder,
                              seed=seed, progress=progress, max_side=view_max_side)
            _atomic_save({"key": key, "pool": _pool_state(pool)}, own)
            log.info("teacher cache: %d views of %d images in %.0fs", len(pool), len(images), time.time() - t0)

        student = student.to(device)
        channels_last = device.type == "cpu"
        if channels_last:
            student = student.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(student.parameters(), lr=lr)
        ema = copy.deepcopy(student).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
        state = TrainState()
        ckpt = run_dir / "checkpoint.pt"
        if ckpt.exists():
            c = torch.load(ckpt, weights_only=False, map_location=device)
            if c["meta"] != student_meta:
                raise UsageError(
                    "checkpoint was made with a different model config",
                    path=str(ckpt),
                    hint="use a new run dir, or the original options",
                )
            student.load_state_dict(c["student"])
            ema.load_state_dict(c["ema"])
            opt.load_state_dict(c["opt"])
            state = TrainState(**c["state"])
            rng.setstate(c["rng"])
            torch.set_rng_state(c["torch_rng"])
            log.info("resumed from %s at step %d", ckpt, state.step)

        def save():
            _atomic_save({"student": student.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                          "state": asdict(state), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                          "meta": student_meta, "schedule": schedule, "teacher_id": teacher_id,
                          "data_dir": str(data_dir)}, ckpt)

        log.info("%s distillation: %s, schedule %s, batch %d, lr %g (%s), %d views, device %s, threads %d",
                 kind, json.dumps(student_meta), schedule, batch, lr, lr_kind, len(pool), device, torch.get_num_threads())
        start = time.time()
        t_last, s_last = start, state.step
        ema_loss = state.losses[-1][1] if state.losses else None
        sec0 = state.seconds
        with _Stop() as stop:
            student.train()
            while True:
                frac = _progress(state, schedule, budget_minutes)
                if frac >= 1.0:
                    break
                crop = _crop_at(frac, schedule)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(frac, lr, warmup, state.step, lr_final, lr_kind)
                img, lat, mask, dec = _sample_batch(pool, crop, batch, 8, border, rng, kind == "decoder")
                mf = None
                if channels_last:
                    img = img.contiguous(memory_format=torch.channels_last)
                img, lat, mask = img.to(device), lat.to(device), mask.to(device)
                with _autocast(device, bf16):
                    if kind == "encoder":
                        out = student(img).float()
                        loss = _masked_mean(F.smooth_l1_loss(out, lat, beta=HUBER_BETA, reduction="none"), mask)
                    else:
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
                with torch.no_grad():
                    d = min(ema_decay, (1 + state.step) / (10 + state.step))
                    for pe, ps in zip(ema.parameters(), student.parameters()):
                        pe.lerp_(ps, 1 - d)
                    for be, bs in zip(ema.buffers(), student.buffers()):
                        be.copy_(bs)
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise VaepackError(f"loss became {lv} at step {state.step}", path=str(run_dir),
                                       hint="lower --lr or resume from the last checkpoint")
                ema_loss = lv if ema_loss is None else 0.98 * ema_loss + 0.02 * lv
                now = time.time()
                state.seconds = sec0 + now - start
                if state.step % 50 == 0:
                    sps = (state.step - s_last) / max(1e-9, now - t_last)
                    t_last, s_last = now, state.step
                    state.losses.append((state.step, ema_loss))
                    log.info("step %d/%d (%.1f%%) crop %d loss %.5f (ema %.5f) lr %.2e %.2f steps/s", state.step, total,
                             100 * frac, crop, lv, ema_loss, opt.param_groups[0]["lr"], sps)
                if progress:
                    progress({"phase": "train", "step": state.step, "total": total, "frac": frac, "loss": ema_loss, "step_loss": lv, "crop": crop,
                              "lr": opt.param_groups[0]["lr"], "steps_per_s": state.step / max(1e-9, state.seconds),
                              "elapsed": state.seconds})
                timed_out = max_minutes is not None and now - start > max_minutes * 60
                done = _progress(state, schedule, budget_minutes) >= 1.0
                if state.step % ckpt_every == 0 or stop.flag or timed_out or done:
                    save()
                if stop.flag or timed_out:
                    log.info("stopped at step %d (%s); rerun the same command to resume", state.step,
                             "interrupt" if stop.flag else "max_minutes")
                    break
            if _progress(state, schedule, budget_minutes) >= 1.0:
                state.finished = True
                save()
                log.info("finished at step %d after %.0f s of training", state.step, state.seconds)
        return ema.eval(), state, run_dir
    finally:
        log.removeHandler(handler)
        handler.close()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vaepack")
    except Exception:
        return "unknown"


def export_safetensors(module: nn.Module, path: Path, metadata: dict[str, str], fp16: bool = True) -> Path:
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16 if fp16 and v.is_floating_point() else v.dtype).contiguous().cpu()
          for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------ public API
def _load_init(model: nn.Module, path: str | os.PathLike) -> None:
    """Warm start ``model`` from a vaepack-written .safetensors of the same architecture (strict).

    A shipped student is stored BatchNorm-folded (``fused``): ``run_distill`` loads it into the folded
    network and rebuilds the BatchNorms from data (``student.unfuse_bn``) before calling this.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise VaepackError("init weights not found", path=str(path), hint="pass an existing .safetensors")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise VaepackError(f"cannot read init weights ({e})", path=str(path), hint="pass a vaepack .safetensors") from None
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"init weights do not fit the model config ({first[1].strip() if len(first) > 1 else first[0]})",
                         path=str(path), hint="use the --width/--config the weights were trained with "
                         "(their metadata 'config' field)") from None


def _calibration_batch(data_dir, seed: int, n: int = 32, crop: int = 128) -> torch.Tensor:
    """Random crops (``crop`` px, or the smallest image side if less) of up to ``n`` training images:
    the BatchNorm statistics of a warm start."""
    rng = random.Random(seed)
    files = list_images(data_dir)
    imgs = []
    for p in rng.sample(files, min(n, len(files))):
        try:
            imgs.append(load_rgb(p))
        except ImageError:
            continue
    if imgs:
        crop = max(8, min(crop, *(min(i.shape[1:]) for i in imgs)) // 8 * 8)
    crops = []
    for img in imgs:
        if min(img.shape[1:]) < crop:
            continue
        y, x = rng.randint(0, img.shape[1] - crop), rng.randint(0, img.shape[2] - crop)
        crops.append(img[:, y:y + crop, x:x + crop].float() / 255)
    if not crops:
        raise ImageError(f"no image of at least {crop} px to calibrate BatchNorm", path=str(data_dir))
    return torch.stack(crops)


def run_distill(
    teacher: nn.Module,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    width: int = 32,
    latent_channels: int | None = None,
    student_config: dict | None = None,
    schedule: Sequence[tuple[int, int]] = DEFAULT_SCHEDULE,
    batch: int = 64,
    lr: float = LR,
    warmup: int = 200,
    lr_final: float = 0.05,
    lr_kind: str = "cosine",
    views: Sequence[tuple] = ((1.0, "random", 1.5, 0.6),),
    view_max_side: int | None = 384,
    border: int = 1,
    ckpt_every: int = 200,
    max_minutes: float | None = None,
    seed: int = 0,
    device: str | None = None,
    bf16: bool = True,
    threads: int | None = None,
    progress: Callable[[dict], None] | None = None,
    teacher_id: str = "unknown",
    export_name: str | None = None,
    command: str | None = None,
    ema_decay: float = 0.999,
    budget_minutes: float | None = None,
    cache: str | os.PathLike | None = None,
    init: str | os.PathLike | None = None,
    views_per_image: int = 1,
    family: str = "student",
    init_from_teacher: bool = False,
    teacher_config=None,
) -> Path:
    """Distill an encoder from ``teacher`` (images [0,1] -> latent at H/8).

    ``family`` "student" is the paper-000 student (section III-B); "tae" is a TAE encoder, usually a
    depth-pruned copy of a TAE teacher (``student_config`` e.g. ``{"blocks": [0, 2, 3, 3], "stem":
    "s2d"}``) warm-started from it with ``init_from_teacher`` (needs ``teacher_config``, the
    teacher's TAEConfig). ``out_dir`` is the run directory (checkpoint, teacher cache, log); calling
    again resumes. Returns the exported fp16 safetensors (BatchNorm folded) once the schedule is
    complete, else the checkpoint path (stopped by ``max_minutes`` or Ctrl-C).
    """
    from .models import student as sfam, tae

    if family not in ("student", "tae"):
        raise UsageError(f"encoder family must be 'student' or 'tae', got {family!r}")
    if init_from_teacher and (family != "tae" or teacher_config is None or init):
        raise UsageError("--init-from-teacher warm-starts a 'tae' student from a TAE teacher (and excludes --init)")
    if latent_channels is None:
        with torch.no_grad():
            latent_channels = teacher.float().cpu()(torch.zeros(1, 3, 16, 16)).shape[1]
    kw = {"width": width, **(student_config or {}), "latent_channels": latent_channels}
    if family == "tae":
        cfg = tae.TAEConfig(**{"kind": "f8", "midblock_gn": True, **kw})
        model = tae.build("encoder", cfg)
        if init_from_teacher:
            tsd = (teacher.module if hasattr(teacher, "module") else teacher).float().cpu().state_dict()
            model.load_state_dict(tae_from_teacher(tsd, "encoder", cfg, teacher_config))
        elif init:
            _load_init(model, init)
    else:
        cfg = sfam.StudentConfig(**kw)
        model = sfam.build("encoder", cfg)
        if init and cfg.norm == "batch" and not cfg.fused:
            # A shipped student is BatchNorm-folded: rebuild its BatchNorms from data statistics.
            folded = sfam.build("encoder", replace(cfg, fused=True))
            _load_init(folded, init)
            model = sfam.unfuse_bn(folded, _calibration_batch(data_dir, seed))
        elif init:
            _load_init(model, init)
    meta = {"family": family, "part": "encoder", "config": asdict(cfg)}
    ema, state, run_dir = _train(
        kind="encoder", student=model, student_meta=meta, teacher=teacher, teacher_decoder=None, data_dir=data_dir,
        run_dir=out_dir, schedule=schedule, batch=batch, lr=lr, warmup=warmup, lr_final=lr_final, lr_kind=lr_kind,
        views=tuple(views) * max(1, views_per_image), border=border, pixel_weight=0.0, ckpt_every=ckpt_every, max_minutes=max_minutes, seed=seed,
        device=device, bf16=bf16, threads=threads, progress=progress, teacher_id=teacher_id, ema_decay=ema_decay,
        budget_minutes=budget_minutes, cache=cache, view_max_side=view_max_side)
    if not state.finished:
        return run_dir / "checkpoint.pt"
    out = ema.float().cpu().to(memory_format=torch.contiguous_format)
    if family == "student":
        out = sfam.fuse_bn(out)
        cfg = out.cfg
    md = _provenance(teacher_id, data_dir, schedule, state, batch, command, family, "encoder", asdict(cfg))
    name = export_name or (f"vaepack-enc-s{width}.safetensors" if family == "student" else f"vaepack-enc-tae{width}.safetensors")
    return export_safetensors(out, run_dir / name, md)


def run_distill_decoder(
    teacher_encoder: nn.Module,
    teacher_decoder: nn.Module,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    width: int = 32,
    decoder_config: dict | None = None,
    init_from_teacher: bool = True,
    pixel_weight: float = 1.0,
    schedule: Sequence[tuple[int, int]] = DEFAULT_SCHEDULE,
    batch: int = 16,
    lr: float = LR,
    warmup: int = 200,
    lr_final: float = 0.05,
    lr_kind: str = "cosine",
    views: Sequence[tuple] = ((1.0, "random", 1.5, 0.6),),
    view_max_side: int | None = 384,
    border: int = 1,
    ckpt_every: int = 200,
    max_minutes: float | None = None,
    budget_minutes: float | None = None,
    seed: int = 0,
    device: str | None = None,
    bf16: bool = True,
    threads: int | None = None,
    progress: Callable[[dict], None] | None = None,
    teacher_id: str = "unknown",
    export_name: str | None = None,
    command: str | None = None,
    ema_decay: float = 0.999,
    cache: str | os.PathLike | None = None,
    init: str | os.PathLike | None = None,
    views_per_image: int = 1,
    teacher_config=None,
) -> Path:
    """Distill a small TAE-family decoder (``vaepack.models.tae`` at ``width``) in the teacher's latent space.

    Input: the teacher encoder's latent of a crop's image; loss: L1 to the teacher decoder's image
    (clamped to [0, 1]) + ``pixel_weight`` * L1 to the ground-truth image. ``init_from_teacher``
    starts from the teacher decoder's most important channels (see ``prune_tae_decoder``), which
    converges far faster than a random init on a CPU budget; with ``teacher_config`` (the teacher's
    TAEConfig) and the teacher's width it is a depth-pruned copy instead (``tae_from_teacher``), a far
    better start. ``cache`` may point at an encoder
    run's ``teacher_cache.pt`` made with the same data, views and seed (only the decoder pass is added).
    """
    from .models import tae

    with torch.no_grad():
        latent_channels = teacher_encoder.float().cpu()(torch.zeros(1, 3, 16, 16)).shape[1]
    kw = {"kind": "f8", "midblock_gn": True, **(decoder_config or {}), "width": width, "latent_channels": latent_channels}
    cfg = tae.TAEConfig(**kw)
    model = tae.build("decoder", cfg)
    if init:
        _load_init(model, init)
    elif init_from_teacher:
        tsd = teacher_decoder.float().cpu().state_dict()
        if cfg.blocks is not None or (teacher_config is not None and cfg.width == teacher_config.width):
            if teacher_config is None:
                raise UsageError("a depth-pruned warm start needs the teacher's TAEConfig (teacher_config)")
            model.load_state_dict(tae_from_teacher(tsd, "decoder", cfg, teacher_config))  # width checked there
        else:
            model.load_state_dict(prune_tae_decoder(tsd, cfg))
    meta = {"family": "tae", "part": "decoder", "config": asdict(cfg)}
    ema, state, run_dir = _train(
        kind="decoder", student=model, student_meta=meta, teacher=teacher_encoder, teacher_decoder=teacher_decoder,
        data_dir=data_dir, run_dir=out_dir, schedule=schedule, batch=batch, lr=lr, warmup=warmup, lr_final=lr_final,
        lr_kind=lr_kind, views=tuple(views) * max(1, views_per_image), border=border, pixel_weight=pixel_weight, ckpt_every=ckpt_every,
        max_minutes=max_minutes, seed=seed, device=device, bf16=bf16, threads=threads, progress=progress,
        teacher_id=teacher_id, ema_decay=ema_decay, cache=cache, budget_minutes=budget_minutes,
        view_max_side=view_max_side)
    if not state.finished:
        return run_dir / "checkpoint.pt"
    md = _provenance(teacher_id, data_dir, schedule, state, batch, command, "tae", "decoder", asdict(cfg))
    out = ema.float().cpu().to(memory_format=torch.contiguous_format)
    return export_safetensors(out, run_dir / (export_name or f"vaepack-dec-w{width}.safetensors"), md)


@torch.no_grad()
def prune_tae_decoder(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Slice a wider TAE decoder's state dict down to ``cfg.width`` channels (a warm start).

    All residual-stream tensors share one channel set (the skips tie them together), chosen by the
    L1 norm of the weights writing and reading each channel; each block's two inner activations and
    its GroupNorm pool keep their own top channels (per GroupNorm group, so the groups survive).
    """
    from .models import tae

    w = cfg.width
    ref = tae.build("decoder", cfg)
    names = {k for k in ref.state_dict()}
    blocks = sorted({k.split(".")[0] for k in names if ".conv.0." in k}, key=int)
    stream = torch.zeros(sd["1.weight"].shape[0])
    writers = ["1.weight"] + [f"{b}.conv.4.weight" for b in blocks] + [f"{b}.pool.3.weight" for b in blocks if f"{b}.pool.3.weight" in sd]
    ups = [k for k in names if k.endswith(".weight") and k.split(".")[0] not in blocks and k != "1.weight"
           and sd[k].dim() == 4 and sd[k].shape[0] == sd[k].shape[1]]
    readers = [f"{b}.conv.0.weight" for b in blocks] + [f"{b}.pool.0.weight" for b in blocks if f"{b}.pool.0.weight" in sd]
    last = max((k for k in names if k.endswith(".weight") and sd[k].dim() == 4), key=lambda k: int(k.split(".")[0]))
    for k in writers + ups:
        stream += sd[k].abs().flatten(1).sum(1)
    for k in readers + ups + [last]:
        stream += sd[k].abs().transpose(0, 1).flatten(1).sum(1)
    S = stream.topk(w).indices.sort().values

    def top(a, b, n):
        score = sd[a].abs().flatten(1).sum(1) * sd[b].abs().transpose(0, 1).flatten(1).sum(1)
        return score.topk(n).indices.sort().values

    out = {}
    out["1.weight"], out["1.bias"] = sd["1.weight"][S], sd["1.bias"][S]
    for k in ups:
        out[k] = sd[k][S][:, S]
    out[last] = sd[last][:, S]
    out[last.replace("weight", "bias")] = sd[last.replace("weight", "bias")]
    for b in blocks:
        A = top(f"{b}.conv.0.weight", f"{b}.conv.2.weight", w)
        B = top(f"{b}.conv.2.weight", f"{b}.conv.4.weight", w)
        out[f"{b}.conv.0.weight"], out[f"{b}.conv.0.bias"] = sd[f"{b}.conv.0.weight"][A][:, S], sd[f"{b}.conv.0.bias"][A]
        out[f"{b}.conv.2.weight"], out[f"{b}.conv.2.bias"] = sd[f"{b}.conv.2.weight"][B][:, A], sd[f"{b}.conv.2.bias"][B]
        out[f"{b}.conv.4.weight"], out[f"{b}.conv.4.bias"] = sd[f"{b}.conv.4.weight"][S][:, B], sd[f"{b}.conv.4.bias"][S]
        if f"{b}.pool.0.weight" in sd:
            c_old = sd[f"{b}.pool.0.weight"].shape[0] // 4
            score = sd[f"{b}.pool.0.weight"].abs().flatten(1).sum(1) * sd[f"{b}.pool.3.weight"].abs().transpose(0, 1).flatten(1).sum(1)
            H = torch.cat([g * c_old + score[g * c_old:(g + 1) * c_old].topk(w).indices.sort().values for g in range(4)])
            out[f"{b}.pool.0.weight"] = sd[f"{b}.pool.0.weight"][H][:, S]
            out[f"{b}.pool.1.weight"], out[f"{b}.pool.1.bias"] = sd[f"{b}.pool.1.weight"][H], sd[f"{b}.pool.1.bias"][H]
            out[f"{b}.pool.3.weight"] = sd[f"{b}.pool.3.weight"][S][:, H]
    missing = names - set(out)
    if missing:
        raise ValueError(f"prune_tae_decoder: unhandled tensors {sorted(missing)[:4]}")
    return out


@torch.no_grad()
def tae_from_teacher(sd: dict[str, torch.Tensor], part: str, cfg, teacher_cfg) -> dict[str, torch.Tensor]:
    """Warm start of a depth-pruned TAE ``cfg`` (fewer blocks per stage, same width) from a teacher's state dict.

    Layers are matched by role (``tae.roles``: a stage keeps the teacher's first blocks). The ``s2d``
    encoder stem starts as the exact composition of the teacher's full-resolution conv and its
    stride-2 conv (both linear, no activation between them once the full-resolution block is dropped):
    a 5x5 stride-2 kernel, rewritten over the 2x2 space-to-depth grid. Only image borders differ.
    Dropping blocks costs quality at init (TAEF2, dev crops: decoder (3,2,1,1) 25.4 dB vs 29.5;
    without the encoder's full-resolution block 18 dB); distillation recovers it from there.
    """
    from .models import tae

    if cfg.width != teacher_cfg.width or cfg.latent_channels != teacher_cfg.latent_channels:
        raise UsageError("a depth-pruned warm start needs the teacher's width and latent channels "
                         f"({teacher_cfg.width}, {teacher_cfg.latent_channels}); got {cfg.width}, {cfg.latent_channels}")
    t_idx = {r: i for i, r in enumerate(tae.roles(part, teacher_cfg))}
    has_params = {k.split(".", 1)[0] for k in tae.build(part, cfg).state_dict()}
    out: dict[str, torch.Tensor] = {}
    for i, role in enumerate(tae.roles(part, cfg)):
        if str(i) not in has_params:
            continue
        if role == "s2d.conv":
            w0, b0, w1 = sd[f"{t_idx['stem']}.weight"], sd[f"{t_idx['stem']}.bias"], sd[f"{t_idx['s1.down']}.weight"]
            k = torch.zeros(w1.shape[0], w0.shape[1], 6, 6, dtype=w0.dtype)  # 5x5 composite, padded to 6x6
            for a in range(3):
                for b in range(3):
                    k[:, :, a:a + 3, b:b + 3] += torch.einsum("om,mipq->oipq", w1[:, :, a, b], w0)
            # PixelUnshuffle channel c*4 + dy*2 + dx holds pixel (2r+dy, 2s+dx): tap (ka, kb) of the 3x3
            # s2d conv reads composite offset (2ka+dy, 2kb+dx).
            k = k.view(k.shape[0], k.shape[1], 3, 2, 3, 2).permute(0, 1, 3, 5, 2, 4).reshape(k.shape[0], -1, 3, 3)
            out[f"{i}.weight"] = k
            out[f"{i}.bias"] = torch.einsum("omab,m->o", w1, b0)
            continue
        if role not in t_idx:
            raise UsageError(f"cannot warm-start layer '{role}' of the pruned {part} from the teacher")
        j = t_idx[role]
        out.update({f"{i}.{k[len(str(j)) + 1:]}": v for k, v in sd.items() if k.split(".", 1)[0] == str(j)})
    return out


def export_checkpoint(run_dir: str | os.PathLike, out: str | os.PathLike, *, teacher_id: str | None = None,
                      data_dir: str | None = None, command: str | None = None, use_ema: bool = True) -> dict:
    """Export a run's current checkpoint (finished or not) as fp16 safetensors with provenance.

    The teacher id and data folder the checkpoint records win; ``teacher_id``/``data_dir`` fill in for
    checkpoints that predate those records. Returns a summary: output path, part, step, finished,
    teacher, data_dir and ``ignored`` (the given values that disagreed with the recorded ones).
    """
    from .models import student as sfam, tae

    run_dir = Path(run_dir)
    ck = run_dir / "checkpoint.pt"
    if not ck.exists():
        raise VaepackError("no checkpoint.pt", path=str(run_dir), hint="run `vaepack distill` with --out there first")
    c = torch.load(ck, weights_only=False, map_location="cpu")
    meta = c["meta"]
    if meta["family"] == "student":
        cfg = sfam.StudentConfig(**meta["config"])
        m = sfam.build("encoder", cfg)
        m.load_state_dict(c["ema" if use_ema else "student"])
        m = sfam.fuse_bn(m.eval())
        cfg_out = asdict(m.cfg)
    else:
        cfg = tae.TAEConfig(**meta["config"])
        m = tae.build(meta["part"], cfg)
        m.load_state_dict(c["ema" if use_ema else "student"])
        cfg_out = asdict(cfg)
    state = TrainState(**c["state"])
    ignored = {k: v for k, v, rec in (("teacher", teacher_id, c.get("teacher_id")), ("data_dir", data_dir, c.get("data_dir")))
               if v is not None and rec is not None and str(v) != str(rec)}
    teacher_id = str(c.get("teacher_id") or teacher_id or "unknown")
    data_dir = str(c.get("data_dir") or data_dir or "")
    md = _provenance(teacher_id, data_dir, c["schedule"], state, None, command, meta["family"], meta["part"], cfg_out)
    path = export_safetensors(m.eval(), Path(out), md)
    return {"output": str(path), "family": meta["family"], "part": meta["part"], "step": state.step,
            "finished": state.finished, "teacher": teacher_id, "data_dir": data_dir, "ignored": ignored}


def _provenance(teacher_id, data_dir, schedule, state, batch, command, family, part, cfg) -> dict[str, str]:
    return {
        "vaepack_family": family,
        "vaepack_part": part,
        "config": json.dumps(cfg, sort_keys=True),
        "teacher": teacher_id,
        "data_dir": str(data_dir),
        "schedule": json.dumps([list(s) for s in schedule]),
        "steps": str(state.step),
        "train_seconds": f"{state.seconds:.0f}",
        "batch": str(batch),
        "command": command or " ".join(sys.argv),
        "vaepack_version": _version(),
    }


# ------------------------------------------- helpers of the CLI (vaepack distill) and benchmarks/
def load_tae_teacher(path: str | os.PathLike, part: str, latent_channels: int = 32, midblock_gn: bool = True) -> nn.Module:
    """A TAE-family part from an upstream ``nn.Sequential`` .pth (e.g. TAEF2), as float32."""
    from .models import tae

    path = Path(path)
    if not path.is_file():
        raise VaepackError("teacher weights not found", path=str(path), hint="pass --teacher-encoder/--teacher-decoder")
    cfg = tae.TAEConfig(kind="f8", latent_channels=latent_channels, midblock_gn=midblock_gn)
    m = tae.build(part, cfg)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    m.load_state_dict({k: v.float() for k, v in tae.convert_state_dict(part, sd, cfg).items()})
    return m.eval()


def _parse_schedule(text: str) -> list[tuple[int, int]]:
    try:
        out = [(int(a), int(b)) for a, b in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise UsageError(f"bad schedule {text!r}", hint="write CROP:STEPS[,CROP:STEPS...], e.g. 128:10000,256:10000") from None
    if any(c < 8 or c % 8 or n < 0 for c, n in out):
        raise UsageError(f"bad schedule {text!r}", hint="crop sizes must be multiples of 8, steps >= 0")
    return out


if __name__ == "__main__":  # the former argparse entry point: say where it went instead of doing nothing
    sys.exit("error: `python -m vaepack.distill` was folded into the CLI: use `vaepack distill` "
             "(training) and `vaepack distill-export` (export a run's checkpoint)")
