"""TensorRT optimization profiles: named batch and pixel-size ranges with precisions per family
(``export/profiles/*.yaml`` in the checkout, ``$VAEPACK_PROFILES``, or a YAML path)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaepack.errors import UsageError
from vaepack.files import read_yaml
from vaepack.paths import package_dir

TRT_PRECISIONS = ("fp32", "fp16", "bf16")  # vaepack's int8 graphs have asymmetric activations (TensorRT: symmetric only)


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
    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") or p.is_file()):
        known = list_profiles()
        if str(name_or_path) not in known:
            raise UsageError(f"unknown TensorRT profile '{name_or_path}'",
                             hint=f"known: {', '.join(known) or 'none found'}; or pass a YAML file")
        p = known[str(name_or_path)]
    where = str(p)
    data = read_yaml(p, UsageError, "profile")
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

