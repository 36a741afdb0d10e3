"""Encoder/decoder distillation (paper 000, III-C). Stub; filled below."""
from __future__ import annotations
import torch
from torch import nn


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
        with torch.no_grad():
            model(torch.zeros(shape))
    finally:
        for h in hs:
            h.remove()
    return total
