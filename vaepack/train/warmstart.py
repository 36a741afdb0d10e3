"""Warm starts of distillation students: from the teacher (fewer blocks, or fewer channels) or
from a vaepack-written .safetensors (``--init``).

A warm start converges far faster than a random init on a CPU budget (benchmarks/results/
distill_defaults.md).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vaepack.errors import ImageError, UsageError, VaepackError
from vaepack.models import tae
from vaepack.train.common import load_rgb, training_images
from vaepack.train.teachers import latent_channels_of

if TYPE_CHECKING:
    from vaepack.train.config import DistillConfig, DistillDecoderConfig


@torch.no_grad()
def prune_tae_decoder(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Slice a wider TAE decoder's state dict down to ``cfg.width`` channels (a warm start).

    All residual-stream tensors share one channel set (the skips tie them together), chosen by the
    L1 norm of the weights writing and reading each channel; each block's two inner activations and
    its GroupNorm pool keep their own top channels (per GroupNorm group, so the groups survive).
    """
    w = cfg.width
    ref = tae.build("decoder", cfg)
    names = {k for k in ref.state_dict()}
    blocks = sorted({k.split(".")[0] for k in names if ".conv.0." in k}, key=int)
    stream = torch.zeros(sd["1.weight"].shape[0])
    writers = ["1.weight"] + [f"{b}.conv.4.weight" for b in blocks] + [f"{b}.pool.3.weight" for b in blocks if f"{b}.pool.3.weight" in sd]
    ups = [k for k in names if k.endswith(".weight") and k.split(".")[0] not in blocks and k != "1.weight"
           and sd[k].dim() == 4 and sd[k].shape[0] == sd[k].shape[1]]
    readers = [f"{b}.conv.0.weight" for b in blocks] + [f"{b}.pool.0.weight" for b in blocks if f"{b}.pool.0.weight" in sd]
    last = max((k for k in names if k.endswith(".weight") and sd[k].dim() == 4), key=lambda k: int(k.split(".")[0]))
    for k in writers + ups:
        stream += sd[k].abs().flatten(1).sum(1)
    for k in readers + ups + [last]:
        stream += sd[k].abs().transpose(0, 1).flatten(1).sum(1)
    S = stream.topk(w).indices.sort().values

    def top(a, b, n):
        score = sd[a].abs().flatten(1).sum(1) * sd[b].abs().transpose(0, 1).flatten(1).sum(1)
        return score.topk(n).indices.sort().values

    out = {}
    out["1.weight"], out["1.bias"] = sd["1.weight"][S], sd["1.bias"][S]
    for k in ups:
        out[k] = sd[k][S][:, S]
    out[last] = sd[last][:, S]
    out[last.replace("weight", "bias")] = sd[last.replace("weight", "bias")]
    for b in blocks:
        A = top(f"{b}.conv.0.weight", f"{b}.conv.2.weight", w)
        B = top(f"{b}.conv.2.weight", f"{b}.conv.4.weight", w)
        out[f"{b}.conv.0.weight"], out[f"{b}.conv.0.bias"] = sd[f"{b}.conv.0.weight"][A][:, S], sd[f"{b}.conv.0.bias"][A]
        out[f"{b}.conv.2.weight"], out[f"{b}.conv.2.bias"] = sd[f"{b}.conv.2.weight"][B][:, A], sd[f"{b}.conv.2.bias"][B]
        out[f"{b}.conv.4.weight"], out[f"{b}.conv.4.bias"] = sd[f"{b}.conv.4.weight"][S][:, B], sd[f"{b}.conv.4.bias"][S]
        if f"{b}.pool.0.weight" in sd:
            c_old = sd[f"{b}.pool.0.weight"].shape[0] // 4
            score = sd[f"{b}.pool.0.weight"].abs().flatten(1).sum(1) * sd[f"{b}.pool.3.weight"].abs().transpose(0, 1).flatten(1).sum(1)
            H = torch.cat([g * c_old + score[g * c_old:(g + 1) * c_old].topk(w).indices.sort().values for g in range(4)])
            out[f"{b}.pool.0.weight"] = sd[f"{b}.pool.0.weight"][H][:, S]
            out[f"{b}.pool.1.weight"], out[f"{b}.pool.1.bias"] = sd[f"{b}.pool.1.weight"][H], sd[f"{b}.pool.1.bias"][H]
            out[f"{b}.pool.3.weight"] = sd[f"{b}.pool.3.weight"][S][:, H]
    missing = names - set(out)
    if missing:
        raise ValueError(f"prune_tae_decoder: unhandled tensors {sorted(missing)[:4]}")
    return out


