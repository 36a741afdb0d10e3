"""Export a model part to ONNX (and build TensorRT engines from it), with a parity check and a sidecar.

An export is ``<name>.onnx`` plus ``<name>.json`` (the sidecar): model, part, weights sha256, ONNX
sha256, opset, precision, input/output shapes, whether the latent convention is inside the graph,
versions, and the parity check against PyTorch. The sidecar is what makes an artifact trustworthy:
runtimes refuse an ONNX file whose sidecar is missing, whose hash does not match the file, or whose
weights hash does not match the model's current weights.

Graph I/O is always float32 and follows the one contract (vaepack/vae.py): with the convention in
the graph, an encoder takes images in [0, 1] and returns diffusion-space latents, a decoder the
reverse (clamped to [0, 1]). Without it (``include_convention=False``) the graph is the bare network
(model pixel range, raw VAE mean); ``graph_pre``/``graph_post`` apply the convention outside, through
vaepack/latents.py like everything else.

Precisions (documented in export/README.md):
- fp32: float32 graph.
- fp16: float16 weights and compute inside, float32 I/O (Casts at the boundary), normalization layers
  kept in float32 (their variance sums lose precision in fp16). Refused for models whose manifest says
  ``fp16_safe: false`` (SDXL/FLUX/SD3 VAEs overflow in fp16).
- bf16: the float32 graph; bf16 is a runtime choice (OpenVINO ``INFERENCE_PRECISION_HINT``, TensorRT
  10's BF16 builder flag with Resize layers pinned to fp32). ONNX Conv only accepts bfloat16 from
  opset 22, which the TorchScript exporter cannot write, and onnxruntime's CPU provider has no bf16
  kernels, so a bf16-typed graph would run nowhere we can check it.

Parity (``TOLERANCES``): max |ONNX - PyTorch fp32| divided by the reference output's range
(max - min), on a random batch and on a real image, at two sizes; past the tolerance the export
fails and nothing is written.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaepack import __version__
from vaepack import latents as L
from vaepack.errors import BackendUnavailableError, ExportError, UsageError, VaepackError
from vaepack.manifest import ModelEntry, Space, get_model
from vaepack.paths import cache_dir, package_dir, shared_dir

log = logging.getLogger("vaepack")

DEFAULT_OPSET = 17  # TensorRT 8.6+/10, OpenVINO and onnxruntime all take it; 18 adds nothing we use
MIN_OPSET = 14  # scaled_dot_product_attention (KL mid-block) needs 14
EXPORT_PARTS = ("encoder", "decoder", "eps-step")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TRT_PRECISIONS = ("fp32", "fp16", "bf16")  # vaepack's int8 graphs have asymmetric activations (TensorRT: symmetric only)
# Max abs error relative to the reference output's range (max - min). fp32 differs only by summation
# order. fp16 rounds weights and every activation to 11 significant bits (~5e-4 relative each), bf16
# to 8 bits (~4e-3); errors grow through ~30 layers, so the limits are ~20x one rounding step.
# int8 (vaepack/quantize.py): rounding every Conv input to 256 levels moves single latent values by
# up to a quarter of the latent range (default encoder, dev photos at 1.5x: max |error| / range median
# 0.14, worst 0.28; rms 15% of the latent std). The bound catches broken graphs (a wrong int8 kernel
# gave errors above the whole range); the round-trip PSNR, not this bound, decides whether a part
# runs int8 by default (the manifest's int8_calibration ... auto).
INT8_TOLERANCE = 0.3
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": INT8_TOLERANCE}
PARITY_SIZES = ((64, 64), (96, 160))  # pixels (H, W): multiples of 32 (f8 and f32), non-square
SIDECAR_FORMAT = "vaepack.onnx-export"
ENGINE_FORMAT = "vaepack.tensorrt-engine"
FORMAT_VERSION = "1"
EXPORTERS = ("torchscript", "dynamo")

INSTALL_HINT = {
    "onnx": "pip install 'vaepack[onnx]'",
    "onnxruntime": "pip install 'vaepack[onnx]'",
    "openvino": "pip install 'vaepack[openvino]'",
    "tensorrt": "pip install 'vaepack[gpu]' (needs an NVIDIA GPU and driver)",
}


# --------------------------------------------------------------------------- optional backends
def require_onnx():
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError("the ONNX exporter needs the 'onnx' package",
                                      hint=INSTALL_HINT["onnx"]) from None
    return onnx


# Distributions that all install the same top-level ``onnxruntime`` module; two of them at once
# overwrite each other's files and leave an import that loads but misses providers.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-rocm", "onnxruntime-qnn", "onnxruntime-training")


def onnxruntime_distributions() -> list[str]:
    from importlib import metadata

    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def require_onnxruntime():
    dists = onnxruntime_distributions()
    if len(dists) > 1:
        raise BackendUnavailableError(
            f"{' and '.join(dists)} are installed together; they ship the same 'onnxruntime' module "
            "and overwrite each other",
            hint=f"pip uninstall -y {' '.join(dists)}, then pip install 'vaepack[onnx]' (CPU) or "
                 "'vaepack[gpu]' (CUDA)")
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("the onnxruntime backend needs the 'onnxruntime' package",
                                      hint=INSTALL_HINT["onnxruntime"]) from None
    return onnxruntime


def require_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError("the openvino backend needs the 'openvino' package",
                                      hint=INSTALL_HINT["openvino"]) from None
    return openvino


def require_tensorrt():
    """TensorRT and a CUDA device, or a BackendUnavailableError saying which is missing."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError("TensorRT is not installed", hint=INSTALL_HINT["tensorrt"]) from None
    except OSError as e:  # the wheel is there but libnvinfer/CUDA libraries are not loadable
        raise BackendUnavailableError(f"TensorRT is installed but cannot load its libraries ({e})",
                                      hint="check the NVIDIA driver and CUDA runtime") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU, and none is available to torch",
                                      hint="use --backend onnxruntime or openvino on this machine")
    return tensorrt


