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
from vaepack.errors import BackendUnavailableError, ExportError, UsageError
from vaepack.loader import family_attr, load_part
from vaepack.manifest import ModelEntry, Space, get_model

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
    if dtype == "fp16" and not entry.fp16_safe:
        raise UsageError(f"model '{entry.id}' overflows in fp16 (its activations exceed the fp16 range); "
                         "use --dtype bf16 or fp32, or the fp16-fix weights where they exist")


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
        if self.space.norm != "flux2_bn":
            return None
        bn = getattr(module, "bn", None)
        return (bn.running_mean, bn.running_var) if bn is not None else None

    @torch.no_grad()
    def encode(self, x01: torch.Tensor, tiler: Tiler | None = None) -> torch.Tensor:
        """[0, 1] images -> diffusion-space latents. ``tiler(fn, x)`` runs ``fn`` tile by tile."""
        p = self.parts["encoder"]
        # A runner (ONNX Runtime, OpenVINO, TensorRT) takes whole images; tiled runs stay on the torch
        # module, whose split keeps the GroupNorm tail whole (exact tiling; a tiled runner would not be).
        if p.runner is not None and tiler is None:
            return p.runner(x01)
        x = L.to_model_range(x01.to(self.device, torch.float32), p.image_range)
        if self.device.type == "cpu" and self.dtype != "fp32":
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            if tiler is None:
                m = p.module(x)
            else:  # tile the local head; run the tail that needs global statistics (GroupNorm) whole
                head, tail = p.split
                m = tail(tiler(head, x))
        m = m.float().contiguous()
        if p.native_is_diffusion:
            return m
        return L.mean_to_diffusion(m, self.space, self._bn_stats(p.module))

    @property
    def sampling(self) -> bool:
        """The decoder is a diffusion sampler: it has ``steps`` (NFE) and ``seed`` to set."""
        p = self.parts.get("decoder")
        return p is not None and hasattr(p.module, "steps")

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tiler: Tiler | None = None, nfe: int | None = None) -> torch.Tensor:
        """Diffusion-space latents -> [0, 1] images (clamped).

        ``nfe``: sampling steps of a diffusion decoder for this call (its ``steps`` otherwise; the
        sampler's time grid validates it); a deterministic decoder refuses it."""
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
        z = z.to(self.device, torch.float32)
        if not p.native_is_diffusion:
            z = L.diffusion_to_mean(z, self.space, self._bn_stats(p.module))
        if self.device.type == "cpu" and self.dtype != "fp32":
            z = z.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            if tiler is None:
                y = p.module(z)
            else:
                head, tail = p.split
                y = tiler(tail, head(z))
        return L.from_model_range(y.float(), p.image_range).clamp(0, 1).contiguous()


def load_vae(model: str | ModelEntry, parts=("encoder", "decoder"), device: str | None = None,
             dtype: str | None = "fp32", backend: str = "torch") -> VAE:
    """Load parts of a manifest model. ``backend``: torch, onnxruntime, openvino, tensorrt, or auto
    (the fastest CPU path that is installed and keeps the model's quality, see
    vaepack.runtime.best_cpu_choice; torch on CUDA and for diffusion decoders). ``dtype`` None: auto's
    precision, else fp32; an explicit ``dtype`` is kept under auto. Under auto with no ``dtype``, a
    part whose shipped int8 calibration says ``auto: true`` runs int8 on OpenVINO (none yet).
    ``dtype="int8"`` needs an ONNX backend: parts with a calibration run int8, the others (and the
    torch modules kept for tiled runs) at ``runtime.cpu_float_precision``."""
    entry = get_model(model) if isinstance(model, str) else model
    dev = pick_device(device)
    auto = backend == "auto"
    part_prec: dict[str, str] = {}
    if auto:
        from vaepack.runtime import best_cpu_choice

        if dev.type == "cuda" or any(entry.part(p).family == "eps" for p in parts):
            name, prec = "torch", "fp32"  # the eps sampler loop runs in torch; CUDA is torch's own fast path
        else:
            name, prec = best_cpu_choice(entry)  # (imports onnx/openvino to see whether they are installed)
            if dtype is None:
                from vaepack.runtime import best_part_precision

                part_prec = {p: best_part_precision(entry, p, name, prec) for p in parts}
        backend, dtype = name, dtype or prec
    dtype = dtype or "fp32"
    if dtype == "int8":
        if backend == "torch":
            raise UsageError("int8 runs on an exported graph, not in torch",
                             hint="use --backend openvino or onnxruntime with --dtype int8")
        # int8 where the part has a calibration (shipped or made with `vaepack export --precision int8
        # --calibration`), the others at the float precision auto would take (e.g. the default
        # encoder int8 + its decoder bf16 in one roundtrip); --json reports each part's precision.
        from vaepack.quantize import has_calibration
        from vaepack.runtime import cpu_float_precision

        dtype = cpu_float_precision(entry) if dev.type == "cpu" else "fp32"
        part_prec = {p: "int8" if has_calibration(entry, p) else dtype for p in parts}
        for p, v in part_prec.items():
            if v != "int8":
                log.warning("%s %s has no int8 calibration, so it runs %s (make one: vaepack export %s --part %s "
                            "--precision int8 --calibration DIR)", entry.id, p, v, entry.id, p)
    check_dtype(entry, dtype)
    vae = VAE(entry=entry, device=dev, dtype=dtype)
    for part in parts:
        module, _, digest = load_part(entry, part)
        spec = entry.part(part)
        module = module.to(dev)
        if dev.type == "cpu" and dtype != "fp32":
            module = module.to(memory_format=torch.channels_last)
        if dtype == "fp16" and dev.type == "cuda":
            module = module.half()
        split_fn = family_attr(spec, "tile_split", None)
        split = split_fn(part, module) if split_fn else None
        if split is None:
            split = (module, nn.Identity()) if part == "encoder" else (nn.Identity(), module)
        vae.parts[part] = Part(module=module, image_range=family_attr(spec, "IMAGE_RANGE", "0,1"),
                               native_is_diffusion=family_attr(spec, "NATIVE_IS_DIFFUSION", True),
                               sha256=digest, split=split)
    if backend != "torch":
        from vaepack.runtime import get_backend

        for part in parts:
            prec = part_prec.get(part, dtype)
            try:
                vae.parts[part].runner = get_backend(backend, entry.id, part, prec, device=str(dev))
                vae.parts[part].backend = backend
                vae.parts[part].precision = prec if prec != dtype else None
            except (BackendUnavailableError, ExportError, UsageError) as e:
                if not auto:
                    raise
                # auto falls back cleanly: torch at the float precision, with the reason in the log
                log.warning("%s cannot run %s %s %s (%s); using torch %s", backend, entry.id, part, prec, e, dtype)
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
