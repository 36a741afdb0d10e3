"""The model registry: ``weights_manifest.yaml`` parsed into small typed records.

This is the only place model names come from. Aliases (``default``) resolve here too.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from vaepack.errors import ManifestError, UnknownModelError, UsageError
from vaepack.files import read_yaml
from vaepack.paths import manifest_path

PARTS = ("encoder", "decoder")


@dataclass(frozen=True)
class Space:
    """A latent space: what a diffusion model consumes. See vaepack/latents.py for the math."""

    name: str
    channels: int
    factor: int
    scale: float = 1.0
    shift: float = 0.0
    norm: str = "none"  # "none" or "flux2_bn"


@dataclass(frozen=True)
class FileSpec:
    name: str
    url: str | None
    size: int | None
    sha256: str | None
    embedded: bool = False  # shipped inside the package (vaepack/weights/)


@dataclass(frozen=True)
class PartSpec:
    part: str
    family: str
    config: dict[str, Any]
    files: tuple[FileSpec, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    # int8 activation ranges shipped in the package (vaepack/quantize.py): `--dtype int8` works without
    # calibrating. `--backend auto` runs the part int8 only with ``auto: true`` there, which needs
    # its dev round trip to meet the auto policy (vaepack/policy.py; benchmarks/results/int8.md).
    int8_calibration: FileSpec | None = None
    int8_auto: bool = False


@dataclass(frozen=True)
class ModelEntry:
    id: str
    description: str
    license: str
    space: Space
    parts: dict[str, PartSpec]
    fp16_safe: bool = True
    # False when the measured bf16 round trip fails the auto policy (vaepack/policy.py) on the dev set:
    # `--backend auto` then keeps fp32 for this model (benchmarks/results/precision_policy.md).
    bf16_safe: bool = True
    aliases: tuple[str, ...] = ()

    @property
    def embedded(self) -> bool:
        return all(f.embedded for p in self.parts.values() for f in p.files)

    def part(self, part: str) -> PartSpec:
        if part not in self.parts:
            have = ", ".join(self.parts) or "none"
            raise UnknownModelError(f"model '{self.id}' has no {part} (it has: {have})")
        return self.parts[part]


@dataclass(frozen=True)
class Manifest:
    path: Path
    models: dict[str, ModelEntry]
    aliases: dict[str, str]
    spaces: dict[str, Space]

    def resolve(self, name: str) -> str:
        return self.aliases.get(name, name)

    def get(self, name: str) -> ModelEntry:
        mid = self.resolve(name)
        if mid in self.models:
            return self.models[mid]
        choices = sorted(set(self.models) | set(self.aliases))
        close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `vaepack weights list`"
        raise UnknownModelError(f"unknown model '{name}'", hint=hint)


def _req(d: dict, key: str, where: str):
    if key not in d:
        raise ManifestError(f"missing '{key}' in {where}")
    return d[key]


def parse_manifest(data: dict, path: Path) -> Manifest:
    where = str(path)
    spaces = {}
    for name, s in (_req(data, "spaces", where) or {}).items():
        spaces[name] = Space(name=name, channels=int(s["channels"]), factor=int(s["factor"]),
                             scale=float(s.get("scale", 1.0)), shift=float(s.get("shift", 0.0)),
                             norm=str(s.get("norm", "none")))
    aliases = {str(k): str(v) for k, v in (data.get("aliases") or {}).items()}
    models: dict[str, ModelEntry] = {}
    for mid, m in (_req(data, "models", where) or {}).items():
        w = f"{where}: models.{mid}"
        sname = _req(m, "space", w)
        if sname not in spaces:
            raise ManifestError(f"{w}: unknown space '{sname}'")
        parts = {}
        for pname, p in (_req(m, "parts", w) or {}).items():
            if pname not in PARTS:
                raise ManifestError(f"{w}: unknown part '{pname}' (expected one of {PARTS})")
            files = tuple(
                FileSpec(name=_req(f, "name", w), url=f.get("url"), size=f.get("size"),
                         sha256=(f.get("sha256") or None), embedded=bool(f.get("embedded", False)))
                for f in _req(p, "files", f"{w}.parts.{pname}")
            )
            cal = p.get("int8_calibration")
            if cal is not None and not (isinstance(cal, dict) and cal.get("name") and cal.get("sha256")):
                raise ManifestError(f"{w}.parts.{pname}.int8_calibration needs name and sha256")
            parts[pname] = PartSpec(part=pname, family=_req(p, "family", f"{w}.parts.{pname}"),
                                    config=dict(p.get("config") or {}), files=files,
                                    provenance=dict(p.get("provenance") or {}),
                                    int8_calibration=(FileSpec(name=str(cal["name"]), url=None, size=cal.get("size"),
                                                               sha256=str(cal["sha256"]), embedded=True)
                                                      if cal else None),
                                    int8_auto=bool(cal.get("auto", False)) if cal else False)
        models[mid] = ModelEntry(
            id=mid, description=str(m.get("description", "")), license=str(m.get("license", "unknown")),
            space=spaces[sname], parts=parts, fp16_safe=bool(m.get("fp16_safe", True)),
            bf16_safe=bool(m.get("bf16_safe", True)), aliases=tuple(a for a, t in aliases.items() if t == mid),
        )
    for a, t in aliases.items():
        if t not in models:
            raise ManifestError(f"{where}: alias '{a}' points to unknown model '{t}'")
    return Manifest(path=path, models=models, aliases=aliases, spaces=spaces)


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> Manifest:
    p = Path(path)
    data = read_yaml(p, ManifestError, "model manifest")
    if not isinstance(data, dict):
        raise ManifestError("the manifest must be a mapping", path=path)
    return parse_manifest(data, p)


def load_manifest(path: Path | None = None) -> Manifest:
    p = Path(path) if path else manifest_path()
    try:
        mtime = p.stat().st_mtime
    except OSError:
        raise ManifestError("model manifest not found", path=str(p),
                            hint="reinstall vaepack or set VAEPACK_MANIFEST") from None
    return _load(str(p), mtime)


def check_fp16(model_id: str, fp16_safe: bool, hint: str) -> None:
    """The one fp16 refusal: models whose manifest says ``fp16_safe: false`` (SDXL/FLUX/SD3-class VAEs)
    overflow in fp16 (their activations exceed its range)."""
    if not fp16_safe:
        raise UsageError(f"model '{model_id}' overflows in fp16 (manifest: fp16_safe: false)", hint=hint)


def get_model(name: str) -> ModelEntry:
    return load_manifest().get(name)