def _versions(*extra: str) -> dict[str, str]:
    from importlib import metadata

    out = {"vaepack": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnx", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- hashing, naming
def _publish_mode(path: Path) -> None:
    """mkstemp creates 0600 files; artifacts are meant to be shared like any output (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process only


def _file_sha256_cached(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_file(path)
    return _VERIFIED[key]


def weights_digest(entry: ModelEntry, part: str) -> str:
    """The weights identity recorded in exports; equals what ``loader.load_part`` returns."""
    from vaepack import weights as W

    spec = entry.part(part)
    paths = W.ensure(entry, part)  # verifies every file against the manifest / trust-on-first-use hash
    digests = [W.expected_sha256(f) or W.sha256_file(p) for f, p in zip(spec.files, paths)]
    return "+".join(digests)


def graph_precision(precision: str) -> str:
    """Dtype of the ONNX graph for a requested precision (bf16 runs on the fp32 graph; int8 is the
    QDQ graph of vaepack/quantize.py)."""
    return precision if precision in ("fp16", "int8") else "fp32"


def artifact_name(model_id: str, part: str, precision: str, opset: int, include_convention: bool) -> str:
    return f"{model_id}-{part}-{precision}-op{opset}" + ("" if include_convention else "-raw")


def sidecar_path(onnx_path: Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


# --------------------------------------------------------------------------- the exported function
def _model_part(part: str) -> str:
    return "decoder" if part == "eps-step" else part


class _Fp32Norm(nn.Module):
    """A normalization layer run in fp32 inside a reduced-precision graph: its mean/variance sums
    over a whole group lose precision (and can overflow) in fp16."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x.float()).to(x.dtype)


def _reduced_precision_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    low = copy.deepcopy(module).to(dtype)
    ref = dict(module.named_modules())
    norm_types = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
    for name, sub in list(low.named_modules()):
        if name and isinstance(sub, norm_types):
            parent_name, _, attr = name.rpartition(".")
            parent = low.get_submodule(parent_name) if parent_name else low
            setattr(parent, attr, _Fp32Norm(copy.deepcopy(ref[name]).float()))
    return low


class _Graph(nn.Module):
    """What gets exported: the network, fp32 I/O, and (optionally) the latent convention around it.

    The convention is applied by the functions of vaepack/latents.py, traced into the graph, so the
    graph computes exactly ``VAE.encode``/``VAE.decode``. FLUX.2's BatchNorm statistics are kept as
    fp32 buffers here so that the normalization stays fp32 in an fp16 graph.
    """

    def __init__(self, module: nn.Module, part: str, space: Space, image_range: str, native: bool,
                 bn_stats, include_convention: bool, dtype: torch.dtype):
        super().__init__()
        self.net = module
        self.part, self.space, self.image_range, self.native = part, space, image_range, native
        self.include_convention, self.dtype = include_convention, dtype
        if bn_stats is not None:
            self.register_buffer("bn_mean", bn_stats[0].detach().float().clone())
            self.register_buffer("bn_var", bn_stats[1].detach().float().clone())
        else:
            self.bn_mean = self.bn_var = None

    def _stats(self):
        return None if self.bn_mean is None else (self.bn_mean, self.bn_var)

    def forward(self, x):
        conv = self.include_convention
        if conv and self.part == "encoder":
            x = L.to_model_range(x, self.image_range)
        elif conv and not self.native:
            x = L.diffusion_to_mean(x, self.space, self._stats())
        y = self.net(x.to(self.dtype)).float()
        if conv and self.part == "encoder":
            if not self.native:
                y = L.mean_to_diffusion(y, self.space, self._stats())
        elif conv:
            y = L.from_model_range(y, self.image_range).clamp(0, 1)
        return y


class _StepGraph(nn.Module):
    """eps-VAE denoiser step (x_t, t, z) -> v with fp32 I/O; no latent convention (the step works in
    the family's own spaces, see vaepack/models/eps_unet.py)."""

    def __init__(self, step: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.step, self.dtype = step, dtype

    def forward(self, x_t, t, z):
        return self.step(x_t.to(self.dtype), t.to(self.dtype), z.to(self.dtype)).float()


def _bn_stats(entry: ModelEntry, module: nn.Module):
    if entry.space.norm != "flux2_bn":
        return None
    bn = getattr(module, "bn", None)
    return (bn.running_mean, bn.running_var) if bn is not None else None


class _MethodStep(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x_t, t, z):
        return self.module.step(x_t, t, z)


def denoiser_step(entry: ModelEntry, module: nn.Module) -> nn.Module:
    """The eps-VAE decoder's denoiser step v = G(x_t, t, z) as an ``nn.Module``: the family's
    ``denoiser_step(module)`` hook if it has one, else the decoder's ``step`` method
    (vaepack/models/eps_unet.py). x_t (B, 3, H, W) is in the family's units, t (B,) float, z the
    diffusion-space latent (B, C, H/f, W/f)."""
    from vaepack.loader import family_module

    spec = entry.part("decoder")
    if spec.family != "eps":
        raise UsageError(f"part 'eps-step' needs an eps-VAE model; the decoder of '{entry.id}' is "
                         f"family '{spec.family}'", hint="use --part decoder")
    hook = getattr(family_module("eps"), "denoiser_step", None)
    if hook is not None:
        return hook(module)
    if not callable(getattr(module, "step", None)):
        raise ExportError(f"the eps decoder of '{entry.id}' has no step(x_t, t, z) to export")
    return _MethodStep(module)


# --------------------------------------------------------------------------- artifact description
@dataclass
class ExportResult:
    onnx_path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]

    @property
    def parity(self) -> dict[str, Any]:
        return self.sidecar.get("parity", {})

    @property
    def max_abs_err(self) -> float:
        return float(self.parity.get("max_abs_err", float("nan")))


def _io_spec(entry: ModelEntry, part: str, in_channels: int = 3) -> tuple[list[dict], list[dict]]:
    c = entry.space.channels

    def img(name):
        return {"name": name, "shape": ["batch", in_channels, "height", "width"], "dtype": "float32"}

    def lat(name):
        return {"name": name, "shape": ["batch", c, "latent_height", "latent_width"], "dtype": "float32"}

    if part == "encoder":
        return [img("image")], [lat("latent")]
    if part == "decoder":
        return [lat("latent")], [img("image")]
    return [img("x_t"), {"name": "t", "shape": ["batch"], "dtype": "float32"}, lat("z")], [img("v")]


def _dynamic_axes(inputs: list[dict], outputs: list[dict]) -> dict[str, dict[int, str]]:
    return {t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)} for t in inputs + outputs}


def size_multiple(entry: ModelEntry, part: str) -> int:
    """Pixel sizes must be multiples of this: the latent factor, twice that where FLUX.2's 2x2
    packing runs (in the graph, or outside it by the runner)."""
    from vaepack.loader import family_attr

    f = entry.space.factor
    if entry.space.norm != "flux2_bn" or part == "eps-step":
        return f
    # Only networks whose raw latent still needs the convention (the KL family) pack 2x2; TAE and
    # student networks already output the normalized unpacked latent.
    spec = entry.part(_model_part(part))
    return f if family_attr(spec, "NATIVE_IS_DIFFUSION", True) else 2 * f


