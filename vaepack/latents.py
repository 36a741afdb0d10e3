"""Latent conventions and latent files: the ONE place where scale/shift/normalization live.

Every vaepack encoder takes images in [0, 1] (float, NCHW) and returns the *diffusion-space* latent
of its space; every decoder takes that latent and returns images in [0, 1]. Networks that work in
[-1, 1] (the AutoencoderKL family) or on raw VAE means are wrapped by the functions below:

    SD1.x  z = 0.18215 m          SDXL  z = 0.13025 m
    SD3    z = 1.5305 (m - 0.0609)  FLUX.1 z = 0.3611 (m - 0.1159)
    FLUX.2 z = unpack((pack(m) - mu) / sqrt(var + 1e-4))   (BatchNorm running stats of the checkpoint)

(shared/reference/architectures.md, section 2.) TAE models and vaepack's own students already live
in diffusion space (``native_is_diffusion``). FLUX.2's diffusion-space form in vaepack is the
normalized but UNPACKED (32, H/8, W/8) tensor, which is TAEF2's form too; ``flux2_pack`` gives the
pipeline's (128, H/16, W/16) form. Every latent file records the convention it was written with.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vaepack import __version__
from vaepack.errors import LatentFileError, UsageError
from vaepack.manifest import Space

FLUX2_BN_EPS = 1e-4
FORMAT_VERSION = "1"
LATENT_KEY = "latent"
COMFY_KEY = "latent_tensor"
COMFY_MARKER = "latent_format_version_0"
COMFY_FORM = "comfyui_form"  # metadata: how `latent_tensor` relates to vaepack's diffusion-space latent
COMFY_LEGACY_SCALE = 0.18215  # ComfyUI multiplies files without the marker by 1/0.18215


# --------------------------------------------------------------------------- pixel range
def to_model_range(x01: torch.Tensor, image_range: str) -> torch.Tensor:
    return x01 * 2 - 1 if image_range == "-1,1" else x01


def from_model_range(y: torch.Tensor, image_range: str) -> torch.Tensor:
    return (y + 1) / 2 if image_range == "-1,1" else y


# --------------------------------------------------------------------------- FLUX.2 packing
def flux2_pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2); channel order (c, dy, dx) as in the FLUX.2 pipeline."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise LatentFileError(f"FLUX.2 packing needs an even latent size, got {h}x{w}")
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def flux2_unpack(z: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = z.shape
    c = c4 // 4
    return z.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * 2, w * 2)


def _bn(stats: tuple[torch.Tensor, torch.Tensor], z: torch.Tensor):
    mean, var = stats
    return mean.to(z).view(1, -1, 1, 1), torch.sqrt(var.to(z) + FLUX2_BN_EPS).view(1, -1, 1, 1)


def mean_to_diffusion(m: torch.Tensor, space: Space, bn_stats=None) -> torch.Tensor:
    """VAE mean (raw network latent) -> diffusion-space latent."""
    if space.norm == "flux2_bn":
        if bn_stats is None:
            raise ValueError("FLUX.2 normalization needs the checkpoint's BatchNorm statistics")
        mu, sd = _bn(bn_stats, m)
        return flux2_unpack((flux2_pack(m) - mu) / sd)
    return space.scale * (m - space.shift)


def diffusion_to_mean(z: torch.Tensor, space: Space, bn_stats=None) -> torch.Tensor:
    if space.norm == "flux2_bn":
        if bn_stats is None:
            raise ValueError("FLUX.2 normalization needs the checkpoint's BatchNorm statistics")
        mu, sd = _bn(bn_stats, z)
        return flux2_unpack(flux2_pack(z) * sd + mu)
    return z / space.scale + space.shift


def convention(space: Space) -> dict[str, str]:
    """What a reader needs to interpret a latent of this space (recorded in files and exports)."""
    d = {k: str(v) for k, v in asdict(space).items()}
    if not space.base:  # plain spaces keep the convention files written before structured spaces existed
        d.pop("base"), d.pop("base_channels")
    d["form"] = "unpacked"
    return d


# --------------------------------------------------------------------------- latent files
@dataclass
class LatentRecord:
    """One latent plus everything needed to undo the encode-time remapping."""

    latent: torch.Tensor  # (1, C, h, w), diffusion space
    model: str
    space: str
    weights_sha256: str
    scale: float  # resolution remap factor used at encode time
    filter: str
    orig_size: tuple[int, int]  # (H, W) of the input image
    scaled_size: tuple[int, int]  # (H, W) after the remap, before padding
    padding: tuple[int, int, int, int]  # (left, right, top, bottom), reflect-padded
    convention: dict[str, str]
    dtype: str  # the precision that ran the encoder
    source: str = ""
    packed: bool = False
    backend: str = ""  # the backend that ran the encoder (torch for tiled runs); "" in files written before it
    # Where a converted latent came from (vaepack/convert.py: source file/model/sha256, the path taken);
    # metadata key ``conversion``, absent in encoded files and files written before it.
    provenance: dict[str, str] = field(default_factory=dict)
    # Structured (DA-VAE) latents: the base channels' space, channel count, 2x downsample filter, the
    # half-size image's size inside the padded base image, and the preview size (vaepack.pipeline.
    # base_info); metadata key ``base``, absent for plain latents.
    base: dict = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        return {
            "format": "vaepack.latent", "format_version": FORMAT_VERSION, "vaepack_version": __version__,
            "model": self.model, "space": self.space, "weights_sha256": self.weights_sha256,
            "scale": repr(float(self.scale)), "filter": self.filter,
            "orig_size": json.dumps(list(self.orig_size)), "scaled_size": json.dumps(list(self.scaled_size)),
            "padding": json.dumps(list(self.padding)), "convention": json.dumps(self.convention, sort_keys=True),
            "dtype": self.dtype, "source": self.source, "packed": json.dumps(self.packed),
            **({"backend": self.backend} if self.backend else {}),
            **({"conversion": json.dumps(self.provenance, sort_keys=True)} if self.provenance else {}),
            **({"base": json.dumps(self.base, sort_keys=True)} if self.base else {}),
        }


# --------------------------------------------------------------------------- ComfyUI form
# ComfyUI keeps what its VAE node outputs and applies the latent format in the model
# (``process_in``): for SD1/SDXL/SD3/FLUX.1 that is the raw VAE mean m (its process_in computes
# scale * (m - shift)); for FLUX.2 it is the normalized, 2x2-packed (128, H/16, W/16) tensor.
def check_comfyui(space: Space) -> None:
    """Structured (DA-VAE) latents have no ComfyUI consumer: no model there reads base + detail channels."""
    if space.base:
        raise UsageError(f"--format comfyui: no ComfyUI model reads '{space.name}' latents (base + detail channels)",
                         hint="write the vaepack format, or `--base-only` for the plain base-space latent")


def to_comfyui(z: torch.Tensor, space: Space, packed: bool = False) -> tuple[torch.Tensor, str]:
    """Diffusion-space latent -> (tensor as ComfyUI stores it, form name)."""
    check_comfyui(space)
    if space.norm == "flux2_bn":
        return (z if packed else flux2_pack(z)), "flux2_packed"
    if space.norm != "none":
        raise LatentFileError(f"no ComfyUI form is known for the '{space.norm}' normalization")
    return z / space.scale + space.shift, "raw"


def from_comfyui(t: torch.Tensor, space: Space, form: str) -> tuple[torch.Tensor, bool]:
    """Inverse of ``to_comfyui``: (diffusion-space latent, packed)."""
    if form == "flux2_packed" or (space.norm == "flux2_bn" and t.shape[1] == 4 * space.channels):
        return t, True
    if space.norm == "flux2_bn":
        return t, False
    return space.scale * (t - space.shift), False


def _space_of(conv: dict) -> Space:
    return Space(name=str(conv.get("name", "")), channels=int(conv.get("channels", 0)),
                 factor=int(conv.get("factor", 1)), scale=float(conv.get("scale", 1.0)),
                 shift=float(conv.get("shift", 0.0)), norm=str(conv.get("norm", "none")),
                 base=str(conv.get("base", "")), base_channels=int(conv.get("base_channels", 0)))


def pad_multiple(space: Space, fmt: str = "vaepack") -> int | None:
    """The pixel multiple an image is padded to before encoding for a file format (None: the space's
    factor). ComfyUI keeps FLUX.2 latents 2x2-packed, so their latent size must be even."""
    return 2 * space.factor if fmt == "comfyui" and space.norm == "flux2_bn" else None


def save_latent(path: Path, rec: LatentRecord, fmt: str = "vaepack") -> None:
    """Write atomically (temp file + rename). ``fmt='comfyui'`` writes a ComfyUI ``.latent``."""
    from safetensors.torch import save_file

    from vaepack.io import atomic_output

    t = rec.latent.detach().to("cpu").contiguous()
    meta = rec.metadata()
    if fmt == "comfyui":
        # ComfyUI's tensor + empty marker (no legacy 1/0.18215 rescale on load), in ComfyUI's own
        # form (see to_comfyui); our metadata rides along so `vaepack decode` restores the size.
        try:
            c, form = to_comfyui(t.float(), _space_of(rec.convention), rec.packed)
        except LatentFileError as e:
            raise LatentFileError(str(e), path=str(path), hint="ComfyUI keeps FLUX.2 latents 2x2-packed: the "
                                  "image needs a multiple of 16 px (`vaepack encode --format comfyui` pads for it)") from None
        meta[COMFY_FORM] = form
        tensors = {COMFY_KEY: c.contiguous(), COMFY_MARKER: torch.tensor([])}
    else:
        tensors = {LATENT_KEY: t}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _meta(meta: dict, key: str, path: Path, conv=str):
    if key not in meta:
        raise LatentFileError(f"latent metadata lacks '{key}'", path=str(path),
                              hint="was it written by `vaepack encode`? pass --model to decode a bare latent")
    try:
        return conv(meta[key])
    except (ValueError, TypeError):
        raise LatentFileError(f"latent metadata '{key}' is malformed: {meta[key]!r}", path=str(path)) from None


def _str_dict(s: str) -> dict[str, str]:
    v = json.loads(s)
    if not isinstance(v, dict):
        raise ValueError
    return {str(k): str(x) for k, x in v.items()}


def _base_dict(s: str) -> dict:
    v = json.loads(s)
    sizes = [v.get("image_size"), v.get("preview_size")] if isinstance(v, dict) else []
    if not (sizes and isinstance(v.get("space"), str) and isinstance(v.get("channels"), int) and v["channels"] > 0
            and all(isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) and i > 0 for i in p)
                    for p in sizes)):
        raise ValueError
    return v


def load_latent(path: Path, default_model: str | None = None) -> LatentRecord:
    """Read and validate a vaepack or ComfyUI latent file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LatentFileError("no such latent file", path=str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            key = LATENT_KEY if LATENT_KEY in keys else COMFY_KEY if COMFY_KEY in keys else None
            if key is None:
                raise LatentFileError(f"no '{LATENT_KEY}' or '{COMFY_KEY}' tensor (has: {', '.join(keys) or 'none'})",
                                      path=str(path))
            t = f.get_tensor(key)
            legacy = key == COMFY_KEY and COMFY_MARKER not in keys
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LatentFileError(f"not a readable safetensors latent file ({str(e).splitlines()[0][:120]})",
                              path=str(path)) from None
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[0] != 1:
        raise LatentFileError(f"latent must have shape (1, C, h, w), got {tuple(t.shape)}", path=str(path))
    if not t.is_floating_point():
        raise LatentFileError(f"latent must be a float tensor, got {t.dtype}", path=str(path))
    if not torch.isfinite(t).all():
        raise LatentFileError("latent contains NaN or Inf values", path=str(path))
    if meta.get("format") != "vaepack.latent":
        # A bare/ComfyUI latent: no remap info. Decode at native size with the model named by the user.
        if default_model is None:
            raise LatentFileError("latent has no vaepack metadata", path=str(path),
                                  hint="pass --model to say which decoder it belongs to")
        packed = False
        if key == COMFY_KEY:  # a ComfyUI latent: convert from ComfyUI's form with the named model's space
            from vaepack.manifest import get_model

            t = t.float() / COMFY_LEGACY_SCALE if legacy else t
            t, packed = from_comfyui(t, get_model(default_model).space, "")
        return LatentRecord(latent=t, model=default_model, space="", weights_sha256="", scale=1.0,
                            filter="bilinear", orig_size=(0, 0), scaled_size=(0, 0), padding=(0, 0, 0, 0),
                            convention={}, dtype=str(t.dtype).replace("torch.", ""), source="", packed=packed)

    def pair(s):
        v = json.loads(s)
        if not (isinstance(v, list) and all(isinstance(i, int) and i >= 0 for i in v)):
            raise ValueError
        return tuple(v)

    rec = LatentRecord(
        latent=t, model=_meta(meta, "model", path), space=_meta(meta, "space", path),
        weights_sha256=meta.get("weights_sha256", ""), scale=_meta(meta, "scale", path, float),
        filter=meta.get("filter", "bilinear"), orig_size=_meta(meta, "orig_size", path, pair),
        scaled_size=_meta(meta, "scaled_size", path, pair), padding=_meta(meta, "padding", path, pair),
        convention=_meta(meta, "convention", path, json.loads), dtype=meta.get("dtype", ""),
        source=meta.get("source", ""), packed=meta.get("packed", "false") == "true",
        backend=meta.get("backend", ""),
        provenance=_meta(meta, "conversion", path, _str_dict) if "conversion" in meta else {},
        base=_meta(meta, "base", path, _base_dict) if "base" in meta else {},
    )
    if len(rec.orig_size) != 2 or len(rec.scaled_size) != 2 or len(rec.padding) != 4:
        raise LatentFileError("latent metadata sizes are malformed", path=str(path))
    if not isinstance(rec.convention, dict):
        raise LatentFileError(f"latent metadata 'convention' is malformed: {meta['convention']!r}", path=str(path))
    if key == COMFY_KEY and meta.get(COMFY_FORM):  # written by vaepack in ComfyUI's form
        try:
            rec.latent, packed = from_comfyui(t.float(), _space_of(rec.convention), meta[COMFY_FORM])
        except (ValueError, TypeError):
            raise LatentFileError("latent metadata 'convention' is malformed", path=str(path)) from None
        rec.packed = rec.packed or packed
    if not (math.isfinite(rec.scale) and rec.scale > 0):
        raise LatentFileError(f"latent metadata scale must be > 0, got {rec.scale}", path=str(path))
    (oh, ow), (sh, sw) = rec.orig_size, rec.scaled_size
    if min(oh, ow, sh, sw) < 1:
        raise LatentFileError("latent metadata sizes must be positive", path=str(path))
    if (sh, sw) != (max(1, round(oh * rec.scale)), max(1, round(ow * rec.scale))):
        raise LatentFileError(f"latent metadata disagree: orig_size {ow}x{oh} at scale {rec.scale:g} is not "
                              f"scaled_size {sw}x{sh}", path=str(path))
    from vaepack.io import max_pixels_default

    if oh * ow > max_pixels_default():  # the decoded image is resized to orig_size: same guard as inputs
        raise LatentFileError(f"latent metadata asks for a {ow}x{oh} image, above the limit of "
                              f"{max_pixels_default()} pixels", path=str(path), hint="use --native")
    return rec
