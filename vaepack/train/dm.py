"""Distribution matching as a latent regularizer (paper 003, DMVAE; issue 15, section 2).

DMVAE shapes an encoder's latent distribution toward a chosen reference distribution with the DMD
loss (its public code, sen-ye/dmvae ``train_dmd.py``, ports DMD2 to rectified flow): a frozen "real"
flow model trained on reference samples, a "fake" flow model trained online on the encoder's
(detached) latents - initialized from the real one, k updates per encoder update (code default 5) -
and for the encoder, with x_hat_* the denoised estimates at a random t,

    grad = ((z - x_hat_real) - (z - x_hat_fake)) / mean|z - x_hat_real|   (per sample)
    loss = 0.5 * MSE(z, stopgrad(z - grad))                                  (d loss / dz = grad / numel)

so z moves along x_hat_real - x_hat_fake: toward where the reference's score points and away from
where the encoder's own distribution already is. This module is unconditional (DMVAE is class-
conditional with CFG 5 on both score nets).

Translation to vaepack's convention (vaepack/samplers.py): x_t = (1 - t) z + t eps, t = 1 is noise,
v = eps - z, so x_hat = x_t - t v (DMVAE's code puts t = 1 at the data). t is drawn from
U(t_min, t_max), kept away from the data end t = 0, where x_hat -> z and the normalizer
mean|z - x_hat_real| goes to 0. The loss is mode-seeking: watch the per-channel std ratio
(``channel_std_ratio``) for collapse, and train the decoder jointly (DMVAE trains the whole VAE).

The flow models work on per-channel-normalized latents (the reference's statistics, as in
vaepack.modelability); ``DistributionMatcher`` normalizes z with them, so gradients reach the raw z.

References (``reference_latents``): ``gaussian`` (N(0, I)), ``model:ID[@SCALE]`` (that model's latents of
the training photos; ``model:taef2`` for distillation toward TAEF2's space), or a folder of latent
files (vaepack.latents.load_latent). ``real_flow`` trains the frozen real flow on them, cached by the
digest of the samples and the training configuration.

The trainers wire it in (``vaepack distill --dm-weight W --dm-reference R``; DA-VAE ``--align dm``);
the weight lambda_DM is theirs to apply: ``loss`` returns the unweighted DMD loss.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.errors import LatentFileError, UsageError
from vaepack.models.latent_flow import LatentFlow, LatentFlowConfig
from vaepack.modelability import FlowTrainConfig, channel_stats, flow_loss, normalize, parse_spec, train_flow

log = logging.getLogger("vaepack.train")
Progress = Callable[[str], None]
LATENT_FILE_SUFFIXES = (".safetensors", ".latent")
REFERENCE_HELP = "gaussian, model:ID[@SCALE] or a folder of latent files"


@dataclass
class DMConfig:
    """Distribution matching settings (defaults from DMVAE's code where it has one)."""

    weight: float = 5.0  # lambda_DM: the trainer's multiplier (DMVAE: dmd_weight 5 by default, 10 in its script)
    reference: str = "gaussian"  # gaussian | model:ID[@SCALE] | a folder of latent files
    fake_updates: int = 5  # fake-flow updates per encoder update (DMVAE/DMD2: 5)
    t_min: float = 0.02  # t ~ U(t_min, t_max): away from the data end t = 0 (DMD2 uses [0.02, 0.98] T)
    t_max: float = 0.98
    fake_lr: float = 1e-4  # AdamW learning rate of the fake flow
    seed: int = 0  # t and eps of the loss and the fake updates
    real: FlowTrainConfig = field(default_factory=lambda: FlowTrainConfig(steps=2000))  # the frozen real flow
    gaussian_samples: int = 64  # ``gaussian``: reference latents of gaussian_size^2 pixels to train the real flow on
    gaussian_size: int = 32

    def check(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise UsageError(f"--dm-weight must be a number >= 0, got {self.weight}")
        if not isinstance(self.fake_updates, int) or self.fake_updates < 1:
            raise UsageError(f"DM fake updates must be at least 1, got {self.fake_updates}")
        if not (0 < self.t_min < self.t_max <= 1):
            raise UsageError(f"DM t range must satisfy 0 < t_min < t_max <= 1, got [{self.t_min}, {self.t_max}]",
                             hint="t = 0 is the data end, where the DMD normalizer vanishes")
        if not (self.fake_lr > 0):
            raise UsageError(f"DM fake learning rate must be positive, got {self.fake_lr}")
        self.real.check()


# ----------------------------------------------------------------------------- references
@dataclass
class Reference:
    """Reference samples: raw latents (C, h, w) of the distribution to match."""

    name: str
    latents: list[torch.Tensor]
    gaussian: bool = False  # N(0, I) by definition: normalization statistics are exactly 0 and 1

    @property
    def channels(self) -> int:
        return int(self.latents[0].shape[0])

    def digest(self) -> str:
        h = hashlib.sha256(self.name.encode())
        for z in self.latents:
            h.update(repr(tuple(z.shape)).encode())
            h.update(z.detach().float().contiguous().numpy().tobytes())
        return h.hexdigest()

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gaussian:
            return torch.zeros(self.channels), torch.ones(self.channels)
        return channel_stats(self.latents)


def _latent_folder(folder: Path) -> list[torch.Tensor]:
    from vaepack.latents import flux2_unpack, load_latent

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(LATENT_FILE_SUFFIXES))
    if not files:
        raise LatentFileError("contains no latent files", path=str(folder),
                              hint="write some with `vaepack encode -o DIR` or pick another reference")
    out, first = [], None
    for p in files:
        rec = load_latent(p, default_model="")
        z = (flux2_unpack(rec.latent) if rec.packed else rec.latent)[0].float()
        if first is None:
            first = (p, z.shape[0])
        elif z.shape[0] != first[1]:
            raise LatentFileError(f"has {z.shape[0]} channels but {first[0].name} has {first[1]}", path=str(p),
                                  hint="a reference folder holds latents of one space")
        out.append(z)
    return out


def reference_latents(reference: str, *, channels: int | None = None, data_dir: str | Path | None = None,
                      backend: str = "auto", device: str | None = None, seed: int = 0,
                      gaussian_samples: int = 64, gaussian_size: int = 32) -> Reference:
    """The reference samples of ``reference`` (gaussian | model:ID[@SCALE] | a folder of latent files).

    ``channels``: the encoder's latent channels (needed for gaussian; a reference with another count is
    refused). ``data_dir``: the training photos a ``model:`` reference encodes."""
    ref = reference.strip()
    if ref == "gaussian":
        if channels is None:
            raise UsageError("the gaussian DM reference needs the encoder's channel count")
        g = torch.Generator().manual_seed(seed)
        lat = list(torch.randn(gaussian_samples, channels, gaussian_size, gaussian_size, generator=g))
        return Reference(ref, lat, gaussian=True)
    if ref.startswith("model:"):
        from vaepack.modelability import check_models, encode_images, load_encoder
        from vaepack.train.common import load_images

        spec = parse_spec(ref[len("model:"):])
        check_models([spec])
        if data_dir is None:
            raise UsageError(f"the DM reference '{ref}' encodes the training photos: give the data folder")
        vae = load_encoder(spec.model, backend, device)
        lat, _ = encode_images(vae, load_images(data_dir), spec.scale, model_id=vae.entry.id)
        out = Reference(ref, lat)
    elif Path(ref).is_dir():
        out = Reference(ref, _latent_folder(Path(ref)))
    else:
        raise UsageError(f"unknown DM reference '{reference}' ({REFERENCE_HELP})")
    if channels is not None and out.channels != channels:
        raise UsageError(f"the DM reference '{ref}' has {out.channels} latent channels but the encoder writes "
                         f"{channels}", hint="pick a reference of the encoder's latent space")
    return out


# ----------------------------------------------------------------------------- the frozen real flow
@dataclass
class RealFlow:
    """A flow model trained on the normalized reference, with the normalization it was trained on."""

    model: LatentFlow
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    reference: str
    cached: bool = False  # loaded from the cache instead of trained


def _cache_key(ref: Reference, cfg: FlowTrainConfig) -> str:
    return hashlib.sha256(json.dumps({"samples": ref.digest(), "train": asdict(cfg)}, sort_keys=True).encode()
                          ).hexdigest()


def real_flow(ref: Reference, cfg: FlowTrainConfig, *, cache: Path | None = None, device: str | torch.device = "cpu",
              progress: Progress | None = None) -> RealFlow:
    """Train (or load from ``cache``, a folder) the frozen real flow on ``ref``. The cache file name is
    the sha256 of the reference samples and ``cfg``, so a changed reference or setting retrains."""
    mean, std = ref.stats()
    key = _cache_key(ref, cfg)
    path = Path(cache) / f"dm-real-{key[:24]}.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") == key:
            sd = load_file(str(path))
            model = LatentFlow(LatentFlowConfig(**json.loads(meta["flow_config"])))
            model.load_state_dict({k[len("flow."):]: v for k, v in sd.items() if k.startswith("flow.")})
            return RealFlow(model.to(device).eval(), sd["norm.mean"], sd["norm.std"], ref.name, cached=True)
        log.warning("%s belongs to another reference; training the real flow again", path)
    if progress:
        progress(f"DM: training the real flow on '{ref.name}' ({len(ref.latents)} latents, {cfg.steps} steps)")
    model, losses = train_flow(normalize(ref.latents, mean, std), cfg, device, progress)
    if path is not None:
        from vaepack.train.common import provenance, save_safetensors

        tensors = {**{f"flow.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                   "norm.mean": mean.contiguous(), "norm.std": std.contiguous()}
        save_safetensors(tensors, path, provenance(key=key, reference=ref.name,
                                                   flow_config=json.dumps(model.config.as_dict()),
                                                   train=json.dumps(asdict(cfg)), final_loss=losses[-1]))
    return RealFlow(model, mean, std, ref.name)


# ----------------------------------------------------------------------------- the DMD loss
class DistributionMatcher:
    """The frozen real flow, the online fake flow (a copy of the real one unless given) and the DMD loss.

    Per encoder step: ``dm.fake_step(z.detach())`` (``cfg.fake_updates`` flow-matching updates of the
    fake flow on the encoder's current latents), then ``cfg.weight * dm.loss(z)`` in the encoder's loss.
    Any modules with ``forward(x_t, t) -> v`` work as the two flows (tests use analytic ones)."""

    def __init__(self, real: nn.Module, cfg: DMConfig | None = None, *, mean: torch.Tensor | None = None,
                 std: torch.Tensor | None = None, fake: nn.Module | None = None):
        self.cfg = cfg or DMConfig()
        self.cfg.check()
        self.real = real.eval().requires_grad_(False)
        self.fake = (fake if fake is not None else copy.deepcopy(real)).train().requires_grad_(True)
        self.mean = mean
        self.std = std
        self.opt = torch.optim.AdamW(self.fake.parameters(), lr=self.cfg.fake_lr, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.last: dict[str, float] = {}

    @classmethod
    def from_real_flow(cls, rf: RealFlow, cfg: DMConfig | None = None) -> "DistributionMatcher":
        return cls(rf.model, cfg, mean=rf.mean, std=rf.std)

    def state_dict(self) -> dict:
        """What a trainer's checkpoint keeps of the matcher (keys prefixed so they sit beside its own)."""
        return {"dm_fake": self.fake.state_dict(), "dm_opt": self.opt.state_dict(), "dm_gen": self.gen.get_state()}

    def load_state_dict(self, c: dict) -> None:
        """Restore from a checkpoint written with ``state_dict`` (older ones have no generator state)."""
        self.fake.load_state_dict(c["dm_fake"])
        self.opt.load_state_dict(c["dm_opt"])
        if "dm_gen" in c:
            self.gen.set_state(c["dm_gen"])

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return z
        return (z - self.mean.to(z).view(1, -1, 1, 1)) / self.std.to(z).view(1, -1, 1, 1)

    def _draw(self, z: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
        t = lo + (hi - lo) * torch.rand(z.shape[0], generator=self.gen)
        eps = torch.randn(z.shape, generator=self.gen)
        return t.to(z.device), eps.to(z.device, z.dtype)

    def fake_step(self, z: torch.Tensor) -> float:
        """``cfg.fake_updates`` flow-matching updates of the fake flow on (detached) latents z, t ~ U(0, 1)
        as the real flow was trained; returns the mean fake loss."""
        zn = self.normalize(z.detach().float())
        total = 0.0
        for _ in range(self.cfg.fake_updates):
            t, eps = self._draw(zn, 0.0, 1.0)
            loss = flow_loss(self.fake, zn, t, eps).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += float(loss.detach())
        self.last["fake_loss"] = total / self.cfg.fake_updates
        return self.last["fake_loss"]

    @staticmethod
    def denoised(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_hat = x_t - t v(x_t, t): the flow's estimate of the clean latent."""
        return x_t - t.view(-1, 1, 1, 1) * net(x_t, t).to(x_t)

    def gradient(self, zn: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The DMD gradient on normalized latents zn at (t, eps) (no graph)."""
        with torch.no_grad():
            tt = t.view(-1, 1, 1, 1).to(zn)
            x_t = (1 - tt) * zn + tt * eps
            x_real = self.denoised(self.real, x_t, t)
            x_fake = self.denoised(self.fake, x_t, t)
            norm = (zn - x_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
            grad = ((zn - x_real) - (zn - x_fake)) / norm
            self.last.update(normalizer=float(norm.mean()), grad_rms=float(grad.pow(2).mean().sqrt()))
            return torch.nan_to_num(grad)

    def loss(self, z: torch.Tensor, t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
        """The (unweighted) DMD loss 0.5 * MSE(zn, stopgrad(zn - grad)), zn the normalized z; its gradient
        w.r.t. zn is grad / zn.numel(). t ~ U(t_min, t_max) and eps ~ N(0, I) unless given."""
        zn = self.normalize(z.float())
        if t is None or eps is None:
            t_d, eps_d = self._draw(zn, self.cfg.t_min, self.cfg.t_max)
            t = t_d if t is None else t
            eps = eps_d if eps is None else eps
        grad = self.gradient(zn.detach(), t.to(zn.device), eps.to(zn))
        return 0.5 * F.mse_loss(zn, (zn - grad).detach())


def build_matcher(cfg: DMConfig, *, channels: int, data_dir: str | Path | None = None, backend: str = "auto",
                  device: str | torch.device = "cpu", cache: Path | None = None,
                  progress: Progress | None = None) -> DistributionMatcher:
    """Reference -> frozen real flow (trained or cached) -> DistributionMatcher: what a trainer calls."""
    cfg.check()
    ref = reference_latents(cfg.reference, channels=channels, data_dir=data_dir, backend=backend,
                            seed=cfg.seed, gaussian_samples=cfg.gaussian_samples, gaussian_size=cfg.gaussian_size)
    return DistributionMatcher.from_real_flow(real_flow(ref, cfg.real, cache=cache, device=device,
                                                        progress=progress), cfg)


# ----------------------------------------------------------------------------- measurements
def _token_rows(x) -> torch.Tensor:
    """A latent batch (N, C, H, W), a list of (C, h, w) latents, or rows (N, C) -> rows (M, C)."""
    if isinstance(x, (list, tuple)):
        return torch.cat([z.reshape(z.shape[0], -1).T for z in x]).float()
    x = x.detach().float()
    return x if x.dim() == 2 else x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def channel_std_ratio(z, reference) -> list[float]:
    """Per-channel std of z over std of the reference (1 = matched; -> 0 = collapse)."""
    a, b = _token_rows(z), _token_rows(reference)
    return (a.std(0) / b.std(0).clamp_min(1e-12)).tolist()


def sliced_wasserstein(z, reference, projections: int = 128, seed: int = 0, max_points: int = 65536) -> float:
    """Sliced 2-Wasserstein distance between the latent tokens (C-vectors) of z and of the reference:
    sqrt of the mean over ``projections`` random unit directions of the squared W2 of the 1-D
    projections (sorted samples; quantiles at the smaller set's size when the counts differ). At most
    ``max_points`` tokens per side (seeded subsample)."""
    a, b = _token_rows(z), _token_rows(reference)
    if a.shape[1] != b.shape[1]:
        raise UsageError(f"sliced Wasserstein needs equal channel counts, got {a.shape[1]} and {b.shape[1]}")
    g = torch.Generator().manual_seed(seed)
    a = a[torch.randperm(a.shape[0], generator=g)[:max_points]] if a.shape[0] > max_points else a
    b = b[torch.randperm(b.shape[0], generator=g)[:max_points]] if b.shape[0] > max_points else b
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ dirs).sort(0).values, (b.double() @ dirs).sort(0).values
    if pa.shape[0] != pb.shape[0]:  # match quantiles at the midpoints of the smaller set
        n = min(pa.shape[0], pb.shape[0])
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        pa, pb = (torch.quantile(p, q, dim=0) for p in (pa, pb))
    return float((pa - pb).pow(2).mean().sqrt())


__all__ = ["DMConfig", "DistributionMatcher", "REFERENCE_HELP", "RealFlow", "Reference", "build_matcher",
           "channel_std_ratio", "real_flow", "reference_latents", "sliced_wasserstein"]