def space_from_sidecar(sc: dict) -> Space:
    return Space(**sc["space"])


# --------------------------------------------------------------------------- convention outside
def graph_pre(sc: dict, x: torch.Tensor) -> torch.Tensor:
    """Contract input -> graph input for an export without the convention in the graph."""
    if sc["include_convention"] or sc["part"] == "eps-step":
        return x
    if sc["part"] == "encoder":
        return L.to_model_range(x, sc["image_range"])
    if sc["native_is_diffusion"]:
        return x
    return L.diffusion_to_mean(x, space_from_sidecar(sc), _sidecar_bn(sc))


def graph_post(sc: dict, y: torch.Tensor) -> torch.Tensor:
    """Graph output -> contract output (diffusion latent / image in [0, 1])."""
    if sc["include_convention"] or sc["part"] == "eps-step":
        return y
    if sc["part"] == "encoder":
        return y if sc["native_is_diffusion"] else L.mean_to_diffusion(y, space_from_sidecar(sc), _sidecar_bn(sc))
    return L.from_model_range(y, sc["image_range"]).clamp(0, 1)


def _sidecar_bn(sc: dict):
    bn = sc.get("bn_stats")
    if not bn:
        return None
    return torch.tensor(bn["running_mean"], dtype=torch.float32), torch.tensor(bn["running_var"], dtype=torch.float32)


# --------------------------------------------------------------------------- parity inputs
def _real_image(path: Path | None) -> tuple[torch.Tensor, str]:
    """A natural image for the parity check: ``path``, else the first dev image of ../shared, else a
    deterministic synthetic one (smooth gradients plus hard edges)."""
    from vaepack.io import load_image

    if path is None:
        sd = shared_dir()
        cands = sorted((sd / "data" / "dev").glob("*.png")) if sd else []
        path = cands[0] if cands else None
    if path is not None:
        return load_image(Path(path)), Path(path).name
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 256), torch.linspace(0, 1, 256), indexing="ij")
    img = torch.stack([xx, yy, ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1).float()])
    img = 0.8 * img + 0.2 * torch.rand(3, 256, 256, generator=g)
    return img.clamp(0, 1), "synthetic"


