"""Named presets: the configuration `vaepack tune --save-preset NAME` chose, which `encode`, `decode`
and `roundtrip --preset NAME` use for every option the command line does not give.

A preset is a JSON file ``<paths.presets_dir()>/<NAME>.json``: the options (model, decoder, scale,
nfe, backend, precision) plus what was measured when it was chosen (quality, latency, image count,
CPU, date, command), so a preset can be judged later. Explicit options always win; the model and
its decoder go together (an explicit ``--model`` without ``--decoder`` drops the preset's decoder
and its steps, which belong to the preset's model), and a preset's scale is an encode-side option
(``decode`` reads the scale from the latent file).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vaepack.errors import OutputExistsError, UsageError
from vaepack.files import atomic_write_bytes
from vaepack.paths import presets_dir

PRESET_VERSION = 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# command -> the options a preset may fill (CLI parameter names)
COMMAND_OPTIONS = {
    "encode": ("model", "scale", "backend", "dtype"),
    "decode": ("decoder", "steps", "backend", "dtype"),
    "roundtrip": ("model", "decoder", "scale", "steps", "backend", "dtype"),
}

__all__ = ["Preset", "preset_path", "save_preset", "load_preset", "list_presets", "apply_preset", "check_name"]


@dataclass
class Preset:
    """One saved choice. ``precision`` is the CLI's ``--dtype`` (fp32, bf16, int8), ``nfe`` its
    ``--steps`` (diffusion decoders only)."""

    name: str
    model: str
    decoder: str
    scale: float
    backend: str
    precision: str
    nfe: int | None = None
    measured: dict = field(default_factory=dict)

    def options(self) -> dict:
        """The preset as CLI option values (parameter names of encode/decode/roundtrip)."""
        return {"model": self.model, "decoder": self.decoder, "scale": self.scale, "steps": self.nfe,
                "backend": self.backend, "dtype": self.precision}


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise UsageError(f"bad preset name {name!r}", hint="letters, digits, '.', '_' or '-', at most 64")
    return name


def preset_path(name: str) -> Path:
    return presets_dir() / f"{check_name(name)}.json"


def list_presets() -> list[str]:
    d = presets_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def save_preset(preset: Preset, force: bool = False) -> Path:
    """Write the preset atomically; an existing one is replaced only with ``force``."""
    path = preset_path(preset.name)
    if path.exists() and not force:
        raise OutputExistsError(f"preset '{preset.name}' exists", path=str(path), hint="use --force to replace it")
    doc = {"preset_version": PRESET_VERSION, **asdict(preset)}
    atomic_write_bytes(path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())
    return path


def load_preset(name: str) -> Preset:
    """Read a saved preset; UsageError naming the saved ones when it does not exist or is unreadable."""
    path = preset_path(name)
    if not path.is_file():
        saved = ", ".join(list_presets()) or "none"
        raise UsageError(f"unknown preset '{name}' (saved: {saved})",
                         hint="make one with vaepack tune ... --save-preset NAME")
    try:
        doc = json.loads(path.read_text())
        if doc.get("preset_version") != PRESET_VERSION:
            raise ValueError(f"preset_version {doc.get('preset_version')!r}, this vaepack reads {PRESET_VERSION}")
        doc.pop("preset_version")
        p = Preset(**doc)
        p.scale = float(p.scale)
        if p.nfe is not None:
            p.nfe = int(p.nfe)
        for k in ("model", "decoder", "backend", "precision"):
            if not isinstance(getattr(p, k), str):
                raise ValueError(f"'{k}' is not a string")
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"unreadable preset ({e})", path=str(path), hint="save it again with vaepack tune") from None
    return p


def apply_preset(name: str | None, command: str, values: dict, explicit: set[str]) -> dict:
    """``values`` (a command's option values) with every option the preset can fill for ``command``
    and the user did not give (not in ``explicit``) taken from preset ``name``; unchanged without a
    name. The model and decoder go together: an explicit ``--model`` keeps the model's own decoder
    (and no preset steps) unless ``--decoder`` is given too; on ``decode``, whose ``--model`` names
    the decoder, an explicit ``--model`` likewise keeps the preset's decoder and steps out."""
    if not name:
        return dict(values)
    if command not in COMMAND_OPTIONS:
        raise ValueError(f"presets do not apply to '{command}'")
    opts = load_preset(name).options()
    out = dict(values)
    keys = set(COMMAND_OPTIONS[command]) - set(explicit)
    if "model" in explicit and "decoder" not in explicit:
        keys -= {"decoder", "steps"}
    if "decoder" in explicit:
        keys.discard("steps")  # steps belong to the preset's decoder
    if command == "roundtrip" and "decoder" in keys and opts["decoder"] == opts["model"]:
        keys.discard("decoder")  # the model's own decoder: leave it implicit
    for k in keys:
        if opts[k] is not None or k == "steps":
            out[k] = opts[k]
    return out
