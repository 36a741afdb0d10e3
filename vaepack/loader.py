"""Build a model part from its manifest entry and load its weights safely and strictly.

Order of checks: the file's sha256 (vaepack.weights), a safe deserializer (safetensors, or
``torch.load(weights_only=True)`` for upstream .pth), the family's key renames (one function per
family: ``convert_state_dict``), the manifest's architecture against the tensor shapes (a clear
error naming the first mismatches), then ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from vaepack.errors import ManifestError, WeightsError
from vaepack.manifest import ModelEntry, PartSpec, get_model
from vaepack import weights as W

FAMILIES = {
    "tae": "vaepack.models.tae",
    "kl": "vaepack.models.autoencoder_kl",
    "student": "vaepack.models.student",
    "eps": "vaepack.models.eps_unet",
    "da": "vaepack.models.da",
}


def family_module(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ManifestError(f"unknown model family '{name}' (known: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name])


def make_config(spec: PartSpec, model_id: str = "?"):
    fam = family_module(spec.family)
    cls = fam.CONFIGS.get(spec.part)
    if cls is None:
        raise ManifestError(f"family '{spec.family}' has no {spec.part}")
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(spec.config) - names
    if extra:
        raise ManifestError(f"models.{model_id}.parts.{spec.part}: unknown config keys {sorted(extra)} "
                            f"for family '{spec.family}' (known: {sorted(names)})")
    try:
        return cls(**spec.config)
    except (TypeError, ValueError) as e:
        raise ManifestError(f"models.{model_id}.parts.{spec.part}: bad config: {e}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any deserializer failure is a bad file for the user
        raise WeightsError(f"cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                           path=str(path)) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError("file does not hold a state dict of tensors", path=str(path))
    return obj


def check_shapes(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    problems = []
    for k in want:
        if k not in have:
            problems.append(f"missing {k}")
        elif want[k] != have[k]:
            problems.append(f"{k} is {have[k]} in the file but {want[k]} for the stated architecture")
    problems += [f"unexpected {k}" for k in have if k not in want]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise WeightsError(f"{what}: weights do not match the manifest's architecture: "
                           f"{'; '.join(problems[:3])}{more}",
                           hint="fix the entry's config in weights_manifest.yaml or use the right file")


def build_part(spec: PartSpec, model_id: str = "?") -> nn.Module:
    fam = family_module(spec.family)
    return fam.build(spec.part, make_config(spec, model_id))


def load_part_from_files(spec: PartSpec, paths: list[Path], model_id: str = "?") -> nn.Module:
    fam = family_module(spec.family)
    cfg = make_config(spec, model_id)
    model = fam.build(spec.part, cfg)
    sd: dict[str, torch.Tensor] = {}
    for p in paths:
        sd.update(read_state_dict(p))
    sd = fam.convert_state_dict(spec.part, sd, cfg)
    check_shapes(model, sd, f"{spec.part} of '{model_id}'")
    ref = model.state_dict()
    sd = {k: v.to(ref[k].dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    return model.eval()


def load_part(model: str | ModelEntry, part: str) -> tuple[nn.Module, ModelEntry, str]:
    """Load one part of a manifest model (fp32, CPU, eval mode). Returns (module, entry, sha256)."""
    entry = get_model(model) if isinstance(model, str) else model
    spec = entry.part(part)
    paths = W.ensure(entry, part)
    digest = W.sha256_file(paths[0]) if len(paths) == 1 else "+".join(W.sha256_file(p) for p in paths)
    return load_part_from_files(spec, paths, entry.id), entry, digest


def family_attr(spec: PartSpec, name: str, default: Any) -> Any:
    return getattr(family_module(spec.family), name, default)
