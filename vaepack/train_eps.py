"""Train an eps-VAE diffusion decoder (paper 004) for a frozen encoder's latent space.

``run_train_eps(encoder_id, data_dir, out_dir, ...)`` trains ``vaepack.models.eps_unet.EpsDecoder``
on latents of the frozen encoder (e.g. ``taef2``) and exports the EMA weights as a safetensors file
the loader can use (family ``eps``). Objectives, each switchable with its weight (0 disables it):

* ``w_vel``  velocity MSE of rectified flow, Eq. 9, with t ~ logit-normal(0, 1) [3.3, Table 4 (b)];
* ``w_perc`` perceptual matching on x0_hat of Eq. 10 [3.2, Table 4 (d)]: LPIPS when the ``lpips``
  package *and* its backbone weights are already on disk (never downloaded), else the documented
  substitute 0.84 * (1 - MS-SSIM) + 0.16 * L1 (the mix of Zhao et al., "Loss functions for image
  restoration with neural networks", 2017), computed on [0, 1] images;
* ``w_adv``  adversarial denoising-trajectory matching, Eq. 11-12 [Table 4 (e)]: a time-conditioned
  (AdaGN) discriminator sees concat(x_0, x_t) as real and concat(x0_hat, x_t) as fake, non-saturating
  loss, R1 penalty on real inputs (Mescheder et al. 2018; lazy, every ``r1_every`` steps).
Paper weights (C.2): lambda_LPIPS = 0.5, lambda_adv = 0.5; Adam, EMA decay 0.999 (here with the
usual warm-up min(decay, (1 + n) / (10 + n)) so short CPU runs are not dominated by the init).

CPU speed: the frozen encoder (and the base decoder when ``base="tae"``) run once per training image
and are cached in ``<out_dir>/cache_<encoder>.safetensors`` (image uint8, latent fp32, base fp16);
training crops are aligned to the latent grid so cached latent/base crops match the image crops.
No flip augmentation: the frozen encoder is not flip-equivariant, so a flipped latent is not the
latent of the flipped image. CPU training runs under bf16 autocast with channels_last.

Checkpoints (``checkpoint.pt``, written atomically, read with ``weights_only=True``) hold model, EMA,
discriminator, optimizers, RNG states and step; ``resume=True`` continues from it. SIGINT or
``max_minutes`` stop the loop after the current step and leave a usable checkpoint + exported EMA.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shlex
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.errors import UsageError, WeightsError
from vaepack.io import IMAGE_SUFFIXES, atomic_output, load_image
from vaepack.models.eps_unet import EpsConfig, EpsDecoder, flow_scale, timestep_embedding

CACHE_VERSION = "1"
CKPT_NAME = "checkpoint.pt"
EXPORT_NAME = "eps_decoder.safetensors"
Progress = Callable[[str], None]


# ============================================================================= data cache
def _images(data_dir: Path) -> list[Path]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UsageError(f"training data folder not found: {data_dir}")
    files = sorted(p for p in data_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"no images in {data_dir}")
    return files


@torch.no_grad()
def build_cache(encoder_id: str, data_dir: Path, cache_path: Path, *, base: bool = True,
                progress: Progress | None = None) -> Path:
    """Encode every training image once with the frozen encoder (and decode it with the model's own
    deterministic decoder, the "base" reconstruction) and store image/latent/base in one safetensors.

    Images are cropped (top-left) to a multiple of the latent factor, so crops of the cached image,
    latent and base line up exactly. Latents are fp32, base reconstructions fp16 in [0, 1] (clamped),
    images uint8. CPU: ~6 s per 480x320 image for TAEF2 on one busy thread, so this is done once.
    """
    from safetensors.torch import save_file

    from vaepack.vae import load_vae

    files = _images(data_dir)
    vae = load_vae(encoder_id, parts=("encoder", "decoder") if base else ("encoder",), device="cpu")
    f = vae.factor
    tensors: dict[str, torch.Tensor] = {}
    names = []
    t0 = time.time()
    for i, p in enumerate(files):
        x = load_image(p)
        h, w = (x.shape[1] // f) * f, (x.shape[2] // f) * f
        x = x[:, :h, :w]
        z = vae.encode(x[None])
        tensors[f"img.{i}"] = (x * 255).round().to(torch.uint8).contiguous()
        tensors[f"z.{i}"] = z[0].contiguous()
        if base:
            tensors[f"base.{i}"] = vae.decode(z)[0].to(torch.float16).contiguous()
        names.append(p.name)
        if progress:
            progress(f"cache {i + 1}/{len(files)} {p.name} {w}x{h} ({time.time() - t0:.0f}s)")
    meta = {"format": "vaepack.eps_cache", "version": CACHE_VERSION, "encoder": encoder_id,
            "files": json.dumps(names), "base": json.dumps(base), "factor": str(f)}
    with atomic_output(Path(cache_path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(cache_path)


class LatentCache:
    """The cached training set in memory; ``batch`` draws latent-grid-aligned random crops."""

    def __init__(self, path: Path, encoder_id: str, files: list[Path] | None, base: bool):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "vaepack.eps_cache" or meta.get("version") != CACHE_VERSION:
                raise UsageError(f"{path}: not a current eps training cache; delete it to rebuild")
            if meta.get("encoder") != encoder_id:
                raise UsageError(f"{path}: cache was built for encoder '{meta.get('encoder')}', not "
                                 f"'{encoder_id}'; delete it or use another --out")
            names = json.loads(meta["files"])
            if files is not None and names != [p.name for p in files]:
                raise UsageError(f"{path}: the training images changed since the cache was built; delete it")
            if base and not json.loads(meta.get("base", "false")):
                raise UsageError(f"{path}: cache has no base reconstructions; delete it to rebuild")
            self.factor = int(meta["factor"])
            n = len(names)
            self.img = [f.get_tensor(f"img.{i}") for i in range(n)]
            self.z = [f.get_tensor(f"z.{i}") for i in range(n)]
            self.base = [f.get_tensor(f"base.{i}") for i in range(n)] if base else None
        self.names = names

    def usable(self, crop: int) -> list[int]:
        return [i for i, im in enumerate(self.img) if im.shape[1] >= crop and im.shape[2] >= crop]

    def batch(self, n: int, crop: int, g: torch.Generator, pool: list[int]):
        """(x in [-1, 1], z, base in [-1, 1] or None) for n random crops of side ``crop``."""
        f = self.factor
        xs, zs, bs = [], [], []
        for _ in range(n):
            i = pool[int(torch.randint(len(pool), (1,), generator=g))]
            h, w = self.img[i].shape[1:]
            ly = int(torch.randint((h - crop) // f + 1, (1,), generator=g))
            lx = int(torch.randint((w - crop) // f + 1, (1,), generator=g))
            y, x, c = ly * f, lx * f, crop // f
            xs.append(self.img[i][:, y:y + crop, x:x + crop].float() / 127.5 - 1)
            zs.append(self.z[i][:, ly:ly + c, lx:lx + c].float())
            if self.base is not None:
                bs.append(self.base[i][:, y:y + crop, x:x + crop].float() * 2 - 1)
        return torch.stack(xs), torch.stack(zs), (torch.stack(bs) if bs else None)

    def residual_std(self) -> float:
        """Std of the data the flow models, in [-1, 1] units: x - base (or x without a base)."""
        s, ss, n = 0.0, 0.0, 0
        for i in range(len(self.img)):
            d = self.img[i].double() / 127.5 - 1
            if self.base is not None:
                d = d - (self.base[i].double() * 2 - 1)
            s += float(d.sum())
            ss += float((d * d).sum())
            n += d.numel()
        return math.sqrt(max(ss / n - (s / n) ** 2, 1e-12))


# ============================================================================= losses
def _gauss(c: int, device) -> torch.Tensor:
    t = torch.arange(11, dtype=torch.float32, device=device) - 5
    g = torch.exp(-0.5 * (t / 1.5) ** 2)
    g = g / g.sum()
    return g.view(1, 1, 1, 11).repeat(c, 1, 1, 1)


def _ssim_cs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable float32 SSIM and contrast-structure means per image (11-tap Gaussian, sigma 1.5,
    valid region, K1 = 0.01, K2 = 0.03, data range 1). vaepack.metrics is the float64 reference."""
    c = x.shape[1]
    g = _gauss(c, x.device)

    def blur(a):
        a = F.conv2d(a, g, groups=c)
        return F.conv2d(a, g.transpose(-1, -2), groups=c)

    ux, uy = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - ux * ux, blur(y * y) - uy * uy, blur(x * y) - ux * uy
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    cs = (2 * vxy + c2) / (vx + vy + c2)
    s = (2 * ux * uy + c1) / (ux * ux + uy * uy + c1) * cs
    return s.flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - MS-SSIM (Wang et al. 2003 weights; as many scales as the 11-pixel window allows)."""
    w = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    k, h = 0, min(x.shape[-2:])
    while k < len(w) and h >= 11:
        k, h = k + 1, h // 2
    ws = torch.tensor(w[:k], device=x.device)
    ws = ws / ws.sum()
    vals = []
    for i in range(k):
        s, cs = _ssim_cs(x, y)
        vals.append((s if i == k - 1 else cs).clamp_min(1e-6))
        if i < k - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return 1 - torch.prod(torch.stack(vals) ** ws.view(-1, 1), dim=0).mean()


def find_lpips(device: torch.device) -> nn.Module | None:
    """An LPIPS module if the ``lpips`` package and its backbone weights are already on disk."""
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError:
        return None
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    for net, pat in (("vgg", "vgg16-*.pth"), ("alex", "alexnet-*.pth")):
        if ckpt.is_dir() and any(ckpt.glob(pat)):
            try:
                return lpips.LPIPS(net=net, verbose=False).to(device).eval().requires_grad_(False)
            except Exception:  # noqa: BLE001 - any failure means "not usable offline"
                return None
    return None


class Perceptual(nn.Module):
    """LPIPS when available, else 0.84 (1 - MS-SSIM) + 0.16 L1 on [0, 1] images (see module doc)."""

    def __init__(self, kind: str, device: torch.device):
        super().__init__()
        self.lpips = find_lpips(device) if kind in ("auto", "lpips") else None
        if kind == "lpips" and self.lpips is None:
            raise UsageError("--perceptual lpips needs the `lpips` package and its VGG/AlexNet weights "
                             "in the torch hub cache; use --perceptual auto for the MS-SSIM+L1 substitute")
        self.kind = "lpips" if self.lpips is not None else "msssim_l1"

    def forward(self, x_pm1: torch.Tensor, y_pm1: torch.Tensor) -> torch.Tensor:
        if self.lpips is not None:
            return self.lpips(x_pm1, y_pm1).mean()
        x01, y01 = (x_pm1.float() + 1) / 2, (y_pm1.float() + 1) / 2
        return 0.84 * ms_ssim_loss(x01, y01) + 0.16 * (x01 - y01).abs().mean()


class TimeDiscriminator(nn.Module):
    """Patch discriminator D(x_0, x_t, t) with AdaGN time conditioning [3.2, Eq. 12]."""

    def __init__(self, width: int = 32, levels: int = 3, cin: int = 6):
        super().__init__()
        self.width = width
        temb = 4 * width
        self.time = nn.Sequential(nn.Linear(width, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(cin, width, 3, padding=1)
        self.convs, self.norms, self.embs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c = width
        for _ in range(levels):
            self.convs.append(nn.Conv2d(c, 2 * c, 4, stride=2, padding=1))
            c *= 2
            self.norms.append(nn.GroupNorm(8, c))
            self.embs.append(nn.Linear(temb, 2 * c))
        self.conv_out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x0: torch.Tensor, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.time(timestep_embedding(t, self.width))
        h = F.leaky_relu(self.conv_in(torch.cat([x0, x_in], dim=1)), 0.2)
        for conv, norm, emb in zip(self.convs, self.norms, self.embs):
            scale, shift = emb(e)[:, :, None, None].chunk(2, dim=1)
            h = F.leaky_relu(norm(conv(h)) * (1 + scale) + shift, 0.2)
        return self.conv_out(h)


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


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm.detach(), 1 - decay)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def export_weights(run_dir: Path, out_path: Path, dtype: str = "fp16", command: str | None = None) -> dict:
    """Write the EMA weights of a run's checkpoint as a loader-ready safetensors (atomic).

    Metadata: format, family, part, config (JSON), encoder, train steps, command, base weights sha.
    Returns {"path", "sha256", "size", "params"}.
    """
    from safetensors.torch import save_file

    from vaepack import __version__
    from vaepack.weights import sha256_file

    ck = _read_checkpoint(Path(run_dir) / CKPT_NAME)
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    sd = {k: (v.to(dt) if v.is_floating_point() else v).contiguous() for k, v in ck["ema"].items()}
    meta = {"format": "vaepack.weights", "family": "eps", "part": "decoder", "config": ck["config"],
            "encoder": ck["encoder"], "train_steps": str(ck["step"]), "dtype": dtype,
            "command": command or ck.get("command", ""), "base_sha256": ck.get("base_sha256", ""),
            "vaepack_version": __version__, "license_note": "base.* = TAE decoder weights (MIT, madebyollin/taesd)"
            if ck.get("base_sha256") else ""}
    with atomic_output(Path(out_path)) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    p = Path(out_path)
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
def run_train_eps(encoder_id: str, data_dir: Path, out_dir: Path, *, steps: int = 2000, batch: int = 8,
                  crop: int = 128, lr: float = 5e-4, ema: float = 0.999, resume: bool = True,
                  max_minutes: float | None = None, seed: int = 0, device: str | None = None,
                  progress: Progress | None = None, config: EpsConfig | dict | None = None,
                  w_vel: float = 1.0, w_perc: float = 0.5, w_adv: float = 0.5, r1: float = 1.0,
                  r1_every: int = 4, adv_start: int = 0, perceptual: str = "auto",
                  warmup: int = 100, betas: tuple[float, float] = (0.9, 0.999), disc_lr: float | None = None,
                  log_every: int = 10, save_every_minutes: float = 5.0, export: bool = True,
                  export_dtype: str = "fp16", cache_path: Path | None = None, bf16: bool = True,
                  t_grid_frac: float = 0.5, t_grid_steps: tuple[int, ...] = (1, 2, 3, 5, 10),
                  command: str | None = None) -> dict:
    """Train (or resume) an eps decoder; returns a summary dict (paths, step, last losses, export).

    ``t_grid_frac``: fraction of each batch whose t is drawn (uniformly) from the times the sampler
    actually visits for NFE in ``t_grid_steps`` (the Eq. 13 grid, all >= 0.64 for NFE <= 10; t = 1
    for NFE = 1) instead of the logit-normal, which puts only ~0.2% of its mass above t = 0.95. A
    vaepack addition for short CPU runs (measured: after 150 steps on logit-normal only, NFE = 1 was
    0.2 dB *below* the untrained start, with 0.5 it was 0.1 dB above); 0 is the paper's setting.
    ``device=None`` picks CUDA when available, else the CPU.
    """
    from vaepack.vae import pick_device

    if steps < 1 or batch < 1:
        raise UsageError("--steps and --batch must be >= 1")
    if perceptual not in ("auto", "lpips", "msssim_l1"):
        raise UsageError(f"unknown --perceptual '{perceptual}' (auto, lpips, msssim_l1)")
    if not 0 <= t_grid_frac <= 1:
        raise UsageError(f"t_grid_frac must be in [0, 1], got {t_grid_frac}")
    if min(w_vel, w_perc, w_adv, r1) < 0 or w_vel + w_perc + w_adv == 0:
        raise UsageError("loss weights must be >= 0 and not all 0")
    dev = pick_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train.log"
    command = command or " ".join(shlex.quote(a) for a in sys.argv)

    def log(msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        with open(log_path, "a") as fh:
            fh.write(line + "\n")
        if progress:
            progress(msg)

    ckpt_path = out_dir / CKPT_NAME
    ck = _read_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None
    if ck is not None and ck["encoder"] != encoder_id:
        raise UsageError(f"{ckpt_path} was trained for encoder '{ck['encoder']}', not '{encoder_id}'")

    # -- config and data ------------------------------------------------------------------------
    if ck is not None:
        cfg = EpsConfig.from_json(ck["config"])
    elif isinstance(config, EpsConfig):
        cfg = config
    else:
        cfg = default_config(encoder_id, **(config or {}))
    files = _images(data_dir)
    cpath = Path(cache_path) if cache_path else out_dir / f"cache_{encoder_id}.safetensors"
    if not cpath.is_file():
        log(f"building latent cache {cpath} ({len(files)} images)")
        build_cache(encoder_id, data_dir, cpath, base=cfg.base != "none", progress=None)
    data = LatentCache(cpath, encoder_id, files, base=cfg.base != "none")
    if data.factor != cfg.factor:
        raise UsageError(f"{cpath}: cache factor {data.factor} does not match the config's {cfg.factor}")
    if crop < 16 or crop % cfg.factor:
        raise UsageError(f"--crop must be a multiple of {cfg.factor} (and >= 16), got {crop}")
    pool = data.usable(crop)
    if not pool:
        raise UsageError(f"no training image is at least {crop}x{crop}; use a smaller --crop")
    if ck is None and not (isinstance(config, EpsConfig) or (config and "data_scale" in config)):
        std = data.residual_std()
        scale = float(f"{1.0 / std:.2g}")  # make x0 ~unit variance (sigma_data = 1)
        cfg = replace(cfg, data_scale=scale, sigma_data=1.0)
        log(f"data std {std:.4f} (in [-1,1] units, {'residual over base' if cfg.base != 'none' else 'image'})"
            f" -> data_scale {scale}")

    # -- models -----------------------------------------------------------------------------------
    torch.manual_seed(seed)
    model = EpsDecoder(cfg)
    base_sha = _load_base(model, encoder_id) if cfg.base != "none" else ""
    if model.base is not None:
        model.base.requires_grad_(False)
    model_ema = copy.deepcopy(model).requires_grad_(False)
    disc = TimeDiscriminator() if w_adv > 0 else None
    params = [p for p in model.unet.parameters()]
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=disc_lr or lr, betas=(0.0, 0.99)) if disc else None
    g = torch.Generator("cpu").manual_seed(seed + 1)
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
    perc = Perceptual(perceptual, dev) if w_perc > 0 else None
    use_amp = bf16 and (dev.type == "cpu" or torch.cuda.is_bf16_supported())
    n_params = sum(p.numel() for p in params)
    log(f"config {cfg.to_json()}")
    log(f"unet params {n_params}, device {dev}, bf16 {use_amp}, perceptual {perc.kind if perc else 'off'}, "
        f"adversarial {'on' if disc else 'off'}, images {len(pool)}/{len(data.img)} usable at crop {crop}")

    def save() -> None:
        state = {"model": model.state_dict(), "ema": model_ema.state_dict(), "opt": opt.state_dict(),
                 "step": step, "config": cfg.to_json(), "encoder": encoder_id, "data_rng": g.get_state(),
                 "torch_rng": torch.get_rng_state(), "base_sha256": base_sha, "command": command,
                 "cache": str(cpath)}
        if disc is not None:
            state["disc"], state["opt_d"] = disc.state_dict(), opt_d.state_dict()
        with atomic_output(ckpt_path) as tmp:
            torch.save(state, str(tmp))

    stop = {"flag": False}

    def on_sigint(signum, frame):  # finish the step, then checkpoint and return
        stop["flag"] = True

    old = None
    with contextlib.suppress(ValueError):  # not the main thread: no handler
        old = signal.signal(signal.SIGINT, on_sigint)
    from vaepack.samplers import time_grid

    grid_times = torch.tensor(sorted({round(x, 6) for n in t_grid_steps for x in time_grid(n, cfg.schedule)[:-1]}))
    t_start = time.time()
    last_save = t_start
    acc: dict[str, float] = {}
    n_acc = 0
    gam = cfg.gamma
    try:
        while step < steps and not stop["flag"]:
            if max_minutes is not None and (time.time() - t_start) / 60 >= max_minutes:
                log(f"max_minutes {max_minutes} reached")
                break
            x, z, b = data.batch(batch, crop, g, pool)
            x, z = x.to(dev), z.to(dev)
            b = b.to(dev) if b is not None else None
            cl = dict(memory_format=torch.channels_last) if dev.type == "cpu" else {}
            with torch.no_grad():
                cond = model.condition(z, base=b)  # cached base: the TAE decoder is not rerun
                x0 = cfg.data_scale * (x - b if b is not None else x)
                t = torch.sigmoid(torch.randn(batch, device=dev))  # logit-normal(0, 1) [3.3]
                if t_grid_frac > 0:  # some t exactly where few-step sampling evaluates G
                    pick = torch.rand(batch, device=dev) < t_grid_frac
                    idx = torch.randint(len(grid_times), (batch,), device=dev)
                    t = torch.where(pick, grid_times.to(dev)[idx], t)
                tt = t.view(-1, 1, 1, 1)
                eps = torch.randn_like(x0)
                x_t = ((1 - tt) * gam * x0 + tt * eps).contiguous(**cl)  # Eq. 5 with gamma [3.3]
                v_target = eps - gam * x0
            for pg in opt.param_groups:
                pg["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
            with _autocast(dev, use_amp):
                v = model.step_cond(x_t, t, cond.contiguous(**cl))
            losses: dict[str, torch.Tensor] = {}
            if w_vel > 0:
                losses["vel"] = F.mse_loss(v, v_target)  # Eq. 9
            x0_hat = None
            if perc is not None or disc is not None:
                x0_hat = model.x0_hat(x_t, t, v, cond)  # Eq. 10, pixels in [-1, 1]
            if perc is not None:
                with _autocast(dev, use_amp and perc.kind == "lpips"):
                    losses["perc"] = perc(x0_hat, x)
            adv_on = disc is not None and step >= adv_start
            x_in = (x_t / flow_scale(tt, cfg)).detach()
            if adv_on:
                disc.requires_grad_(False)
                with _autocast(dev, use_amp):
                    logits = disc(x0_hat, x_in, t)
                losses["adv"] = F.softplus(-logits.float()).mean()  # non-saturating G loss
            total = sum({"vel": w_vel, "perc": w_perc, "adv": w_adv}[k] * v_ for k, v_ in losses.items())
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if adv_on:  # discriminator: real (x_0, x_t) vs fake (x0_hat, x_t) [Eq. 12]
                disc.requires_grad_(True)
                real = x.detach().requires_grad_(step % r1_every == 0 and r1 > 0)
                with _autocast(dev, use_amp):
                    lr_ = disc(real, x_in, t).float()
                    lf_ = disc(x0_hat.detach(), x_in, t).float()
                d_loss = F.softplus(-lr_).mean() + F.softplus(lf_).mean()
                if real.requires_grad:  # lazy R1 (Mescheder et al. 2018), scaled by the interval
                    (gr,) = torch.autograd.grad(lr_.sum(), real, create_graph=True)
                    r1_pen = gr.float().pow(2).flatten(1).sum(1).mean()
                    d_loss = d_loss + 0.5 * r1 * r1_every * r1_pen
                    losses["r1"] = r1_pen.detach()
                for pg in opt_d.param_groups:
                    pg["lr"] = (disc_lr or lr) * min(1.0, (step + 1 - adv_start) / max(1, warmup))
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                losses["d"] = d_loss.detach()
            step += 1
            ema_update(model_ema.unet, model.unet, min(ema, (1 + step) / (10 + step)))
            for k, v_ in losses.items():
                acc[k] = acc.get(k, 0.0) + float(v_.detach())
            acc["total"] = acc.get("total", 0.0) + float(total.detach())
            n_acc += 1
            if step % log_every == 0 or step == steps:
                el = time.time() - t_start
                log(f"step {step}/{steps} " + " ".join(f"{k} {v_ / n_acc:.5f}" for k, v_ in acc.items())
                    + f" ({el / 60:.1f} min)")
                acc, n_acc = {}, 0
            if not math.isfinite(float(total.detach())):
                raise RuntimeError(f"training diverged at step {step} (loss {float(total.detach())})")
            if time.time() - last_save >= save_every_minutes * 60:
                save()
                last_save = time.time()
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
    save()
    log(f"checkpoint {ckpt_path} at step {step}" + (" (interrupted)" if stop["flag"] else ""))
    summary: dict = {"checkpoint": str(ckpt_path), "step": step, "log": str(log_path),
                     "config": json.loads(cfg.to_json()), "interrupted": stop["flag"],
                     "unet_params": n_params}
    if export:
        info = export_weights(out_dir, out_dir / EXPORT_NAME, export_dtype, command)
        log(f"exported EMA weights {info['path']} sha256 {info['sha256']} ({info['size']} bytes)")
        summary["export"] = info
    return summary


# ============================================================================= evaluation
@torch.no_grad()
def eval_nfe(weights: Path, encoder_id: str, data_dir: Path, nfes=(1, 2, 3, 5, 10), crop: int = 256,
             seed: int = 0, deterministic: bool = True, progress: Progress | None = None,
             schedule: str | None = None) -> dict:
    """PSNR/SSIM on center crops (side min(crop, H, W) rounded down to the latent factor) of every
    image in ``data_dir``: the encoder's own decoder vs the eps decoder at each NFE, same latents.

    The eps decoder's base reconstruction is the encoder model's decoder output computed once per
    image (the same TAE weights the eps file carries), so every NFE costs only its UNet evaluations;
    the result equals ``EpsDecoder.forward`` with ``steps = n``. ``schedule`` overrides the
    decoder's time grid ("reversed_log" or "uniform"; paper 004 Table 4 spacing ablation).
    """
    from vaepack import metrics
    from vaepack.samplers import SCHEDULES, sample
    from vaepack.vae import load_vae

    if schedule is not None and schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule '{schedule}' ({', '.join(SCHEDULES)})")
    vae = load_vae(encoder_id, device="cpu")
    dec = load_eps_decoder(Path(weights))
    dec.seed, dec.deterministic_noise = seed, deterministic
    if schedule is not None:
        dec.schedule = schedule
    f = vae.factor
    res: dict = {"base": {"psnr": [], "ssim": []}, **{n: {"psnr": [], "ssim": []} for n in nfes}}
    for p in _images(data_dir):
        x = load_image(p)
        s = (min(crop, x.shape[1], x.shape[2]) // f) * f
        y0, x0 = (x.shape[1] - s) // 2, (x.shape[2] - s) // 2
        x = x[None, :, y0:y0 + s, x0:x0 + s]
        z = vae.encode(x)
        yb = vae.decode(z)
        res["base"]["psnr"].append(metrics.psnr(yb, x))
        res["base"]["ssim"].append(metrics.ssim(yb, x))
        cond = dec.condition(z, base=yb * 2 - 1 if dec.base is not None else None)
        noise = _noise(dec, z)
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


def _noise(dec: EpsDecoder, z: torch.Tensor) -> torch.Tensor:
    from vaepack.samplers import make_noise

    return make_noise(dec.image_shape(z), seed=dec.seed, deterministic=dec.deterministic_noise,
                      origin=dec.noise_origin)
