"""Teachers for distillation: a zoo model as teacher modules (what `vaepack distill` uses), or a TAE
part from an upstream ``nn.Sequential`` .pth (what benchmarks/ use)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vaepack.errors import UsageError, VaepackError


@dataclass
class Teacher:
    """A zoo model's parts as modules under the one contract ([0, 1] images <-> diffusion-space
    latents), with what distillation records and warm-starts from."""

    id: str  # the manifest id (recorded as the run's teacher)
    encoder: nn.Module  # vaepack.vae.TeacherEncoder: a KL teacher gives a seeded reparameterized sample
    decoder: nn.Module | None  # vaepack.vae.TeacherDecoder, for decoder distillation
    config: object | None  # the distilled part's architecture as the manifest states it (warm starts)


def load_teacher(model_id: str, part: str = "encoder", *, device: str | None = None, seed: int = 0,
                 warm_start: bool = False) -> Teacher:
    """Load a zoo model as the teacher of ``part`` distillation (torch, fp32; the decoder too for
    ``part="decoder"``). ``warm_start``: the student starts from the teacher's ``part``, which must be
    TAE-family; its TAEConfig comes from the manifest."""
    from vaepack.loader import make_config
    from vaepack.vae import TeacherDecoder, TeacherEncoder, load_torch_vae

    vae = load_torch_vae(model_id, parts=("encoder", "decoder") if part == "decoder" else ("encoder",), device=device)
    spec = vae.entry.part(part)
    if warm_start and spec.family != "tae":
        raise UsageError(f"--init-from-teacher needs a TAE-family teacher {part}; '{vae.entry.id}' is "
                         f"'{spec.family}' (use --random-init)")
    return Teacher(id=vae.entry.id, encoder=TeacherEncoder(vae, sample=True, seed=seed),
                   decoder=TeacherDecoder(vae) if part == "decoder" else None,
                   config=make_config(spec, vae.entry.id) if warm_start else None)


def load_tae_teacher(path: str | os.PathLike, part: str, latent_channels: int = 32, midblock_gn: bool = True) -> nn.Module:
    """A TAE-family part from an upstream ``nn.Sequential`` .pth (e.g. TAEF2), as float32."""
    from vaepack.models import tae

    path = Path(path)
    if not path.is_file():
        raise VaepackError("teacher weights not found", path=str(path), hint="pass --teacher-encoder/--teacher-decoder")
    cfg = tae.TAEConfig(kind="f8", latent_channels=latent_channels, midblock_gn=midblock_gn)
    m = tae.build(part, cfg)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    m.load_state_dict({k: v.float() for k, v in tae.convert_state_dict(part, sd, cfg).items()})
    return m.eval()


def latent_channels_of(encoder: nn.Module) -> int:
    """Channels of a teacher encoder's latent, measured on a 16 px input (on the CPU, in float32)."""
    with torch.no_grad():
        return encoder.float().cpu()(torch.zeros(1, 3, 16, 16)).shape[1]