def _fit(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Center-crop to the aspect ratio of (h, w), then resize (antialiased) to exactly (h, w)."""
    _, H, W = img.shape
    scale = min(H / h, W / w)
    ch, cw = int(h * scale), int(w * scale)
    top, left = (H - ch) // 2, (W - cw) // 2
    crop = img[:, top:top + ch, left:left + cw][None]
    return F.interpolate(crop, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


# --------------------------------------------------------------------------- export
def _resolve_out_dir(out_dir: str | Path | None) -> Path:
    return Path(out_dir) if out_dir is not None else Path.cwd() / "export" / "artifacts"


def _check_args(entry: ModelEntry, part: str, precision: str, opset: int, exporter: str) -> None:
    if part not in EXPORT_PARTS:
        raise UsageError(f"unknown part '{part}' (choose {', '.join(EXPORT_PARTS)})")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter '{exporter}' (choose {', '.join(EXPORTERS)})")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise UsageError(f"--opset {opset} is too old: the exported ops need opset {MIN_OPSET} or newer",
                         hint=f"the default is {DEFAULT_OPSET}")
    spec = entry.part(_model_part(part))  # UnknownModelError naming the parts it has
    if part == "decoder" and spec.family == "eps":
        raise UsageError(f"the decoder of '{entry.id}' is a diffusion sampler (a loop over noise), not one graph",
                         hint="export its denoiser step with --part eps-step")
    if precision == "fp16" and not entry.fp16_safe:
        raise UsageError(f"model '{entry.id}' overflows in fp16 (manifest: fp16_safe: false)",
                         hint="export with --precision bf16 or fp32, or use fp16-fix weights")
    if precision == "int8" and part == "eps-step":
        raise UsageError("int8 covers encoders and single-pass decoders, not the eps denoiser step",
                         hint="export the step fp32 or fp16")


def export_onnx(model_id: str | ModelEntry, part: str = "decoder", out_dir: str | Path | None = None,
                precision: str = "fp32", opset: int = DEFAULT_OPSET, include_convention: bool = True, *,
                image: str | Path | None = None, parity_sizes=PARITY_SIZES, exporter: str = "torchscript",
                name: str | None = None, tolerance: float | None = None, force: bool = True,
                calibration: dict | None = None) -> ExportResult:
    """Export one part of a manifest model to ``out_dir/<name>.onnx`` + ``<name>.json``.

    Dynamic batch, height and width. The graph passes ``onnx.checker`` (full check) and the parity
    check (``TOLERANCES[precision]`` unless ``tolerance`` is given) before anything is written; both
    files are written atomically, the ONNX file first and the sidecar last.

    int8: the fp32 graph rewritten by ``quantize.quantize_model`` with ``calibration`` (default: the
    shipped or cached calibration of this part, ``quantize.find_calibration``).
    """
    from vaepack.loader import family_attr, load_part

    entry = get_model(model_id) if isinstance(model_id, str) else model_id
    _check_args(entry, part, precision, opset, exporter)
    onnx = require_onnx()
    require_onnxruntime()  # the parity check runs the graph
    out_dir = _resolve_out_dir(out_dir)
    name = name or artifact_name(entry.id, part, precision, opset, include_convention)
    onnx_path, sc_path = out_dir / f"{name}.onnx", out_dir / f"{name}.json"
    if not force:
        from vaepack.io import check_output

        check_output(onnx_path, force=False)

    mpart = _model_part(part)
    spec = entry.part(mpart)
    module, _, digest = load_part(entry, mpart)
    image_range = family_attr(spec, "IMAGE_RANGE", "0,1")
    native = family_attr(spec, "NATIVE_IS_DIFFUSION", True)
    gprec = graph_precision(precision)
    dtype = torch.float16 if gprec == "fp16" else torch.float32
    net = _reduced_precision_copy(module, dtype) if dtype != torch.float32 else module
    cal_source = None
    if calibration is not None and precision != "int8":
        raise UsageError("a calibration is for --precision int8")
    if precision == "int8":
        from vaepack import quantize as Q

        if calibration is None:
            calibration, cal_source = Q.find_calibration(entry, mpart, digest)
        else:
            calibration = Q.check_calibration(calibration, "calibration", entry, mpart, digest)
            cal_source = calibration.get("data", {}).get("source") or "given"
    bn = _bn_stats(entry, module)
    if part == "eps-step":
        include_convention = False
        graph: nn.Module = _StepGraph(denoiser_step(entry, net), dtype).eval()
        ref_fn = _StepGraph(denoiser_step(entry, module), torch.float32).eval()
    else:
        graph = _Graph(net, part, entry.space, image_range, native, bn, include_convention, dtype).eval()
        ref_fn = None
    inputs, outputs = _io_spec(entry, part)
    mult = size_multiple(entry, part)
    if part == "eps-step":
        # The step may pad to its UNet's multiple with a shape-dependent branch that tracing fixes
        # at the example size; the family states the multiple at which no padding happens.
        mult = math.lcm(mult, int(getattr(module, "size_multiple", mult)))
    sizes = [tuple(int(v) for v in s) for s in parity_sizes]
    if len(sizes) < 1 or any(h % mult or w % mult or h <= 0 or w <= 0 for h, w in sizes):
        raise UsageError(f"parity sizes {sizes} must be positive multiples of {mult} for '{entry.id}'")

    sc: dict[str, Any] = {
        "format": SIDECAR_FORMAT, "format_version": FORMAT_VERSION,
        "model": entry.id, "part": part, "family": spec.family,
        "weights_sha256": digest, "precision": precision, "graph_precision": gprec,
        "io_dtype": "float32", "opset": opset, "exporter": exporter,
        "include_convention": include_convention, "image_range": image_range,
        "native_is_diffusion": bool(native), "fp16_safe": entry.fp16_safe,
        "space": dataclasses.asdict(entry.space), "convention": L.convention(entry.space),
        "bn_stats": ({"running_mean": bn[0].float().tolist(), "running_var": bn[1].float().tolist(),
                      "eps": L.FLUX2_BN_EPS} if bn is not None else None),
        "factor": entry.space.factor, "size_multiple": mult,
        "inputs": inputs, "outputs": outputs,
    }
    if calibration is not None:
        from vaepack.quantize import calibration_sha256

        sc["int8"] = {"calibration_sha256": calibration_sha256(calibration), "calibration_file": cal_source,
                      "method": calibration.get("method"), "activations": calibration.get("activations"),
                      "weights": calibration.get("weights"),
                      "calibration_data": {k: v for k, v in calibration.get("data", {}).items() if k != "files"}}
    # Batch 2 and the largest parity size: the dynamo exporter specializes dimensions of size 1.
    example = _example_inputs(entry, part, max(sizes, key=lambda s: s[0] * s[1]), batch=2)

    t0 = time.time()
    from vaepack.io import atomic_output

    with atomic_output(onnx_path) as tmp:
        _torch_export(graph, example, tmp, inputs, outputs, opset, exporter)
        model = onnx.load(str(tmp))
        if calibration is not None:
            from vaepack.quantize import quantize_model

            model, qstats = quantize_model(model, module, calibration)
            sc["int8"].update(qstats)
        actual = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
        if actual != opset:  # the dynamo exporter falls back to its native opset when it cannot convert
            log.warning("%s: asked for opset %d, the exporter wrote opset %d", onnx_path.name, opset, actual)
            sc["opset_requested"], sc["opset"] = opset, actual
        meta = {"vaepack.model": entry.id, "vaepack.part": part, "vaepack.weights_sha256": digest,
                "vaepack.precision": precision, "vaepack.include_convention": str(include_convention).lower(),
                "vaepack.version": __version__}
        del model.metadata_props[:]
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        model.doc_string = f"vaepack {entry.id} {part} ({precision}); see the sidecar {sc_path.name}"
        onnx.save(model, str(tmp))
        del model
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"exported graph fails the ONNX checker: {str(e).splitlines()[0][:200]}",
                              path=str(onnx_path)) from None
        sc["export_seconds"] = round(time.time() - t0, 2)
        sc["parity"] = _parity(sc, tmp, entry, part, module, ref_fn, sizes, image, precision, tolerance)
        sc["onnx_file"] = onnx_path.name
        sc["onnx_sha256"] = sha256_file(tmp)
        sc["onnx_bytes"] = tmp.stat().st_size
        sc["versions"] = _versions("onnxruntime", "onnxscript", "openvino")
        sc["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _publish_mode(tmp)
    with atomic_output(sc_path) as tmp:
        tmp.write_text(json.dumps(sc, indent=1) + "\n")
        _publish_mode(tmp)
    log.info("exported %s (%s); parity max abs err %.3g", onnx_path, precision, sc["parity"]["max_abs_err"])
    return ExportResult(onnx_path, sc_path, sc)


def _example_inputs(entry: ModelEntry, part: str, size: tuple[int, int], batch: int,
                    gen: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    h, w = size
    f, c = entry.space.factor, entry.space.channels
    img = torch.rand(batch, 3, h, w, generator=gen)
    lat = torch.randn(batch, c, h // f, w // f, generator=gen)
    if part == "encoder":
        return (img,)
    if part == "decoder":
        return (lat,)
    return (img * 2 - 1, torch.rand(batch, generator=gen), lat)


def _torch_export(graph: nn.Module, example, path: Path, inputs, outputs, opset: int, exporter: str) -> None:
    names_in = [t["name"] for t in inputs]
    names_out = [t["name"] for t in outputs]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter's deprecation notice and the tracer's "converting a tensor to
            # a Python bool" (FLUX.2's even-size check) are expected here and not actionable.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding")  # chunk() Slices stay unfolded
            warnings.simplefilter("ignore", FutureWarning)  # torch.export internals (dynamo exporter)
            if exporter == "torchscript":
                torch.onnx.export(graph, example, str(path), dynamo=False, opset_version=opset,
                                  input_names=names_in, output_names=names_out,
                                  dynamic_axes=_dynamic_axes(inputs, outputs), do_constant_folding=True)
            else:
                auto = torch.export.Dim.AUTO
                shapes = tuple({i: auto for i, d in enumerate(t["shape"]) if isinstance(d, str)} for t in inputs)
                prog = torch.onnx.export(graph, example, dynamo=True, opset_version=opset,
                                         input_names=names_in, output_names=names_out,
                                         dynamic_shapes=shapes, verbose=False)
                prog.save(str(path))
    except VaepackError:
        raise
    except Exception as e:  # noqa: BLE001 - any exporter failure becomes one clear line
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        other = "dynamo" if exporter == "torchscript" else "torchscript"
        raise ExportError(f"torch.onnx.export ({exporter}) failed: {type(e).__name__}: {msg}",
                          hint=f"try exporter='{other}' or another --opset") from None


def _parity(sc: dict, onnx_file: Path, entry: ModelEntry, part: str, module: nn.Module,
            ref_fn: nn.Module | None, sizes, image, precision: str, tolerance: float | None) -> dict:
    """Run the fresh graph and PyTorch fp32 (the VAE contract) on a random batch and a real image at
    every size; raise ExportError past the tolerance."""
    from vaepack import runtime as R
    from vaepack.loader import family_attr, load_part
    from vaepack.vae import VAE, Part

    tol = TOLERANCES[precision] if tolerance is None else float(tolerance)
    check_prec = precision
    runner: R.Runner
    if precision == "bf16":
        try:
            require_openvino()
            runner = R.OpenVINORunner(onnx_file, sc, precision="bf16", cache=False)
        except BackendUnavailableError:
            # No runtime here executes bf16 from ONNX; check the fp32 graph it runs on instead.
            runner, check_prec = R.OnnxRuntimeRunner(onnx_file, sc, providers=["CPUExecutionProvider"],
                                                     cache=False), "fp32"
            tol = min(tol, TOLERANCES["fp32"]) if tolerance is None else tol
    else:
        runner = R.OnnxRuntimeRunner(onnx_file, sc, providers=["CPUExecutionProvider"], cache=False)

    spec = entry.part(_model_part(part))
    vae = VAE(entry=entry)
    vae.parts[_model_part(part)] = Part(module=module, image_range=family_attr(spec, "IMAGE_RANGE", "0,1"),
                                        native_is_diffusion=family_attr(spec, "NATIVE_IS_DIFFUSION", True),
                                        sha256=sc["weights_sha256"])
    real, real_name = _real_image(Path(image) if image else None)
    encoder = None
    if part == "decoder" and "encoder" in entry.parts:
        enc_spec = entry.part("encoder")
        enc_mod, _, enc_digest = load_part(entry, "encoder")
        encoder = VAE(entry=entry)
        encoder.parts["encoder"] = Part(enc_mod, family_attr(enc_spec, "IMAGE_RANGE", "0,1"),
                                        family_attr(enc_spec, "NATIVE_IS_DIFFUSION", True), enc_digest)

    gen = torch.Generator().manual_seed(1234)
    checks = []
    for size in sizes:
        cases = [("random", _example_inputs(entry, part, size, batch=2, gen=gen))]
        img = _fit(real, *size)
        if part == "encoder":
            cases.append((f"real:{real_name}", (img,)))
        elif part == "decoder" and encoder is not None:
            cases.append((f"real:{real_name}", (encoder.encode(img),)))
        elif part == "eps-step":
            t = torch.full((1,), 0.5)
            cases.append((f"real:{real_name}", (img * 2 - 1, t, torch.randn(1, entry.space.channels,
                                                                         size[0] // entry.space.factor,
                                                                         size[1] // entry.space.factor,
                                                                         generator=gen))))
        else:
            log.warning("%s has no encoder: the decoder parity check uses random latents only", entry.id)
        for label, args in cases:
            with torch.no_grad():
                if part == "encoder":
                    ref = vae.encode(args[0])
                elif part == "decoder":
                    ref = vae.decode(args[0])
                else:
                    ref = ref_fn(*args)
            try:
                got = runner(*args) if part == "eps-step" else runner(args[0])
            except VaepackError:
                raise
            except Exception as e:  # noqa: BLE001 - a runtime's own error: the graph is broken
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise ExportError(f"the exported graph fails in {runner.backend} on {label} "
                                  f"{list(args[0].shape)}: {msg}; nothing was written",
                                  hint="try the other exporter or another --opset") from None
            diff = (got.float() - ref).abs()
            err = float(diff.max()) if torch.isfinite(got).all() else float("inf")
            rng = float(ref.max() - ref.min())
            rel = err / max(rng, 1e-6)
            # int8: activations outside the calibration range clip by design, so random inputs (noise
            # images, Gaussian latents) are recorded but only the real image decides.
            gating = not (precision == "int8" and label == "random")
            checks.append({"input": label, "shape": list(args[0].shape), "max_abs_err": err,
                           "mean_abs_err": float(diff.mean()), "output_range": rng, "rel_err": rel,
                           "passed": rel <= tol or not gating, "gating": gating})
    if check_prec == "fp16" and "CPUExecutionProvider" in runner.describe():
        # onnxruntime's CPU provider has no fp16 Conv: it casts whole fp16 chains to fp32, so this
        # checks the graph and the fp16 weight rounding, not fp16 arithmetic (the engine check does).
        check_prec = "fp16 weights, fp32 arithmetic (onnxruntime CPU)"
    decisive = [c for c in checks if c["gating"]] or checks
    worst = max(decisive, key=lambda c: c["rel_err"])
    result = {
        "reference": "torch fp32 (VAE contract)" if part != "eps-step" else "torch fp32 step",
        "runtime": runner.describe(), "precision_checked": check_prec, "tolerance_rel": tol,
        "max_abs_err": max(c["max_abs_err"] for c in decisive), "max_rel_err": worst["rel_err"],
        "passed": all(c["passed"] for c in checks), "checks": checks,
    }
    if not result["passed"]:
        raise ExportError(
            f"parity check failed for {entry.id} {part} ({precision}): max abs err {worst['max_abs_err']:.3g} "
            f"= {worst['rel_err']:.3g} of the output range on {worst['input']} {worst['shape']}, "
            f"tolerance {tol:g}; nothing was written",
            hint="export fp32, or report it with the model and opset")
    return result


def parity_summary(parity: dict) -> list[str]:
    """Lines for the CLI: one per parity check, then the verdict."""
    lines = [f"{c['input']:<28} {'x'.join(map(str, c['shape'])):<16} max abs err {c['max_abs_err']:.3g} "
             f"({c['rel_err']:.2g} of range {c['output_range']:.3g})" for c in parity.get("checks", [])]
    verdict = "passed" if parity.get("passed") else "FAILED"
    lines.append(f"parity {verdict}: max abs err {parity.get('max_abs_err', float('nan')):.3g}, tolerance "
                 f"{parity.get('tolerance_rel')} of the range ({parity.get('precision_checked', '?')} on "
                 f"{parity.get('runtime', '?')})")
    return lines


# --------------------------------------------------------------------------- reading artifacts
def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    onnx_path = Path(onnx_path)
    sp = sidecar_path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError("no such ONNX file", path=str(onnx_path))
    try:
        sc = json.loads(sp.read_text())
    except FileNotFoundError:
        raise ExportError(f"no sidecar {sp.name} next to the ONNX file", path=str(onnx_path),
                          hint="only files written by `vaepack export` can be used; re-export") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"unreadable sidecar ({e})", path=str(sp), hint="re-export the model") from None
    if not isinstance(sc, dict) or sc.get("format") != SIDECAR_FORMAT:
        raise ExportError(f"not a vaepack export sidecar (format {sc.get('format') if isinstance(sc, dict) else '?'})",
                          path=str(sp))
    missing = [k for k in ("model", "part", "weights_sha256", "onnx_sha256", "include_convention", "space",
                           "inputs", "outputs", "graph_precision") if k not in sc]
    if missing:
        raise ExportError(f"sidecar lacks {', '.join(missing)}", path=str(sp), hint="re-export the model")
    return sc


def verify_artifact(onnx_path: str | Path, weights_sha256: str | None = None, *,
                    check_weights: bool = True) -> dict[str, Any]:
    """Sidecar of ``onnx_path`` after checking that the file is the one the sidecar describes and
    that it was exported from the model's current weights (``weights_sha256``, else the weights
    the manifest resolves to now). Raises ExportError otherwise."""
    onnx_path = Path(onnx_path)
    sc = read_sidecar(onnx_path)
    have = _file_sha256_cached(onnx_path)
    if have != sc["onnx_sha256"]:
        raise ExportError(f"ONNX file does not match its sidecar (sha256 {have[:12]}…, sidecar says "
                          f"{sc['onnx_sha256'][:12]}…)", path=str(onnx_path), hint="re-export the model")
    if check_weights:
        want = weights_sha256 or weights_digest(get_model(sc["model"]), _model_part(sc["part"]))
        if sc["weights_sha256"] != want:
            raise ExportError(f"exported from weights {sc['weights_sha256'][:12]}… but the {sc['part']} of "
                              f"'{sc['model']}' is now {want[:12]}…", path=str(onnx_path),
                              hint=f"re-export: vaepack export {sc['model']} --part {sc['part']} --onnx")
    return sc


def export_cache_dir() -> Path:
    return cache_dir() / "exports"


def cached_export(model_id: str, part: str, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                  include_convention: bool = True, **kw) -> ExportResult:
    """The export runtimes use: ``<cache>/exports/<model>/`` keyed by part, graph precision, opset,
    convention and weights sha256; exported on first use, verified on every later use."""
    entry = get_model(model_id)
    _check_args(entry, part, precision, opset, kw.get("exporter", "torchscript"))
    gprec = graph_precision(precision)
    digest = weights_digest(entry, _model_part(part))
    key = digest.replace("+", "")[:16]
    cal = None
    if gprec == "int8":  # a new calibration is a new graph
        from vaepack import quantize as Q

        cal = Q.find_calibration(entry, _model_part(part), digest)[0]
        key += "-cal" + Q.calibration_sha256(cal)[:8]
    name = artifact_name(entry.id, part, gprec, opset, include_convention) + f"-{key}"
    out = export_cache_dir() / entry.id
    path = out / f"{name}.onnx"
    if path.is_file():
        try:
            sc = verify_artifact(path, weights_sha256=digest)
            return ExportResult(path, sidecar_path(path), sc)
        except ExportError as e:
            log.warning("cached export is unusable (%s); exporting again", e)
    return export_onnx(entry, part, out, precision=gprec, opset=opset, include_convention=include_convention,
                       name=name, calibration=cal, **kw)


# --------------------------------------------------------------------------- TensorRT profiles
@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def __str__(self):
        return f"{self.min}-{self.max} (opt {self.opt})"


@dataclass(frozen=True)
class Profile:
    """A named TensorRT optimization profile: batch and pixel-size ranges, precisions per family."""

    name: str
    path: Path
    batch: Range
    height: Range
    width: Range
    precision: dict[str, tuple[str, ...]] = field(default_factory=dict)  # family -> preference order
    workspace_gb: float = 4.0
    description: str = ""

    def precision_for(self, family: str, fp16_safe: bool) -> str:
        """First precision the profile lists for the family that the model can take."""
        prefs = self.precision.get(family) or self.precision.get("default") or ("fp32",)
        for p in prefs:
            if p == "fp16" and not fp16_safe:
                continue  # SDXL/FLUX-class VAEs overflow in fp16
            return p
        return "fp32"

    def describe(self) -> str:
        return f"batch {self.batch.min}-{self.batch.max}, {self.height.min}-{self.height.max} x " \
               f"{self.width.min}-{self.width.max} px"

    def as_dict(self) -> dict:
        return {"name": self.name, "batch": dataclasses.asdict(self.batch),
                "height": dataclasses.asdict(self.height), "width": dataclasses.asdict(self.width),
                "precision": {k: list(v) for k, v in self.precision.items()}, "workspace_gb": self.workspace_gb}


def profile_dirs() -> list[Path]:
    """``$VAEPACK_PROFILES``, then the checkout's export/profiles, then ./export/profiles."""
    dirs = []
    env = os.environ.get("VAEPACK_PROFILES")
    if env:
        dirs += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    dirs += [package_dir().parent / "export" / "profiles", Path.cwd() / "export" / "profiles"]
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen and d.is_dir():
            seen.add(r)
            out.append(d)
    return out


