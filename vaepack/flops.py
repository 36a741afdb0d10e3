"""Count the arithmetic of one forward pass, and the size of a module's weights.

Convention: a MAC is one multiply-accumulate; FLOPs = 2 * MACs (the convention of most papers and
of vendors' peak numbers, so "achieved GFLOP/s" can be compared with a spec sheet). Counted:

- ``nn.Conv2d``: output elements x (in_channels / groups) x kh x kw, via forward hooks.
- ``nn.ConvTranspose2d``: input elements x (out_channels / groups) x kh x kw (every input element
  is scattered through the kernel), via forward hooks.
- ``nn.Linear``: output elements x in_features, via forward hooks.
- Matrix products done functionally (``F.scaled_dot_product_attention``: Q.K^T plus A.V;
  ``torch.matmul``/``@``/``bmm``/``baddbmm``/``mm``), via a TorchFunctionMode, so the attention of
  KL autoencoders is included. Set ``include_matmul=False`` to count module layers only.

Not counted: bias additions, normalizations, activations, softmax, upsampling, residual adds and
other elementwise work. They are memory-bound and, in the autoencoders here, well under 2% of the
MACs; counting them as "FLOPs" would mostly measure a convention, not the compute.

The module is run once on zeros of the given shape, in eval mode (so BatchNorm statistics are not
touched) and without gradients; its training flag is restored afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["FlopCount", "count_flops", "count_macs", "param_count", "param_bytes"]


@dataclass
class FlopCount:
    macs: int
    by_type: dict[str, int] = field(default_factory=dict)  # MACs per counted op kind
    input_shape: tuple[int, ...] = ()

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def batch(self) -> int:
        return self.input_shape[0] if self.input_shape else 1

    @property
    def macs_per_item(self) -> float:
        return self.macs / self.batch

    @property
    def flops_per_item(self) -> float:
        return self.flops / self.batch


def _conv_macs(mod: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    k = math.prod(mod.kernel_size)
    if isinstance(mod, nn.ConvTranspose2d):
        return inp.numel() * (mod.out_channels // mod.groups) * k
    return out.numel() * (mod.in_channels // mod.groups) * k


def _matmul_macs(a: torch.Tensor, b: torch.Tensor) -> int:
    """MACs of torch.matmul(a, b) with broadcasting: prod(batch) x n x k x m."""
    if a.dim() == 1 and b.dim() == 1:
        return a.shape[0]
    a2 = a.unsqueeze(0) if a.dim() == 1 else a
    b2 = b.unsqueeze(-1) if b.dim() == 1 else b
    batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    return math.prod(batch) * a2.shape[-2] * a2.shape[-1] * b2.shape[-1]


class _MatmulCounter(TorchFunctionMode):
    """Adds the MACs of functional matrix products; nested calls run with the mode disabled."""

    def __init__(self, sink: dict[str, int]):
        super().__init__()
        self.sink = sink

    def _add(self, key: str, n: int) -> None:
        self.sink[key] = self.sink.get(key, 0) + int(n)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            if func is torch.nn.functional.scaled_dot_product_attention:
                q, k, v = args[0], args[1], args[2]
                # Q.K^T (L x E by E x S) then A.V (L x S by S x Ev), over the broadcast batch dims.
                batch = math.prod(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]))
                self._add("attention", batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1]))
            elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
                          torch.Tensor.bmm, torch.mm, torch.Tensor.mm):
                self._add("matmul", _matmul_macs(args[0], args[1]))
            elif func in (torch.baddbmm, torch.Tensor.baddbmm, torch.addmm):
                self._add("matmul", _matmul_macs(args[1], args[2]))
        except (IndexError, AttributeError, RuntimeError):
            pass  # an unusual call signature: not counted rather than failing the whole count
        return func(*args, **kwargs)


def count_flops(module: nn.Module, input_shape, *, include_matmul: bool = True,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                run: Callable[[torch.Tensor], object] | None = None) -> FlopCount:
    """Count MACs (and FLOPs = 2 * MACs) of ``module(zeros(input_shape))``; see the module docstring.

    ``run`` replaces the call ``module(x)`` when the real computation wraps the module (e.g.
    ``VAE.decode``, which converts ranges and may call a diffusion decoder several times); every
    counted layer call inside ``module`` is counted however often it runs.
    ``dtype``/``device`` default to those of the module's first parameter (float32/CPU if none).
    Divide by the batch (``FlopCount.flops_per_item``) for a per-image number.
    """
    shape = tuple(int(s) for s in input_shape)
    first = next(module.parameters(), None)
    dtype = dtype or (first.dtype if first is not None and first.is_floating_point() else torch.float32)
    device = device or (first.device if first is not None else "cpu")
    counts: dict[str, int] = {}

    def hook(mod, inputs, out):
        key = type(mod).__name__
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            n = _conv_macs(mod, inputs[0], out)
        else:  # nn.Linear
            n = out.numel() * mod.in_features
        counts[key] = counts.get(key, 0) + n

    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, kinds)]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(shape, dtype=dtype, device=device)
            call = run or module
            if include_matmul:
                with _MatmulCounter(counts):
                    call(x)
            else:
                call(x)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return FlopCount(macs=sum(counts.values()), by_type=counts, input_shape=shape)


def count_macs(module: nn.Module, input_shape, **kw) -> int:
    """MACs of one forward pass on ``input_shape`` (whole batch)."""
    return count_flops(module, input_shape, **kw).macs


def param_count(module: nn.Module) -> int:
    """Number of parameters (shared parameters counted once); buffers are not parameters."""
    return sum(p.numel() for p in module.parameters())


def param_bytes(module: nn.Module, include_buffers: bool = False) -> int:
    """Bytes of the parameters at the dtype they are stored in (e.g. 2 per value for bf16).

    ``include_buffers`` adds floating-point buffers (e.g. BatchNorm running statistics), which a
    weights file also stores; integer bookkeeping buffers (num_batches_tracked) are left out.
    """
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    if include_buffers:
        total += sum(b.numel() * b.element_size() for b in module.buffers() if b.is_floating_point())
    return total
