"""Where vaepack keeps things. Computed on call, never at import (no side effects at import)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Weights cache: ``$VAEPACK_HOME`` if set, else ``$XDG_CACHE_HOME/vaepack`` or ``~/.cache/vaepack``."""
    env = os.environ.get("VAEPACK_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vaepack"


def presets_dir() -> Path:
    """Where ``vaepack tune --save-preset`` keeps presets: ``$VAEPACK_PRESETS`` if set, else
    ``cache_dir()/presets``."""
    env = os.environ.get("VAEPACK_PRESETS")
    if env:
        return Path(env).expanduser()
    return cache_dir() / "presets"


def package_dir() -> Path:
    return Path(__file__).resolve().parent


def embedded_weights_dir() -> Path:
    """Weights shipped inside the package (the embedded default models)."""
    return package_dir() / "weights"


def manifest_path() -> Path:
    """The one model registry. ``$VAEPACK_MANIFEST`` overrides (tests, private zoos)."""
    env = os.environ.get("VAEPACK_MANIFEST")
    if env:
        return Path(env).expanduser()
    return package_dir() / "weights_manifest.yaml"


def shared_dir() -> Path | None:
    """The read-only ../shared folder beside the checkout (dev data, teacher weights), if present."""
    env = os.environ.get("VAEPACK_SHARED")
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    p = package_dir().parent.parent / "shared"
    return p if p.is_dir() else None