@torch.no_grad()
def tae_from_teacher(sd: dict[str, torch.Tensor], part: str, cfg, teacher_cfg) -> dict[str, torch.Tensor]:
    """Warm start of a depth-pruned TAE ``cfg`` (fewer blocks per stage, same width) from a teacher's state dict.

    Layers are matched by role (``tae.roles``: a stage keeps the teacher's first blocks). The ``s2d``
    encoder stem starts as the exact composition of the teacher's full-resolution conv and its
    stride-2 conv (both linear, no activation between them once the full-resolution block is dropped):
    a 5x5 stride-2 kernel, rewritten over the 2x2 space-to-depth grid. Only image borders differ.
    Dropping blocks costs quality at init (TAEF2, dev crops: decoder (3,2,1,1) 25.4 dB vs 29.5;
    without the encoder's full-resolution block 18 dB); distillation recovers it from there.
    """
    if cfg.width != teacher_cfg.width or cfg.latent_channels != teacher_cfg.latent_channels:
        raise UsageError("a depth-pruned warm start needs the teacher's width and latent channels "
                         f"({teacher_cfg.width}, {teacher_cfg.latent_channels}); got {cfg.width}, {cfg.latent_channels}")
    t_idx = {r: i for i, r in enumerate(tae.roles(part, teacher_cfg))}
    has_params = {k.split(".", 1)[0] for k in tae.build(part, cfg).state_dict()}
    out: dict[str, torch.Tensor] = {}
    for i, role in enumerate(tae.roles(part, cfg)):
        if str(i) not in has_params:
            continue
        if role == "s2d.conv":
            w0, b0, w1 = sd[f"{t_idx['stem']}.weight"], sd[f"{t_idx['stem']}.bias"], sd[f"{t_idx['s1.down']}.weight"]
            k = torch.zeros(w1.shape[0], w0.shape[1], 6, 6, dtype=w0.dtype)  # 5x5 composite, padded to 6x6
            for a in range(3):
                for b in range(3):
                    k[:, :, a:a + 3, b:b + 3] += torch.einsum("om,mipq->oipq", w1[:, :, a, b], w0)
            # PixelUnshuffle channel c*4 + dy*2 + dx holds pixel (2r+dy, 2s+dx): tap (ka, kb) of the 3x3
            # s2d conv reads composite offset (2ka+dy, 2kb+dx).
            k = k.view(k.shape[0], k.shape[1], 3, 2, 3, 2).permute(0, 1, 3, 5, 2, 4).reshape(k.shape[0], -1, 3, 3)
            out[f"{i}.weight"] = k
            out[f"{i}.bias"] = torch.einsum("omab,m->o", w1, b0)
            continue
        if role not in t_idx:
            raise UsageError(f"cannot warm-start layer '{role}' of the pruned {part} from the teacher")
        j = t_idx[role]
        out.update({f"{i}.{k[len(str(j)) + 1:]}": v for k, v in sd.items() if k.split(".", 1)[0] == str(j)})
    return out