def list_profiles() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in profile_dirs():
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


def _range(d: Any, key: str, where: str) -> Range:
    v = d.get(key) if isinstance(d, dict) else None
    try:
        r = Range(int(v["min"]), int(v["opt"]), int(v["max"]))
    except (TypeError, KeyError, ValueError):
        raise UsageError(f"'{key}' needs min, opt and max integers", path=where) from None
    if not (0 < r.min <= r.opt <= r.max):
        raise UsageError(f"'{key}' needs 0 < min <= opt <= max, got {r.min}/{r.opt}/{r.max}", path=where)
    return r


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by name (``export/profiles/<name>.yaml``) or by path to a YAML file."""
    import yaml

    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") or p.is_file()):
        known = list_profiles()
        if str(name_or_path) not in known:
            raise UsageError(f"unknown TensorRT profile '{name_or_path}'",
                             hint=f"known: {', '.join(known) or 'none found'}; or pass a YAML file")
        p = known[str(name_or_path)]
    where = str(p)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise UsageError(f"cannot read the profile ({e.strerror})", path=where) from None
    except yaml.YAMLError as e:
        raise UsageError(f"invalid YAML ({str(e).splitlines()[0]})", path=where) from None
    if not isinstance(data, dict):
        raise UsageError("a profile must be a mapping", path=where)
    prec: dict[str, tuple[str, ...]] = {}
    for fam, v in (data.get("precision") or {}).items():
        vals = (v,) if isinstance(v, str) else tuple(v or ())
        bad = [x for x in vals if x not in TRT_PRECISIONS]
        if bad or not vals:
            raise UsageError(f"precision.{fam}: {bad or 'empty'} (choose from {', '.join(TRT_PRECISIONS)})", path=where)
        prec[str(fam)] = vals
    try:
        ws = float(data.get("workspace_gb", 4.0))
    except (TypeError, ValueError):
        raise UsageError("workspace_gb must be a number", path=where) from None
    return Profile(name=str(data.get("name") or p.stem), path=p, batch=_range(data, "batch", where),
                   height=_range(data, "height", where), width=_range(data, "width", where),
                   precision=prec, workspace_gb=ws, description=str(data.get("description", "")))


def profile_shapes(profile: Profile, sc: dict) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input name -> (min, opt, max) shapes of the profile for an export described by ``sc``.
    Pixel ranges are rounded inwards to the model's size multiple; latents follow by the factor."""
    f, m = sc["factor"], sc["size_multiple"]

    def px(r: Range) -> tuple[int, int, int]:
        lo, hi = -(-r.min // m) * m, (r.max // m) * m
        if lo > hi:
            raise UsageError(f"TensorRT profile '{profile.name}' has no size that is a multiple of {m} "
                             f"(needed by {sc['model']})", path=str(profile.path))
        return lo, min(max(round(r.opt / m) * m, lo), hi), hi

    hs, ws, bs = px(profile.height), px(profile.width), (profile.batch.min, profile.batch.opt, profile.batch.max)
    out = {}
    for t in sc["inputs"]:
        shape = t["shape"]
        dims = []
        for i in range(3):
            d = []
            for s in shape:
                d.append({"batch": bs[i], "height": hs[i], "width": ws[i], "latent_height": hs[i] // f,
                          "latent_width": ws[i] // f}.get(s, s) if isinstance(s, str) else s)
            dims.append(tuple(d))
        out[t["name"]] = tuple(dims)
    return out


def check_profile_shape(profile: Profile, sc: dict, shape: tuple[int, ...]) -> None:
    """Refuse an input shape outside ``profile`` before running (the error names the profile)."""
    b = shape[0]
    h, w = shape[-2], shape[-1]
    if sc["inputs"][0]["shape"][2] == "latent_height":
        h, w = h * sc["factor"], w * sc["factor"]
    ok = (profile.batch.min <= b <= profile.batch.max and profile.height.min <= h <= profile.height.max
          and profile.width.min <= w <= profile.width.max)
    if not ok:
        raise UsageError(f"input batch {b} at {h}x{w} px is outside TensorRT profile '{profile.name}' "
                         f"({profile.describe()})",
                         hint="build an engine with a profile that covers it, e.g. --profile hires-1024 or batch-256")


# --------------------------------------------------------------------------- TensorRT engines
def _check_trt_precision(chosen: str) -> None:
    if chosen == "int8":
        raise UsageError("TensorRT engines are not built int8 here: vaepack's int8 graphs use asymmetric "
                         "activations, which TensorRT does not take", hint="int8 runs on --backend openvino or onnxruntime")
    if chosen not in TRT_PRECISIONS:
        raise UsageError(f"unknown precision '{chosen}' (choose {', '.join(TRT_PRECISIONS)})")


def _trt_has(trt, enum: str, member: str) -> bool:
    return hasattr(getattr(trt, enum, None), member)


def build_trt_engine(onnx_path: str | Path, profile: str | Path | Profile, precision: str | None = None, *,
                     out_path: str | Path | None = None, workspace_gb: float | None = None,
                     timing_cache: str | Path | None = None, parity: bool = True,
                     check_weights: bool = True) -> Path:
    """Build and serialize a TensorRT engine from a vaepack ONNX export.

    - precision: ``None`` takes the profile's choice for the model's family (skipping fp16 for
      models with ``fp16_safe: false``); an explicit fp16 for such a model is refused.
    - An fp16 graph (``graph_precision: fp16``) is built strongly typed: the ONNX carries the dtypes.
      bf16 (and fp16 on an fp32 graph) uses TensorRT 10's weak-typing flags with every Resize layer
      pinned to fp32 (TensorRT has no bf16 Resize); TensorRT 11 dropped those flags, so there it
      needs an fp16 export instead. fp32 disables TF32 so the fp32 parity tolerance holds.
    - The timing cache (default ``<cache>/tensorrt/timing-<gpu>-trt<version>.cache``) is read and
      updated; the workspace limit comes from the argument or the profile.
    Writes ``<engine>`` and ``<engine minus suffix>.json`` atomically, after a parity check of the
    engine against PyTorch fp32 at the profile's min and opt sizes (``parity=False`` skips it).
    """
    from vaepack.io import atomic_output
    from vaepack.weights import atomic_write_bytes

    onnx_path = Path(onnx_path)
    sc = verify_artifact(onnx_path, check_weights=check_weights)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    if sc["part"] == "eps-step" and precision is None:
        precision = prof.precision_for("eps", sc.get("fp16_safe", True))
    chosen = precision or prof.precision_for(sc["family"], sc.get("fp16_safe", True))
    _check_trt_precision(chosen)
    if chosen == "fp16" and not sc.get("fp16_safe", True):
        raise UsageError(f"model '{sc['model']}' overflows in fp16 (manifest: fp16_safe: false)",
                         hint="build it with --precision bf16 or fp32, or use fp16-fix weights")
    if sc["graph_precision"] == "fp16" and chosen != "fp16":
        raise UsageError(f"{onnx_path.name} is an fp16 graph; a {chosen} engine needs the fp32 export",
                         path=str(onnx_path), hint=f"export with --precision {chosen}")
    shapes = profile_shapes(prof, sc)  # also checks the profile against the model's size multiple
    trt = require_tensorrt()

    strongly_typed = sc["graph_precision"] == "fp16" or chosen == "fp32"
    weak = not strongly_typed
    if weak and not _trt_has(trt, "BuilderFlag", chosen.upper()):
        raise ExportError(f"TensorRT {trt.__version__} builds only strongly typed networks and has no {chosen} "
                          "flag for an fp32 graph", hint="build from an --precision fp16 export, or fp32")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and _trt_has(trt, "NetworkDefinitionCreationFlag", "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse the ONNX graph: {errs[:300]}", path=str(onnx_path))
    config = builder.create_builder_config()
    ws = workspace_gb if workspace_gb is not None else prof.workspace_gb
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(ws * (1 << 30)))
    if chosen == "fp32" and _trt_has(trt, "BuilderFlag", "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if weak:
        config.set_flag(getattr(trt.BuilderFlag, chosen.upper()))
        pinned = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if chosen == "bf16" and layer.type == trt.LayerType.RESIZE:  # TensorRT has no bf16 Resize
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
                pinned += 1
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    opt = builder.create_optimization_profile()
    for name, (mn, op, mx) in shapes.items():
        opt.set_shape(name, mn, op, mx)
    config.add_optimization_profile(opt)

    gpu = torch.cuda.get_device_name(0).replace(" ", "_")
    tc_path = (Path(timing_cache) if timing_cache
               else cache_dir() / "tensorrt" / f"timing-{gpu}-trt{trt.__version__}.cache")
    tc_bytes = tc_path.read_bytes() if tc_path.is_file() else b""
    cache = config.create_timing_cache(tc_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.time()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build a {chosen} engine for profile '{prof.name}'",
                          path=str(onnx_path), hint="see the TensorRT log above; try fp32 or a smaller profile")
    atomic_write_bytes(tc_path, bytes(config.get_timing_cache().serialize()))

    out = Path(out_path) if out_path else onnx_path.with_name(f"{onnx_path.stem}.{prof.name}.{chosen}.engine")
    esc = {k: v for k, v in sc.items() if k not in ("parity", "format", "onnx_file")}
    esc.update({
        "format": ENGINE_FORMAT, "format_version": FORMAT_VERSION, "engine_file": out.name,
        "onnx_file": onnx_path.name, "onnx_sha256": sc["onnx_sha256"], "engine_precision": chosen,
        "strongly_typed": strongly_typed, "profile": prof.as_dict(),
        "profile_shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
        "workspace_gb": ws, "timing_cache": str(tc_path), "gpu": torch.cuda.get_device_name(0),
        "build_seconds": round(time.time() - t0, 1), "versions": _versions("tensorrt"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    with atomic_output(out) as tmp:
        tmp.write_bytes(bytes(plan))
        esc["engine_sha256"] = sha256_file(tmp)
        if parity and sc["part"] != "eps-step":
            esc["parity"] = _trt_parity(tmp, esc, prof, chosen)
        _publish_mode(tmp)
    with atomic_output(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(esc, indent=1) + "\n")
        _publish_mode(tmp)
    return out


def export_trt(model_id: str, part: str = "decoder", profile: str | Path = "hires-1024", precision: str | None = None,
               out_dir: str | Path | None = None, opset: int = DEFAULT_OPSET, include_convention: bool = True,
               **kw) -> tuple[ExportResult, Path]:
    """``vaepack export --trt``: resolve the precision (argument, else the profile's choice for the
    model's family), export the matching ONNX graph (fp16 graph for fp16, fp32 graph otherwise),
    build the engine next to it. Checks TensorRT/CUDA first so nothing is exported in vain."""
    entry = get_model(model_id)
    prof = load_profile(profile)
    family = "eps" if part == "eps-step" else entry.part(part).family
    chosen = precision or prof.precision_for(family, entry.fp16_safe)
    _check_args(entry, part, chosen, opset, kw.get("exporter", "torchscript"))
    _check_trt_precision(chosen)
    require_tensorrt()
    res = export_onnx(entry, part, out_dir, precision=chosen, opset=opset, include_convention=include_convention, **kw)
    return res, build_trt_engine(res.onnx_path, prof, chosen)


def read_engine_sidecar(engine_path: str | Path) -> dict[str, Any]:
    engine_path = Path(engine_path)
    sp = engine_path.with_suffix(".json")
    try:
        esc = json.loads(sp.read_text())
    except (OSError, ValueError):
        raise ExportError(f"no readable sidecar {sp.name} next to the engine", path=str(engine_path),
                          hint="build engines with `vaepack export --trt`") from None
    if esc.get("format") != ENGINE_FORMAT:
        raise ExportError("not a vaepack TensorRT engine sidecar", path=str(sp))
    if _file_sha256_cached(engine_path) != esc.get("engine_sha256"):
        raise ExportError("engine file does not match its sidecar", path=str(engine_path), hint="rebuild it")
    return esc


def _trt_parity(engine_file: Path, esc: dict, prof: Profile, precision: str) -> dict:
    """Engine vs PyTorch fp32 at the profile's min and opt sizes (random inputs and a real image)."""
    from vaepack import runtime as R
    from vaepack.vae import load_vae

    runner = R.TensorRTRunner(engine_file, esc, profile=prof, verify=False)
    vae = load_vae(esc["model"], parts=tuple({esc["part"], "encoder"} & set(get_model(esc["model"]).parts)),
                   device="cpu")
    real, real_name = _real_image(None)
    m = esc["size_multiple"]
    sizes = {(max(prof.height.min // m * m, m), max(prof.width.min // m * m, m)),
             (prof.height.opt // m * m, prof.width.opt // m * m)}
    tol = TOLERANCES[precision]
    checks = []
    gen = torch.Generator().manual_seed(1234)
    entry = get_model(esc["model"])
    for size in sorted(sizes):
        x = _example_inputs(entry, esc["part"], size, batch=max(prof.batch.min, 1), gen=gen)[0]
        img = _fit(real, *size)
        cases = [("random", x)]
        if esc["part"] == "encoder":
            cases.append((f"real:{real_name}", img))
        elif vae.has("encoder"):
            cases.append((f"real:{real_name}", vae.encode(img)))
        for label, inp in cases:
            ref = vae.encode(inp) if esc["part"] == "encoder" else vae.decode(inp)
            got = runner(inp).float().cpu()
            err = float((got - ref).abs().max())
            rng = float(ref.max() - ref.min())
            checks.append({"input": label, "shape": list(inp.shape), "max_abs_err": err, "output_range": rng,
                           "rel_err": err / max(rng, 1e-6), "passed": err / max(rng, 1e-6) <= tol})
    worst = max(checks, key=lambda c: c["rel_err"])
    if not worst["passed"]:
        raise ExportError(f"TensorRT {precision} engine parity failed: max abs err {worst['max_abs_err']:.3g} "
                          f"({worst['rel_err']:.3g} of the range) on {worst['input']} {worst['shape']}, "
                          f"tolerance {tol:g}; nothing was written", hint="build fp32 or bf16")
    return {"reference": "torch fp32 (VAE contract)", "runtime": runner.describe(), "tolerance_rel": tol,
            "max_abs_err": max(c["max_abs_err"] for c in checks), "max_rel_err": worst["rel_err"],
            "passed": True, "checks": checks}


__all__ = [
    "DEFAULT_OPSET", "EXPORT_PARTS", "PRECISIONS", "TOLERANCES", "ExportResult", "Profile", "build_trt_engine",
    "cached_export", "check_profile_shape", "export_onnx", "export_trt", "graph_post", "graph_pre",
    "list_profiles", "load_profile", "parity_summary", "profile_shapes", "read_engine_sidecar", "read_sidecar",
    "verify_artifact",
]
