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
    # A structured latent (DA-VAE, paper 002): the first ``base_channels`` channels are exactly a latent
    # of the ``base`` space (its own convention) of the image downsampled 2x; the rest are detail.
    base: str = ""
    base_channels: int = 0


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
    # Structured spaces: the model of the base space whose decoder reads the base channels (DA-VAE:
    # taef2); `--base-only` latents name it, so `vaepack decode` picks that decoder.
    base_model: str = ""

    @property
    def embedded(self) -> bool:
        return all(f.embedded for p in self.parts.values() for f in p.files)

    def part(self, part: str) -> PartSpec:
        if part not in self.parts:
            have = ", ".join(self.parts) or "none"
            raise UnknownModelError(f"model '{self.id}' has no {part} (it has: {have})")
        return self.parts[part]


@dataclass(frozen=True)
class BridgeEntry:
    """A learned latent-space bridge (paper 001; vaepack/bridges.py): the frozen *decoder* of ``source``
    run up to a tap + a projector into the *encoder* space of ``target``. Its weights are one part,
    ``bridge``, so the weights cache (pull/verify/status) treats it like a model's part."""

    id: str
    description: str
    license: str
    source: str  # model id whose decoder is the frozen prefix (its space is the source space)
    target: str  # model id whose encoder space the bridge writes
    source_space: str
    target_space: str
    family: str
    config: dict[str, Any]
    files: tuple[FileSpec, ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def parts(self) -> dict[str, PartSpec]:
        return {"bridge": PartSpec(part="bridge", family=self.family, config=self.config, files=self.files,
                                   provenance=self.provenance)}

    def part(self, part: str) -> PartSpec:
        if part != "bridge":
            raise UnknownModelError(f"bridge '{self.id}' has no {part} (it has: bridge)")
        return self.parts["bridge"]

    @property
    def embedded(self) -> bool:
        return all(f.embedded for f in self.files)


@dataclass(frozen=True)
class Manifest:
    path: Path
    models: dict[str, ModelEntry]
    aliases: dict[str, str]
    spaces: dict[str, Space]
    bridges: dict[str, BridgeEntry] = field(default_factory=dict)

    def resolve(self, name: str) -> str:
        return self.aliases.get(name, name)

    def bridges_for(self, source_space: str, target_space: str) -> list[BridgeEntry]:
        """Bridges from one latent space into another, in manifest order (the first is the default)."""
        return [b for b in self.bridges.values() if b.source_space == source_space and b.target_space == target_space]

    def get_bridge(self, name: str) -> BridgeEntry:
        if name in self.bridges:
            return self.bridges[name]
        close = difflib.get_close_matches(name, sorted(self.bridges), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `vaepack weights list`"
        raise UnknownModelError(f"unknown bridge '{name}'", hint=hint)

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
                             norm=str(s.get("norm", "none")), base=str(s.get("base") or ""),
                             base_channels=int(s.get("base_channels", 0)))
    for name, sp in spaces.items():
        if not sp.base:
            continue
        b = spaces.get(sp.base)
        if b is None or b.base:
            raise ManifestError(f"{where}: spaces.{name}: base '{sp.base}' is not a plain latent space here")
        if sp.base_channels != b.channels or sp.channels <= b.channels or sp.factor != 2 * b.factor:
            raise ManifestError(f"{where}: spaces.{name}: a structured space needs base_channels = {b.channels} "
                                f"(the base's), more channels than that, and factor {2 * b.factor}")
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
            files = _parse_files(_req(p, "files", f"{w}.parts.{pname}"), w)
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
            base_model=str(m.get("base_model") or ""),
        )
    for a, t in aliases.items():
        if t not in models:
            raise ManifestError(f"{where}: alias '{a}' points to unknown model '{t}'")
    for mid, m in models.items():
        if bool(m.base_model) != bool(m.space.base):
            raise ManifestError(f"{where}: models.{mid}: base_model is stated exactly for models of a structured space")
        if m.base_model and (m.base_model not in models or models[m.base_model].space.name != m.space.base):
            raise ManifestError(f"{where}: models.{mid}: base_model '{m.base_model}' is not a model of the "
                                f"'{m.space.base}' space")
    bridges = _parse_bridges(data.get("bridges") or {}, where, models, aliases)
    return Manifest(path=path, models=models, aliases=aliases, spaces=spaces, bridges=bridges)


def _parse_files(items, w: str) -> tuple[FileSpec, ...]:
    return tuple(FileSpec(name=_req(f, "name", w), url=f.get("url"), size=f.get("size"),
                          sha256=(f.get("sha256") or None), embedded=bool(f.get("embedded", False)))
                 for f in items)


def _parse_bridges(raw: dict, where: str, models: dict[str, ModelEntry],
                   aliases: dict[str, str]) -> dict[str, BridgeEntry]:
    """The ``bridges:`` section. Checked here: ids, both ends, the family; the config against the
    architecture and the weights is checked when the bridge loads (vaepack/bridges.py)."""
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: 'bridges' must be a mapping of bridge id -> entry")
    out: dict[str, BridgeEntry] = {}
    for bid, b in raw.items():
        w = f"{where}: bridges.{bid}"
        if bid in models or bid in aliases:  # one namespace for `weights pull/verify ID`
            raise ManifestError(f"{w}: the id '{bid}' is already a model id or alias")
        if not isinstance(b, dict):
            raise ManifestError(f"{w}: must be a mapping")
        ends = {}
        for end, part in (("source", "decoder"), ("target", "encoder")):
            name = str(_req(b, end, w))
            mid = aliases.get(name, name)
            if mid not in models:
                raise ManifestError(f"{w}: unknown {end} model '{name}'")
            if part not in models[mid].parts:
                raise ManifestError(f"{w}: {end} model '{mid}' has no {part} (a bridge runs the source's decoder "
                                    f"and writes the target's encoder space)")
            ends[end] = models[mid]
        if ends["source"].space.name == ends["target"].space.name:
            raise ManifestError(f"{w}: source and target are both in the '{ends['source'].space.name}' space")
        family = str(b.get("family", "bridge"))
        if family != "bridge":
            raise ManifestError(f"{w}: unknown bridge family '{family}' (known: bridge)")
        files = _parse_files(_req(b, "files", w) or [], f"{w}.files")
        if not files:
            raise ManifestError(f"{w}: lists no weight files")
        out[bid] = BridgeEntry(id=bid, description=str(b.get("description", "")),
                               license=str(b.get("license", "unknown")), source=ends["source"].id,
                               target=ends["target"].id, source_space=ends["source"].space.name,
                               target_space=ends["target"].space.name, family=family,
                               config=dict(b.get("config") or {}), files=files,
                               provenance=dict(b.get("provenance") or {}))
    return out


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
