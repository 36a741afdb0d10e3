"""What an export is and how it is read back: names, sidecars (verified against the file and the
model's current weights), the pixel-size multiple, and the latent convention applied outside a graph
exported without it (through vaepack/latents.py like everything else).

An export is ``<name>.onnx`` plus ``<name>.json`` (the sidecar); a TensorRT engine is ``<name>.engine``
plus its own sidecar. Runtimes refuse an artifact whose sidecar is missing, whose hash does not match
the file, or whose weights hash does not match the model's current weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vaepack import latents as L
from vaepack.errors import ExportError
from vaepack.files import sha256_file
from vaepack.loader import family_attr
from vaepack.manifest import ModelEntry, Space, get_model
from vaepack.paths import cache_dir
from vaepack.weights import weights_digest

DEFAULT_OPSET = 17  # TensorRT 8.6+/10, OpenVINO and onnxruntime all take it; 18 adds nothing we use
EXPORT_PARTS = ("encoder", "decoder", "eps-step")
SIDECAR_FORMAT = "vaepack.onnx-export"
ENGINE_FORMAT = "vaepack.tensorrt-engine"
FORMAT_VERSION = "1"


def graph_precision(precision: str) -> str:
    """Dtype of the ONNX graph for a requested precision (bf16 runs on the fp32 graph; int8 is the
    QDQ graph of vaepack/quantize.py)."""
    return precision if precision in ("fp16", "int8") else "fp32"


def artifact_name(model_id: str, part: str, precision: str, opset: int, include_convention: bool) -> str:
    return f"{model_id}-{part}-{precision}-op{opset}" + ("" if include_convention else "-raw")


def sidecar_path(onnx_path: Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def model_part(part: str) -> str:
    """The model part an export part comes from (the eps denoiser step belongs to the decoder)."""
    return "decoder" if part == "eps-step" else part


def size_multiple(entry: ModelEntry, part: str) -> int:
    """Pixel sizes must be multiples of this: the latent factor, twice that where FLUX.2's 2x2
    packing runs (in the graph, or outside it by the runner)."""
    f = entry.space.factor
    if entry.space.norm != "flux2_bn" or part == "eps-step":
        return f
    # Only networks whose raw latent still needs the convention (the KL family) pack 2x2; TAE and
    # student networks already output the normalized unpacked latent.
    spec = entry.part(model_part(part))
    return f if family_attr(spec, "NATIVE_IS_DIFFUSION", True) else 2 * f


def space_from_sidecar(sc: dict) -> Space:
    return Space(**sc["space"])


def graph_pre(sc: dict, x: torch.Tensor) -> torch.Tensor:
    """Contract input -> graph input for an export without the convention in the graph."""
    if sc["include_convention"] or sc["part"] == "eps-step":
        return x
    if sc["part"] == "encoder":
        return L.to_model_range(x, sc["image_range"])
    if sc["native_is_diffusion"]:
        return x
    return L.diffusion_to_mean(x, space_from_sidecar(sc), sidecar_bn(sc))


def graph_post(sc: dict, y: torch.Tensor) -> torch.Tensor:
    """Graph output -> contract output (diffusion latent / image in [0, 1])."""
    if sc["include_convention"] or sc["part"] == "eps-step":
        return y
    if sc["part"] == "encoder":
        return y if sc["native_is_diffusion"] else L.mean_to_diffusion(y, space_from_sidecar(sc), sidecar_bn(sc))
    return L.from_model_range(y, sc["image_range"]).clamp(0, 1)


def sidecar_bn(sc: dict):
    bn = sc.get("bn_stats")
    if not bn:
        return None
    return torch.tensor(bn["running_mean"], dtype=torch.float32), torch.tensor(bn["running_var"], dtype=torch.float32)



def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    onnx_path = Path(onnx_path)
    sp = sidecar_path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError("no such ONNX file", path=str(onnx_path))
    try:
        sc = json.loads(sp.read_text())
    except FileNotFoundError:
        raise ExportError(f"no sidecar {sp.name} next to the ONNX file", path=str(onnx_path),
                          hint="only files written by `vaepack export` can be used; re-export") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"unreadable sidecar ({e})", path=str(sp), hint="re-export the model") from None
    if not isinstance(sc, dict) or sc.get("format") != SIDECAR_FORMAT:
        raise ExportError(f"not a vaepack export sidecar (format {sc.get('format') if isinstance(sc, dict) else '?'})",
                          path=str(sp))
    missing = [k for k in ("model", "part", "weights_sha256", "onnx_sha256", "include_convention", "space",
                           "inputs", "outputs", "graph_precision") if k not in sc]
    if missing:
        raise ExportError(f"sidecar lacks {', '.join(missing)}", path=str(sp), hint="re-export the model")
    return sc


def verify_artifact(onnx_path: str | Path, weights_sha256: str | None = None, *,
                    check_weights: bool = True) -> dict[str, Any]:
    """Sidecar of ``onnx_path`` after checking that the file is the one the sidecar describes and
    that it was exported from the model's current weights (``weights_sha256``, else the weights
    the manifest resolves to now). Raises ExportError otherwise."""
    onnx_path = Path(onnx_path)
    sc = read_sidecar(onnx_path)
    have = sha256_file(onnx_path)
    if have != sc["onnx_sha256"]:
        raise ExportError(f"ONNX file does not match its sidecar (sha256 {have[:12]}…, sidecar says "
                          f"{sc['onnx_sha256'][:12]}…)", path=str(onnx_path), hint="re-export the model")
    if check_weights:
        want = weights_sha256 or weights_digest(get_model(sc["model"]), model_part(sc["part"]))
        if sc["weights_sha256"] != want:
            raise ExportError(f"exported from weights {sc['weights_sha256'][:12]}… but the {sc['part']} of "
                              f"'{sc['model']}' is now {want[:12]}…", path=str(onnx_path),
                              hint=f"re-export: vaepack export {sc['model']} --part {sc['part']} --onnx")
    return sc


def export_cache_dir() -> Path:
    return cache_dir() / "exports"



def read_engine_sidecar(engine_path: str | Path) -> dict[str, Any]:
    engine_path = Path(engine_path)
    sp = engine_path.with_suffix(".json")
    try:
        esc = json.loads(sp.read_text())
    except (OSError, ValueError):
        raise ExportError(f"no readable sidecar {sp.name} next to the engine", path=str(engine_path),
                          hint="build engines with `vaepack export --trt`") from None
    if esc.get("format") != ENGINE_FORMAT:
        raise ExportError("not a vaepack TensorRT engine sidecar", path=str(sp))
    if sha256_file(engine_path) != esc.get("engine_sha256"):
        raise ExportError("engine file does not match its sidecar", path=str(engine_path), hint="rebuild it")
    return esc

