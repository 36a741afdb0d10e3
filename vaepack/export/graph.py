"""What gets exported: the network wrapped with fp32 I/O and (optionally) the latent convention, the
eps-VAE denoiser step, reduced-precision copies, and the call into torch.onnx.export."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from vaepack import latents as L
from vaepack.errors import ExportError, UsageError, VaepackError
from vaepack.manifest import ModelEntry, Space


class Fp32Norm(nn.Module):
    """A normalization layer run in fp32 inside a reduced-precision graph: its mean/variance sums
    over a whole group lose precision (and can overflow) in fp16."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x.float()).to(x.dtype)


def reduced_precision_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    low = copy.deepcopy(module).to(dtype)
    ref = dict(module.named_modules())
    norm_types = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
    for name, sub in list(low.named_modules()):
        if name and isinstance(sub, norm_types):
            parent_name, _, attr = name.rpartition(".")
            parent = low.get_submodule(parent_name) if parent_name else low
            setattr(parent, attr, Fp32Norm(copy.deepcopy(ref[name]).float()))
    return low


class ContractGraph(nn.Module):
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


class StepGraph(nn.Module):
    """eps-VAE denoiser step (x_t, t, z) -> v with fp32 I/O; no latent convention (the step works in
    the family's own spaces, see vaepack/models/eps_unet.py)."""

    def __init__(self, step: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.step, self.dtype = step, dtype

    def forward(self, x_t, t, z):
        return self.step(x_t.to(self.dtype), t.to(self.dtype), z.to(self.dtype)).float()




class MethodStep(nn.Module):
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
    return MethodStep(module)



def io_spec(entry: ModelEntry, part: str, in_channels: int = 3) -> tuple[list[dict], list[dict]]:
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


def dynamic_axes(inputs: list[dict], outputs: list[dict]) -> dict[str, dict[int, str]]:
    return {t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)} for t in inputs + outputs}



def example_inputs(entry: ModelEntry, part: str, size: tuple[int, int], batch: int,
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


def torch_export(graph: nn.Module, example, path: Path, inputs, outputs, opset: int, exporter: str) -> None:
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
                                  dynamic_axes=dynamic_axes(inputs, outputs), do_constant_folding=True)
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