def load_init(model: nn.Module, path: str | os.PathLike) -> None:
    """Warm start ``model`` from a vaepack-written .safetensors of the same architecture (strict).

    A shipped student is stored BatchNorm-folded (``fused``): ``encoder_student`` loads it into the
    folded network and rebuilds the BatchNorms from data (``student.unfuse_bn``) instead.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise VaepackError("init weights not found", path=str(path), hint="pass an existing .safetensors")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise VaepackError(f"cannot read init weights ({e})", path=str(path), hint="pass a vaepack .safetensors") from None
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"init weights do not fit the model config ({first[1].strip() if len(first) > 1 else first[0]})",
                         path=str(path), hint="use the --width/--config the weights were trained with "
                         "(their metadata 'config' field)") from None


def load_exported(path: str | os.PathLike, part: str | None = None) -> nn.Module:
    """A model from a vaepack-written .safetensors (a `vaepack distill` export or a shipped default):
    architecture from its metadata (``vaepack_family``, ``vaepack_part``, ``config``), weights strict.
    ``part`` is the part the caller needs (None: either); another part is a one-line error naming the file."""
    from safetensors import SafetensorError, safe_open

    from vaepack.models import student as sfam

    path = Path(path)
    if not path.is_file():
        raise VaepackError("weights not found", path=str(path), hint="pass an existing vaepack .safetensors")
    try:
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
        family, got, cfg = md.get("vaepack_family"), md.get("vaepack_part"), json.loads(md.get("config") or "null")
    except (SafetensorError, OSError, ValueError) as e:
        raise VaepackError(f"cannot read weights ({e})", path=str(path), hint="pass a vaepack .safetensors") from None
    if family not in ("student", "tae") or not isinstance(cfg, dict):
        raise UsageError("not a vaepack export (no vaepack_family/config metadata)", path=str(path),
                         hint="pass a file written by `vaepack distill` or shipped in vaepack/weights")
    if got not in ("encoder", "decoder") or (part is not None and got != part):
        raise UsageError(f"these weights are a {got}, not an {part}" if part == "encoder" else f"these weights are a {got}, not a {part}", path=str(path), hint=f"pass a {part}")
    try:
        model = (sfam.build(got, sfam.StudentConfig(**cfg)) if family == "student"
                 else tae.build(got, tae.TAEConfig(**cfg)))
    except TypeError as e:
        raise UsageError(f"the metadata config does not fit the {family} family ({e})", path=str(path)) from None
    load_init(model, path)
    return model.eval()


def calibration_batch(data_dir, seed: int, n: int = 32, crop: int = 128) -> torch.Tensor:
    """Random crops (``crop`` px, or the smallest image side if less) of up to ``n`` training images:
    the BatchNorm statistics of a warm start."""
    rng = random.Random(seed)
    files = training_images(data_dir)
    imgs = []
    for p in rng.sample(files, min(n, len(files))):
        try:
            imgs.append(load_rgb(p))
        except ImageError:
            continue
    if imgs:
        crop = max(8, min(crop, *(min(i.shape[1:]) for i in imgs)) // 8 * 8)
    crops = []
    for img in imgs:
        if min(img.shape[1:]) < crop:
            continue
        y, x = rng.randint(0, img.shape[1] - crop), rng.randint(0, img.shape[2] - crop)
        crops.append(img[:, y:y + crop, x:x + crop].float() / 255)
    if not crops:
        raise ImageError(f"no image of at least {crop} px to calibrate BatchNorm", path=str(data_dir))
    return torch.stack(crops)


# ------------------------------------------------------------------------- the students of a run
def encoder_student(teacher: nn.Module, cfg: DistillConfig) -> tuple[nn.Module, object]:
    """The encoder student of a run and its architecture config, warm-started as ``cfg`` says.

    "student" (paper 000, III-B) from ``init``: a shipped student is BatchNorm-folded, so it is loaded
    folded and its BatchNorms are rebuilt from the statistics of training crops (``unfuse_bn``). "tae":
    a (depth-pruned) TAE encoder, from the teacher (``tae_from_teacher``) or from ``init``.
    """
    from vaepack.models import student as sfam

    latent_channels = cfg.latent_channels if cfg.latent_channels is not None else latent_channels_of(teacher)
    kw = {"width": cfg.width, **cfg.model_config, "latent_channels": latent_channels}
    if cfg.family == "tae":
        arch = tae.TAEConfig(**{"kind": "f8", "midblock_gn": True, **kw})
        model = tae.build("encoder", arch)
        if cfg.init_from_teacher:
            tsd = (teacher.module if hasattr(teacher, "module") else teacher).float().cpu().state_dict()
            model.load_state_dict(tae_from_teacher(tsd, "encoder", arch, cfg.teacher_config))
        elif cfg.init:
            load_init(model, cfg.init)
        return model, arch
    arch = sfam.StudentConfig(**kw)
    model = sfam.build("encoder", arch)
    if cfg.init and arch.norm == "batch" and not arch.fused:
        folded = sfam.build("encoder", replace(arch, fused=True))
        load_init(folded, cfg.init)
        model = sfam.unfuse_bn(folded, calibration_batch(cfg.data_dir, cfg.seed))
    elif cfg.init:
        load_init(model, cfg.init)
    return model, arch


def decoder_student(teacher_encoder: nn.Module, teacher_decoder: nn.Module,
                    cfg: DistillDecoderConfig) -> tuple[nn.Module, tae.TAEConfig]:
    """The TAE decoder student of a run (``vaepack.models.tae`` at ``cfg.width``) and its config.

    ``init`` wins; else ``init_from_teacher`` starts from the teacher decoder: a depth-pruned copy
    (``tae_from_teacher``, needs ``cfg.teacher_config``) when blocks are dropped or the width is the
    teacher's, else its most important channels (``prune_tae_decoder``).
    """
    kw = {"kind": "f8", "midblock_gn": True, **cfg.model_config, "width": cfg.width,
          "latent_channels": latent_channels_of(teacher_encoder)}
    arch = tae.TAEConfig(**kw)
    model = tae.build("decoder", arch)
    if cfg.init:
        load_init(model, cfg.init)
    elif cfg.init_from_teacher:
        tsd = teacher_decoder.float().cpu().state_dict()
        tcfg = cfg.teacher_config
        if arch.blocks is not None or (tcfg is not None and arch.width == tcfg.width):
            if tcfg is None:
                raise UsageError("a depth-pruned warm start needs the teacher's TAEConfig (teacher_config)")
            model.load_state_dict(tae_from_teacher(tsd, "decoder", arch, tcfg))  # width checked there
        else:
            model.load_state_dict(prune_tae_decoder(tsd, arch))
    return model, arch
