"""The one encode/decode contract every family goes through.

``VAE.encode`` takes images in [0, 1] (float NCHW) and returns diffusion-space latents of the
model's space; ``VAE.decode`` takes such latents and returns images in [0, 1]. The family-specific
pixel range and latent convention are applied here, by the functions in vaepack/latents.py.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vaepack import latents as L
from vaepack.errors import UsageError
from vaepack.loader import family_attr, load_part
from vaepack.manifest import ModelEntry, Space, check_fp16, get_model

log = logging.getLogger(__name__)

Tiler = Callable[[nn.Module, torch.Tensor], torch.Tensor]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return torch.device(device)


def check_dtype(entry: ModelEntry, dtype: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}' (choose fp32, bf16 or fp16)")
    if dtype == "fp16":
        check_fp16(entry.id, entry.fp16_safe, hint="use --dtype bf16 or fp32, or the fp16-fix weights where they exist")


def check_device_dtype(device: torch.device, dtype: str) -> None:
    """torch fp16 runs on CUDA only: CPU autocast to fp16 exists but is emulated and slow."""
    if dtype == "fp16" and device.type != "cuda":
        raise UsageError("torch fp16 runs on CUDA only", hint="use bf16 on CPU")


@dataclass
class Part:
    module: nn.Module
    image_range: str  # "0,1" or "-1,1": what the network itself uses
    native_is_diffusion: bool  # TAE/student output is already in diffusion space
    sha256: str
    # (head, tail) for tiled runs: the encoder tiles its head, the decoder its tail; the other half
    # runs on the whole (low-resolution) tensor so GroupNorm statistics stay global and exact.
    split: tuple[nn.Module, nn.Module] | None = None
    # A non-torch runtime (vaepack.runtime Runner) with the same contract as encode/decode; when
    # set it replaces the torch module (which stays loaded for metadata and export).
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None
    backend: str = "torch"
    precision: str | None = None  # the runner's, where it differs from VAE.dtype (int8)


@dataclass
class VAE:
    entry: ModelEntry
    parts: dict[str, Part] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    dtype: str = "fp32"

    @property
    def space(self) -> Space:
        return self.entry.space

    @property
    def factor(self) -> int:
        return self.entry.space.factor

    def has(self, part: str) -> bool:
        return part in self.parts

    def precision(self, part: str) -> str:
        """The precision that runs ``part``: its runner's (e.g. int8), else the VAE's dtype."""
        return self.parts[part].precision or self.dtype

    def _autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.dtype])

    def _bn_stats(self, module: nn.Module):
        return bn_stats(self.space, module)

    @torch.no_grad()
    def encode(self, x01, tiler=None) -> torch.Tensor:
        """[0, 1] images -> diffusion-space latents.

        ``tiler.encode(split, x01, pre, post)`` (vaepack.tiling.TileRunner) runs the part tile by tile:
        ``pre`` turns [0, 1] pixels into the network's input, ``post`` the network's output into
        latents; ``x01`` may then be a source the tiler reads region by region (tiling.Remap), so the
        whole image need not exist as float."""
        p = self.parts["encoder"]
        # A runner (ONNX Runtime, OpenVINO, TensorRT) takes whole images; tiled runs stay on the torch
        # module, whose split keeps the GroupNorm tail whole (exact tiling; a tiled runner would not be).
        if p.runner is not None and tiler is None:
            return p.runner(x01)

        def pre(x: torch.Tensor) -> torch.Tensor:
            x = L.to_model_range(x.to(self.device, torch.float32), p.image_range)
            if self.device.type == "cpu" and self.dtype != "fp32":
                x = x.contiguous(memory_format=torch.channels_last)
            return x

        def post(m: torch.Tensor) -> torch.Tensor:
            m = m.float().contiguous()
            return m if p.native_is_diffusion else L.mean_to_diffusion(m, self.space, self._bn_stats(p.module))

        with self._autocast():
            if tiler is not None:  # the head on tiles, the tail (GroupNorm) with whole-image statistics
                return tiler.encode(p.split, x01, pre, post)
            m = p.module(pre(x01))
        return post(m)

    def runtime(self, part: str) -> dict[str, str]:
        """Which backend and precision run ``part`` when it is not tiled (``--backend auto`` decides per
        model); the pipeline reports what ran for tiled images."""
        return {"backend": self.parts[part].backend, "dtype": self.precision(part)}

    def set_sampler(self, steps: int | None = None, seed: int | None = None) -> None:
        """Sampling steps (NFE) and noise seed of a diffusion decoder for the following decodes."""
        if steps is None and seed is None:
            return
        if not self.sampling:
            raise UsageError(f"--steps/--seed apply to diffusion decoders; '{self.entry.id}' is deterministic")
        mod = self.parts["decoder"].module
        if steps is not None:
            if steps < 1:
                raise UsageError("--steps must be >= 1")
            mod.steps = int(steps)
        if seed is not None:
            mod.seed = int(seed)

    @property
    def sampling(self) -> bool:
        """The decoder is a diffusion sampler: it has ``steps`` (NFE) and ``seed`` to set."""
        p = self.parts.get("decoder")
        return p is not None and hasattr(p.module, "steps")

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiler=None, nfe: int | None = None) -> torch.Tensor:
        """Diffusion-space latents -> [0, 1] images (clamped).

        ``tiler.decode(split, z, pre, post)`` runs the part tile by tile (``pre``: latents -> the
        network's input, ``post``: its output -> [0, 1] images) and returns what its row sink makes
        of the image (vaepack.tiling.TileRunner). ``nfe``: sampling steps of a diffusion decoder for
        this call (its ``steps`` otherwise; the sampler's time grid validates it); a deterministic
        decoder refuses it."""
        p = self.parts["decoder"]
        if nfe is not None:
            if not self.sampling:
                raise UsageError(f"'{self.entry.id}' has a deterministic decoder: it takes no nfe/--steps")
            if p.runner is not None:
                raise UsageError("a diffusion decoder's nfe is only set on the torch backend")
            old = p.module.steps
            p.module.steps = int(nfe)
            try:
                return self.decode(z, tiler)
            finally:
                p.module.steps = old
        if p.runner is not None and tiler is None:  # tiled: torch, as in encode
            return p.runner(z).clamp(0, 1)

        def pre(z: torch.Tensor) -> torch.Tensor:
            z = z.to(self.device, torch.float32)
            if not p.native_is_diffusion:
                z = L.diffusion_to_mean(z, self.space, self._bn_stats(p.module))
            if self.device.type == "cpu" and self.dtype != "fp32":
                z = z.contiguous(memory_format=torch.channels_last)
            return z

        def post(y: torch.Tensor) -> torch.Tensor:
            return L.from_model_range(y.float(), p.image_range).clamp(0, 1).contiguous()

        with self._autocast():
            if tiler is not None:  # the head (GroupNorm) with whole-image statistics, the tail on tiles
                return tiler.decode(p.split, z, pre, post)
            y = p.module(pre(z))
        return post(y)


def bn_stats(space: Space, module: nn.Module):
    """FLUX.2's BatchNorm statistics (running mean, var) of a KL network, else None: the one place
    the latent normalization finds them (VAE and export)."""
    if space.norm != "flux2_bn":
        return None
    bn = getattr(module, "bn", None)
    return (bn.running_mean, bn.running_var) if bn is not None else None


def make_part(entry: ModelEntry, part: str, module: nn.Module, sha256: str) -> Part:
    """A loaded network under the contract: its pixel range, whether it outputs diffusion-space latents,
    and the (head, tail) split for tiled runs, all read from its family module."""
    spec = entry.part(part)
    split_fn = family_attr(spec, "tile_split", None)
    split = split_fn(part, module) if split_fn else None
    if split is None:
        split = (module, nn.Identity()) if part == "encoder" else (nn.Identity(), module)
    return Part(module=module, image_range=family_attr(spec, "IMAGE_RANGE", "0,1"),
                native_is_diffusion=family_attr(spec, "NATIVE_IS_DIFFUSION", True), sha256=sha256, split=split)


def load_torch_vae(model: str | ModelEntry, parts=("encoder", "decoder"), device: str | None = None,
                   dtype: str = "fp32") -> VAE:
    """The torch modules of a manifest model's ``parts`` (weights verified, strict load) on ``device`` at
    ``dtype``. Backend and precision choice (OpenVINO, int8, auto) is vaepack.runtime.load_vae's."""
    entry = get_model(model) if isinstance(model, str) else model
    dev = pick_device(device)
    check_dtype(entry, dtype)
    vae = VAE(entry=entry, device=dev, dtype=dtype)
    for part in parts:
        module, _, digest = load_part(entry, part)
        module = module.to(dev)
        if dev.type == "cpu" and dtype != "fp32":
            module = module.to(memory_format=torch.channels_last)
        if dtype == "fp16" and dev.type == "cuda":
            module = module.half()
        vae.parts[part] = make_part(entry, part, module, digest)
    return vae


class TeacherEncoder(nn.Module):
    """A VAE's encoder under the one contract, as a module: [0, 1] images -> diffusion-space latents.

    For distillation (Chu et al. 2026, Sec. III-A) a KL teacher gives a *reparameterized sample*
    m + exp(logvar / 2) * eps (seeded), not its mean; deterministic teachers (TAE) give their latent.
    """

    def __init__(self, vae: VAE, sample: bool = True, seed: int = 0):
        super().__init__()
        self.vae = vae
        self.part = vae.parts["encoder"]
        self.module = self.part.module  # registered, so .to()/.float() reach the weights
        self.sample = sample and hasattr(self.part.module, "moments")
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        if not self.sample:
            return self.vae.encode(x01)
        p = self.part
        x = L.to_model_range(x01.to(self.vae.device, torch.float32), p.image_range)
        with self.vae._autocast():
            mean, logvar = p.module.moments(x)
        mean, logvar = mean.float(), logvar.float()
        eps = torch.randn(mean.shape, generator=self.generator).to(mean.device)
        m = mean + torch.exp(0.5 * logvar) * eps
        return L.mean_to_diffusion(m, self.vae.space, self.vae._bn_stats(p.module))


class TeacherDecoder(nn.Module):
    """A VAE's decoder under the contract, as a module: diffusion-space latents -> [0, 1] images.

    ``state_dict()`` is the wrapped network's own (the decoder distillation warm-starts a smaller
    TAE decoder from it)."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae
        self.module = vae.parts["decoder"].module

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)
