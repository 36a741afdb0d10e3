"""Modelability: how easy is a VAE's latent space for a diffusion model to learn (issue 15, section 1).

The papers judge a latent space by the generation FID of a large diffusion model trained on it
(DMVAE, paper 003: "which latent distributions are more conducive to modeling"; DA-VAE, paper 002).
This is the offline CPU stand-in: for each ``ID[@SCALE]`` (``default@1.5`` encodes at that resolution
remap, vaepack.pipeline), encode the photos of ``data`` and ``heldout``, normalize the latents per
channel with the training statistics (recorded), train the same small flow model
(vaepack.models.latent_flow) for the same number of steps with the same seed on random 16x16 latent
crops, and report

- the held-out flow-matching loss per latent element, overall and in 4 buckets of t, on a fixed
  seeded set of (t, eps) per held-out crop (reproducible; the same set for every model of a channel
  count), and
- Frechet distances between generated latents (a few-step Euler sampler, vaepack.samplers) and
  held-out real latents, on per-channel-normalized tokens (C-dim) and on 2x2 patches (4C-dim), with
  the real-vs-real floor (random training crops vs held-out) beside them.

Rectified flow in the package convention (vaepack/samplers.py): x_t = (1 - t) x_0 + t eps, t = 1 is
noise, target v = eps - x_0, t ~ U(0, 1). Compare like with like: each row states the latent
channels and image pixels per latent pixel; a 16x16 crop of a 1.5x-remapped latent covers less of
the photo than one of a 1x latent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from vaepack.errors import UsageError
from vaepack.files import sha256_file
from vaepack.models.latent_flow import LatentFlow, LatentFlowConfig, parameter_count
from vaepack.samplers import sample
from vaepack.train.common import load_images, training_images

log = logging.getLogger("vaepack")
Progress = Callable[[str], None]
T_BUCKETS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
EVAL_SEED_OFFSET = 1_000_003  # the held-out (t, eps) set and the sampler noise use seeds apart from training's
SAMPLE_SEED_OFFSET = 2_000_003
EVAL_CHUNK = 64  # held-out crops per forward pass: fixed, so the seeded (t, eps) draws never depend on --batch


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ModelSpec:
    model: str  # as given (an id or an alias)
    scale: float = 1.0

    @property
    def label(self) -> str:
        return self.model if self.scale == 1.0 else f"{self.model}@{self.scale:g}"


def parse_spec(text: str) -> ModelSpec:
    """``ID[@SCALE]`` -> ModelSpec; a bad scale or an empty id is a UsageError (the model is checked
    against the manifest by ``check_models``)."""
    s = text.strip()
    model, at, scale = s.partition("@")
    if not model or (at and not scale):
        raise UsageError(f"bad model spec '{text}' (ID or ID@SCALE, e.g. taef2 or default@1.5)")
    try:
        sc = float(scale) if at else 1.0
    except ValueError:
        raise UsageError(f"bad scale in '{text}': '{scale}' is not a number") from None
    if not (math.isfinite(sc) and sc > 0):
        raise UsageError(f"scale in '{text}' must be a positive number")
    return ModelSpec(model, sc)


def check_models(specs: list[ModelSpec]) -> None:
    """Every model is in the manifest and has an encoder (before minutes of encoding)."""
    from vaepack.manifest import get_model

    for s in specs:
        entry = get_model(s.model)  # UnknownModelError names the model
        if "encoder" not in entry.parts:
            raise UsageError(f"model '{s.model}' has no encoder", hint="pick a model that encodes images")


# ----------------------------------------------------------------------------- data
def check_disjoint(train: list[Path], heldout: list[Path]) -> None:
    """Refuse a held-out set that shares a file (same path, or same content by sha256) with the data."""
    seen = {p.resolve(): p for p in train}
    for p in heldout:
        if p.resolve() in seen:
            raise UsageError("is in both --data and --heldout", path=str(p), hint="pick disjoint folders")
    digests = {sha256_file(p): p for p in train}
    for p in heldout:
        twin = digests.get(sha256_file(p))
        if twin is not None:
            raise UsageError(f"has the same content as {twin} in --data", path=str(p),
                             hint="held-out photos must not be training photos")


def load_encoder(model: str, backend: str = "auto", device: str | None = None, threads: int | None = None,
                 dtype: str | None = "fp32"):
    """``model``'s encoder as ``load_vae`` picks it for ``backend`` (auto: the fastest installed CPU path);
    ``dtype`` None takes auto's precision too, else it is kept. The benchmark pins fp32 by default: auto
    runs some encoders bf16 and others fp32 (manifest ``bf16_safe``), and bf16 rounding (up to 0.5 in
    TAEF2's latents) is noise the flow model would have to learn, so rows would not compare like with
    like. With ``threads`` on the CPU, a non-torch runner is built once, with that thread count (never
    first at the backend's default, which takes every core while it compiles)."""
    from vaepack.errors import BackendUnavailableError, ExportError
    from vaepack.manifest import get_model
    from vaepack.runtime import best_cpu_choice, best_part_precision, get_backend, load_vae
    from vaepack.vae import pick_device

    if not threads or backend == "torch" or pick_device(device).type != "cpu":
        return load_vae(model, parts=("encoder",), device=device, dtype=dtype, backend=backend)
    entry = get_model(model)
    auto = backend == "auto"
    name, prec = best_cpu_choice(entry) if auto else (backend, dtype or "fp32")
    if auto and dtype is None:
        dtype, prec = prec, best_part_precision(entry, "encoder", name, prec)
    else:
        dtype = prec = dtype or "fp32"
    vae = load_vae(entry, parts=("encoder",), device="cpu", dtype=dtype if dtype != "int8" else "fp32",
                   backend="torch")
    if name != "torch":
        try:
            part = vae.parts["encoder"]
            part.runner = get_backend(name, entry.id, "encoder", prec, device="cpu", threads=threads)
            part.backend, part.precision = name, (prec if prec != vae.dtype else None)
        except (BackendUnavailableError, ExportError, UsageError) as e:
            if not auto:
                raise
            log.warning("%s cannot run %s encoder %s (%s); using torch %s", name, entry.id, prec, e, vae.dtype)
    return vae


def encode_images(vae, images: list[tuple[Path, torch.Tensor]], scale: float = 1.0, filter: str = "bilinear",
                  model_id: str | None = None) -> tuple[list[torch.Tensor], dict]:
    """Latents (C, h, w) of uint8 images (3, H, W) through ``pipeline.encode_tensor`` (remap, padding,
    tiling as `vaepack encode` does them), and what ran."""
    from vaepack.pipeline import encode_tensor

    out, ran = [], {}
    for p, x in images:
        rec = encode_tensor(vae, x, scale, filter, source=str(p), model_id=model_id)
        out.append(rec.latent[0].float())
        ran = {"backend": rec.backend, "dtype": rec.dtype}
    return out, ran


def channel_stats(latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over every element of every latent (float64 sums)."""
    c = latents[0].shape[0]
    n, s, s2 = 0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for z in latents:
        zz = z.double().reshape(c, -1)
        n += zz.shape[1]
        s += zz.sum(1)
        s2 += (zz * zz).sum(1)
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


def normalize(latents: list[torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> list[torch.Tensor]:
    return [(z - mean.view(-1, 1, 1)) / std.view(-1, 1, 1) for z in latents]


class CropSampler:
    """Uniformly random ``crop`` x ``crop`` windows over all latents (a latent is picked in proportion to
    its number of windows); latents smaller than a crop are left out."""

    def __init__(self, latents: list[torch.Tensor], crop: int):
        self.crop = crop
        self.latents = [z for z in latents if z.shape[-2] >= crop and z.shape[-1] >= crop]
        if not self.latents:
            raise UsageError(f"no latent is at least {crop}x{crop}",
                             hint=f"use larger photos (at least {crop} latent pixels a side) or a smaller crop")
        self.weights = torch.tensor([float((z.shape[-2] - crop + 1) * (z.shape[-1] - crop + 1))
                                     for z in self.latents], dtype=torch.float64)

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator).tolist()
        out = []
        for i in idx:
            z = self.latents[i]
            y = int(torch.randint(0, z.shape[-2] - self.crop + 1, (1,), generator=generator))
            x = int(torch.randint(0, z.shape[-1] - self.crop + 1, (1,), generator=generator))
            out.append(z[:, y:y + self.crop, x:x + self.crop])
        return torch.stack(out)


def grid_crops(latents: list[torch.Tensor], crop: int) -> torch.Tensor:
    """Every non-overlapping ``crop`` x ``crop`` window on a grid from the top-left corner (deterministic)."""
    out = [z[:, y:y + crop, x:x + crop] for z in latents
           for y in range(0, z.shape[-2] - crop + 1, crop) for x in range(0, z.shape[-1] - crop + 1, crop)]
    if not out:
        raise UsageError(f"no held-out latent is at least {crop}x{crop}", hint="use larger held-out photos")
    return torch.stack(out)


# ----------------------------------------------------------------------------- the flow model
@dataclass
class FlowTrainConfig:
    """How the latent flow model is trained (the same for every model of a comparison)."""

    steps: int = 1000
    batch: int = 32
    crop: int = 16
    lr: float = 1e-3
    warmup: int = 50  # linear lr warm-up steps, then cosine decay to 10% (steadier final loss on short runs)
    grad_clip: float = 1.0
    seed: int = 0
    width: int = 96
    blocks: int = 4
    time_dim: int = 128

    def check(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}")
        if self.batch < 1:
            raise UsageError(f"--batch must be at least 1, got {self.batch}")
        if self.crop < 4 or self.crop % 2:
            raise UsageError(f"the crop must be an even number of latent pixels >= 4, got {self.crop}")
        if not (self.lr > 0):
            raise UsageError(f"the learning rate must be positive, got {self.lr}")

    def flow_config(self, channels: int) -> LatentFlowConfig:
        return LatentFlowConfig(channels=channels, width=self.width, blocks=self.blocks, time_dim=self.time_dim)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - self.warmup) / span))))


def flow_loss(model: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching loss (mean over the sample's elements): x_t = (1 - t) x0 + t eps, target
    v = eps - x0 (vaepack/samplers.py convention)."""
    tt = t.view(-1, 1, 1, 1).to(x0)
    v = model((1 - tt) * x0 + tt * eps, t)
    return (v.float() - (eps - x0).float()).pow(2).flatten(1).mean(1)


def new_flow(cfg: FlowTrainConfig, channels: int) -> LatentFlow:
    """A LatentFlow initialized from ``cfg.seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LatentFlow(cfg.flow_config(channels))


def train_flow(latents: list[torch.Tensor], cfg: FlowTrainConfig, device: str | torch.device = "cpu",
               progress: Progress | None = None, model: LatentFlow | None = None) -> tuple[LatentFlow, list[float]]:
    """Train a LatentFlow on random crops of (normalized) latents: t ~ U(0, 1), velocity target.
    Deterministic for a seed (crops, t and eps come from one CPU generator). Returns (model, losses)."""
    cfg.check()
    sampler = CropSampler(latents, cfg.crop)
    model = (model or new_flow(cfg, latents[0].shape[0])).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    every = max(1, cfg.steps // 10)
    for step in range(cfg.steps):
        for pg in opt.param_groups:
            pg["lr"] = cfg.lr_at(step)
        x0 = sampler(cfg.batch, g)
        t = torch.rand(cfg.batch, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = flow_loss(model, x0.to(device), t.to(device), eps.to(device)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if progress and ((step + 1) % every == 0 or step + 1 == cfg.steps):
            recent = losses[-every:]
            progress(f"  step {step + 1}/{cfg.steps}: flow loss {sum(recent) / len(recent):.4f}")
    return model.eval(), losses


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def heldout_loss(model: torch.nn.Module, crops: torch.Tensor, seed: int, t_per_crop: int = 8) -> dict:
    """Flow-matching loss per latent element on held-out crops, overall and per t bucket.

    Each crop gets ``t_per_crop`` (a multiple of 4) draws of (t, eps), t stratified over the 4 buckets
    of T_BUCKETS, all from one generator seeded with ``seed``: the same crops and seed give the same
    set, so the overall number (the mean of the buckets) estimates E_{t~U(0,1)} and is reproducible."""
    if t_per_crop < 4 or t_per_crop % 4:
        raise UsageError(f"t draws per held-out crop must be a positive multiple of 4, got {t_per_crop}")
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    sums = torch.zeros(len(T_BUCKETS), dtype=torch.float64)
    counts = torch.zeros(len(T_BUCKETS), dtype=torch.float64)
    buckets = torch.arange(t_per_crop) % len(T_BUCKETS)
    for i in range(0, crops.shape[0], EVAL_CHUNK):
        x0 = crops[i:i + EVAL_CHUNK]
        b = buckets.repeat(x0.shape[0])
        t = (b + torch.rand(b.shape[0], generator=g)) / len(T_BUCKETS)
        x0r = x0.repeat_interleave(t_per_crop, 0)
        eps = torch.randn(x0r.shape, generator=g)
        for j in range(0, x0r.shape[0], EVAL_CHUNK):
            sl = slice(j, j + EVAL_CHUNK)
            per = flow_loss(model, x0r[sl].to(dev), t[sl].to(dev), eps[sl].to(dev)).double().cpu()
            sums.index_add_(0, b[sl], per)
            counts.index_add_(0, b[sl], torch.ones_like(per))
    per_bucket = (sums / counts).tolist()
    return {"overall": sum(per_bucket) / len(per_bucket), "buckets": per_bucket}


@torch.no_grad()
def generate(model: torch.nn.Module, n: int, crop: int, steps: int, seed: int,
             schedule: str = "uniform") -> torch.Tensor:
    """``n`` latent crops from noise with vaepack.samplers.sample (Euler, ``steps`` NFE)."""
    dev = next(model.parameters()).device
    c = model.config.channels

    def fn(x, t, _z):
        return torch.cat([model(x[i:i + EVAL_CHUNK].to(dev), t[i:i + EVAL_CHUNK].to(dev)).cpu()
                          for i in range(0, x.shape[0], EVAL_CHUNK)])

    return sample(fn, None, steps, shape=(n, c, crop, crop), seed=seed, schedule=schedule)


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C): one C-vector per latent pixel."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def patches2x2(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H/2*W/2, 4C): one vector per non-overlapping 2x2 patch (local structure)."""
    return tokens(F.pixel_unshuffle(x, 2))


def gaussian_fit(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of the rows of ``feats``, in float64."""
    f = feats.double()
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / max(1, f.shape[0] - 1)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) (the FID formula), with the trace term in
    the symmetric form tr((S1^(1/2) S2 S1^(1/2))^(1/2)): same eigenvalues as S1 S2, but a symmetric PSD
    matrix, so eigh gives it stably (no complex parts as a general sqrtm can produce)."""
    mu1, mu2, cov1, cov2 = (x.double() for x in (mu1, mu2, cov1, cov2))
    s1 = _sqrtm_psd(cov1)
    m = s1 @ cov2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt)


def frechet_between(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of two sets of row vectors."""
    return frechet_distance(*gaussian_fit(a), *gaussian_fit(b))


# ----------------------------------------------------------------------------- the benchmark
@dataclass
class ModelabilityConfig:
    models: list[str]
    data: Path
    heldout: Path
    train: FlowTrainConfig = field(default_factory=FlowTrainConfig)
    t_per_crop: int = 8  # held-out (t, eps) draws per crop (a multiple of 4)
    samples: int = 128  # generated crops for the Frechet distances
    sample_steps: int = 10  # Euler steps (NFE) of the sampler
    sample_schedule: str = "uniform"
    backend: str = "auto"
    dtype: str | None = "fp32"  # the encoders' precision (None: --backend auto's choice per model)
    device: str | None = None
    threads: int | None = None
    filter: str = "bilinear"

    def check(self) -> None:
        self.train.check()
        if not self.models:
            raise UsageError("--models needs at least one ID[@SCALE]")
        if self.samples < 2 or self.sample_steps < 1:
            raise UsageError("generated samples must be >= 2 and sampler steps >= 1")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if self.t_per_crop < 4 or self.t_per_crop % 4:
            raise UsageError(f"t draws per held-out crop must be a positive multiple of 4, got {self.t_per_crop}")


@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else float("nan")


def measure_model(spec: ModelSpec, train_imgs, held_imgs, cfg: ModelabilityConfig,
                  progress: Progress | None = None) -> dict:
    """One row of the table: encode, then ``score_latents``."""
    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    vae = load_encoder(spec.model, cfg.backend, cfg.device, cfg.threads, cfg.dtype)
    entry = vae.entry
    say(f"{spec.label}: encoding {len(train_imgs)} + {len(held_imgs)} photos ({entry.id}, x{spec.scale:g})")
    tr, ran = encode_images(vae, train_imgs, spec.scale, cfg.filter, entry.id)
    he, _ = encode_images(vae, held_imgs, spec.scale, cfg.filter, entry.id)
    del vae
    row = score_latents(spec.label, tr, he, cfg, progress)
    row["seconds"]["encode"] = time.perf_counter() - t0 - sum(row["seconds"].values())
    c, h, w = he[0].shape
    return {"spec": spec.label, "model": entry.id, "scale": spec.scale, "space": entry.space.name,
            "channels": int(c), "factor": entry.space.factor, "pixels_per_latent": entry.space.factor / spec.scale,
            "example": {"source": str(held_imgs[0][0].name), "image_size": list(held_imgs[0][1].shape[-2:]),
                        "latent_shape": [int(c), int(h), int(w)]},
            "encoder": ran, **row}


def score_latents(label: str, tr: list[torch.Tensor], he: list[torch.Tensor], cfg: ModelabilityConfig,
                  progress: Progress | None = None) -> dict:
    """Normalize per channel (training statistics), train the flow model on the training latents and
    score it on the held-out ones: the part of a row that does not depend on where the latents came
    from (benchmarks score latents of training runs with it too)."""
    from vaepack.vae import pick_device

    say = progress or (lambda _m: None)
    t1 = time.perf_counter()
    mean, std = channel_stats(tr)
    trn, hen = normalize(tr, mean, std), normalize(he, mean, std)
    crop = cfg.train.crop
    say(f"{label}: training the flow model for {cfg.train.steps} steps")
    model, losses = train_flow(trn, cfg.train, pick_device(cfg.device), progress)
    t2 = time.perf_counter()
    crops = grid_crops(hen, crop)
    ho = heldout_loss(model, crops, cfg.train.seed + EVAL_SEED_OFFSET, cfg.t_per_crop)
    gen = generate(model, cfg.samples, crop, cfg.sample_steps, cfg.train.seed + SAMPLE_SEED_OFFSET,
                   cfg.sample_schedule)
    # the floor: as many random training crops as generated ones vs the same held-out crops
    floor = CropSampler(trn, crop)(cfg.samples, torch.Generator().manual_seed(cfg.train.seed + SAMPLE_SEED_OFFSET))
    t3 = time.perf_counter()
    tail = max(1, len(losses) // 10)
    return {
        "train_latents": len(tr), "heldout_latents": len(he), "heldout_crops": int(crops.shape[0]),
        "norm": {"mean": mean.tolist(), "std": std.tolist()},
        "flow_params": parameter_count(model),
        "train_loss_first": _mean(losses[:tail]), "train_loss_last": _mean(losses[-tail:]),
        "heldout_loss": ho["overall"], "heldout_loss_buckets": ho["buckets"],
        "fd_tokens": frechet_between(tokens(gen), tokens(crops)),
        "fd_patches": frechet_between(patches2x2(gen), patches2x2(crops)),
        "fd_tokens_floor": frechet_between(tokens(floor), tokens(crops)),
        "fd_patches_floor": frechet_between(patches2x2(floor), patches2x2(crops)),
        "generated_std": gen.std().item(),
        "seconds": {"train": t2 - t1, "eval": t3 - t2},
    }


def run_modelability(cfg: ModelabilityConfig, progress: Progress | None = None) -> dict:
    """The modelability table for ``cfg.models`` (see the module docstring); one dict per model in
    ``models``, the configuration and data in the rest."""
    cfg.check()
    specs = [parse_spec(s) for s in cfg.models]
    if len({s.label for s in specs}) != len(specs):
        raise UsageError("--models lists a model twice")
    check_models(specs)
    check_disjoint(training_images(cfg.data), training_images(cfg.heldout))
    train_imgs, held_imgs = load_images(cfg.data), load_images(cfg.heldout)
    start = time.perf_counter()
    with _threads(cfg.threads):
        rows = [measure_model(s, train_imgs, held_imgs, cfg, progress) for s in specs]
        threads = torch.get_num_threads()
    conf = {**asdict(cfg), "data": str(cfg.data), "heldout": str(cfg.heldout)}
    return {"config": conf, "t_buckets": [list(b) for b in T_BUCKETS], "threads": threads,
            "data": {"dir": str(cfg.data), "images": len(train_imgs)},
            "heldout": {"dir": str(cfg.heldout), "images": len(held_imgs)},
            "models": rows, "elapsed_s": time.perf_counter() - start, "torch": torch.__version__}


__all__ = ["CropSampler", "EVAL_SEED_OFFSET", "FlowTrainConfig", "ModelSpec", "ModelabilityConfig", "T_BUCKETS",
           "channel_stats", "check_disjoint", "check_models", "encode_images", "flow_loss", "frechet_between",
           "frechet_distance", "gaussian_fit", "generate", "grid_crops", "heldout_loss", "load_encoder",
           "measure_model", "new_flow", "normalize", "parse_spec", "patches2x2", "run_modelability", "score_latents",
           "tokens", "train_flow"]
