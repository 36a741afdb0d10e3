"""Export one part of a manifest model to ONNX with a parity check and a sidecar.

Graph I/O is always float32 and follows the one contract (vaepack/vae.py): with the convention in
the graph, an encoder takes images in [0, 1] and returns diffusion-space latents, a decoder the
reverse (clamped to [0, 1]). Without it (``include_convention=False``) the graph is the bare network
(model pixel range, raw VAE mean); ``artifacts.graph_pre``/``graph_post`` apply the convention outside,
through vaepack/latents.py like everything else.

Precisions (documented in export/README.md):
- fp32: float32 graph.
- fp16: float16 weights and compute inside, float32 I/O (Casts at the boundary), normalization layers
  kept in float32 (their variance sums lose precision in fp16). Refused for models whose manifest says
  ``fp16_safe: false`` (SDXL/FLUX/SD3 VAEs overflow in fp16).
- bf16: the float32 graph; bf16 is a runtime choice (OpenVINO ``INFERENCE_PRECISION_HINT``, TensorRT
  10's BF16 builder flag with Resize layers pinned to fp32). ONNX Conv only accepts bfloat16 from
  opset 22, which the TorchScript exporter cannot write, and onnxruntime's CPU provider has no bf16
  kernels, so a bf16-typed graph would run nowhere we can check it.
- int8: the QDQ graph of vaepack/quantize.py (static calibration).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaepack import __version__
from vaepack import latents as L
from vaepack import quantize as Q
from vaepack.backends import artifacts as A
from vaepack.backends import optional as O
from vaepack.errors import ExportError, UsageError
from vaepack.export import graph as G
from vaepack.export.parity import PARITY_SIZES, check_parity, check_parity_available
from vaepack.files import sha256_file
from vaepack.io import atomic_output, check_output
from vaepack.loader import family_attr, load_part
from vaepack.manifest import ModelEntry, check_fp16, get_model
from vaepack.vae import bn_stats
from vaepack.weights import weights_digest

log = logging.getLogger("vaepack")

MIN_OPSET = 14  # scaled_dot_product_attention (KL mid-block) needs 14
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
EXPORTERS = ("torchscript", "dynamo")


@dataclass
class ExportResult:
    onnx_path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]

    @property
    def parity(self) -> dict[str, Any]:
        return self.sidecar.get("parity", {})

    @property
    def max_abs_err(self) -> float:
        return float(self.parity.get("max_abs_err", float("nan")))


def _resolve_out_dir(out_dir: str | Path | None) -> Path:
    return Path(out_dir) if out_dir is not None else Path.cwd() / "export" / "artifacts"


def check_args(entry: ModelEntry, part: str, precision: str, opset: int, exporter: str) -> None:
    if part not in A.EXPORT_PARTS:
        raise UsageError(f"unknown part '{part}' (choose {', '.join(A.EXPORT_PARTS)})")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter '{exporter}' (choose {', '.join(EXPORTERS)})")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise UsageError(f"--opset {opset} is too old: the exported ops need opset {MIN_OPSET} or newer",
                         hint=f"the default is {A.DEFAULT_OPSET}")
    spec = entry.part(A.model_part(part))  # UnknownModelError naming the parts it has
    if part == "decoder" and spec.family == "eps":
        raise UsageError(f"the decoder of '{entry.id}' is a diffusion sampler (a loop over noise), not one graph",
                         hint="export its denoiser step with --part eps-step")
    if precision == "fp16":
        check_fp16(entry.id, entry.fp16_safe, hint="export with --precision bf16 or fp32, or use fp16-fix weights")
    if precision == "int8" and part == "eps-step":
        raise UsageError("int8 covers encoders and single-pass decoders, not the eps denoiser step",
                         hint="export the step fp32 or fp16")


def export_onnx(model_id: str | ModelEntry, part: str = "decoder", out_dir: str | Path | None = None,
                precision: str = "fp32", opset: int = A.DEFAULT_OPSET, include_convention: bool = True, *,
                image: str | Path | None = None, parity_sizes=PARITY_SIZES, exporter: str = "torchscript",
                name: str | None = None, tolerance: float | None = None, force: bool = True,
                calibration: dict | None = None) -> ExportResult:
    """Export one part of a manifest model to ``out_dir/<name>.onnx`` + ``<name>.json``.

    Dynamic batch, height and width. The graph passes ``onnx.checker`` (full check) and the parity
    check (``TOLERANCES[precision]`` unless ``tolerance`` is given) before anything is written; both
    files are written atomically, the ONNX file first and the sidecar last.

    int8: the fp32 graph rewritten by ``quantize.quantize_model`` with ``calibration`` (default: the
    shipped or cached calibration of this part, ``quantize.find_calibration``).
    """
    entry = get_model(model_id) if isinstance(model_id, str) else model_id
    check_args(entry, part, precision, opset, exporter)
    onnx = O.require_onnx()
    check_parity_available(precision)  # the parity check runs the graph
    out_dir = _resolve_out_dir(out_dir)
    name = name or A.artifact_name(entry.id, part, precision, opset, include_convention)
    onnx_path, sc_path = out_dir / f"{name}.onnx", out_dir / f"{name}.json"
    if not force:  # both files, before anything is computed
        check_output(onnx_path, force=False)
        check_output(sc_path, force=False)

    mpart = A.model_part(part)
    spec = entry.part(mpart)
    module, _, digest = load_part(entry, mpart)
    image_range = family_attr(spec, "IMAGE_RANGE", "0,1")
    native = family_attr(spec, "NATIVE_IS_DIFFUSION", True)
    gprec = A.graph_precision(precision)
    dtype = torch.float16 if gprec == "fp16" else torch.float32
    net = G.reduced_precision_copy(module, dtype) if dtype != torch.float32 else module
    cal_source = None
    if calibration is not None and precision != "int8":
        raise UsageError("a calibration is for --precision int8")
    if precision == "int8":
        if calibration is None:
            calibration, cal_source = Q.find_calibration(entry, mpart, digest)
        else:
            calibration = Q.check_calibration(calibration, "calibration", entry, mpart, digest)
            cal_source = calibration.get("data", {}).get("source") or "given"
        # quantization-aware weights (vaepack train-qat): the int8 graph is built from them, the
        # sidecar keeps the model's own weights hash (the artifact belongs to this model) and names them
        qat = Q.load_qat_weights(entry, mpart, calibration, cal_source if str(cal_source).endswith(".json") else None)
        if qat is not None:
            module = net = qat
    bn = bn_stats(entry.space, module)
    if part == "eps-step":
        include_convention = False
        graph: nn.Module = G.StepGraph(G.denoiser_step(entry, net), dtype).eval()
        ref_fn = G.StepGraph(G.denoiser_step(entry, module), torch.float32).eval()
    else:
        graph = G.ContractGraph(net, part, entry.space, image_range, native, bn, include_convention, dtype).eval()
        ref_fn = None
    inputs, outputs = G.io_spec(entry, part)
    mult = A.size_multiple(entry, part)
    if part == "eps-step":
        # The step may pad to its UNet's multiple with a shape-dependent branch that tracing fixes
        # at the example size; the family states the multiple at which no padding happens.
        mult = math.lcm(mult, int(getattr(module, "size_multiple", mult)))
    sizes = [tuple(int(v) for v in s) for s in parity_sizes]
    if len(sizes) < 1 or any(h % mult or w % mult or h <= 0 or w <= 0 for h, w in sizes):
        raise UsageError(f"parity sizes {sizes} must be positive multiples of {mult} for '{entry.id}'")

    sc: dict[str, Any] = {
        "format": A.SIDECAR_FORMAT, "format_version": A.FORMAT_VERSION,
        "model": entry.id, "part": part, "family": spec.family,
        "weights_sha256": digest, "precision": precision, "graph_precision": gprec,
        "io_dtype": "float32", "opset": opset, "exporter": exporter,
        "include_convention": include_convention, "image_range": image_range,
        "native_is_diffusion": bool(native), "fp16_safe": entry.fp16_safe,
        "space": dataclasses.asdict(entry.space), "convention": L.convention(entry.space),
        "bn_stats": ({"running_mean": bn[0].float().tolist(), "running_var": bn[1].float().tolist(),
                      "eps": L.FLUX2_BN_EPS} if bn is not None else None),
        "factor": entry.space.factor, "size_multiple": mult,
        "inputs": inputs, "outputs": outputs,
    }
    if calibration is not None:
        sc["int8"] = {"calibration_sha256": Q.calibration_sha256(calibration), "calibration_file": cal_source,
                      "method": calibration.get("method"), "activations": calibration.get("activations"),
                      "weights": calibration.get("weights"),
                      "calibration_data": {k: v for k, v in calibration.get("data", {}).items() if k != "files"},
                      "qat_weights_sha256": (calibration.get("qat") or {}).get("weights_sha256")}
    # Batch 2 and the largest parity size: the dynamo exporter specializes dimensions of size 1.
    example = G.example_inputs(entry, part, max(sizes, key=lambda s: s[0] * s[1]), batch=2)

    t0 = time.time()
    with atomic_output(onnx_path) as tmp:
        G.torch_export(graph, example, tmp, inputs, outputs, opset, exporter)
        model = onnx.load(str(tmp))
        if calibration is not None:
            model, qstats = Q.quantize_model(model, module, calibration)
            sc["int8"].update(qstats)
        actual = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
        if actual != opset:  # the dynamo exporter falls back to its native opset when it cannot convert
            log.warning("%s: asked for opset %d, the exporter wrote opset %d", onnx_path.name, opset, actual)
            sc["opset_requested"], sc["opset"] = opset, actual
        meta = {"vaepack.model": entry.id, "vaepack.part": part, "vaepack.weights_sha256": digest,
                "vaepack.precision": precision, "vaepack.include_convention": str(include_convention).lower(),
                "vaepack.version": __version__}
        del model.metadata_props[:]
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
        model.doc_string = f"vaepack {entry.id} {part} ({precision}); see the sidecar {sc_path.name}"
        onnx.save(model, str(tmp))
        del model
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"exported graph fails the ONNX checker: {str(e).splitlines()[0][:200]}",
                              path=str(onnx_path)) from None
        sc["export_seconds"] = round(time.time() - t0, 2)
        sc["parity"] = check_parity(sc, tmp, entry, part, module, ref_fn, sizes, image, precision, tolerance)
        sc["onnx_file"] = onnx_path.name
        sc["onnx_sha256"] = sha256_file(tmp)
        sc["onnx_bytes"] = tmp.stat().st_size
        sc["versions"] = O.versions("onnxruntime", "onnxscript", "openvino")
        sc["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with atomic_output(sc_path) as tmp:
        tmp.write_text(json.dumps(sc, indent=1) + "\n")
    log.info("exported %s (%s); parity max abs err %.3g", onnx_path, precision, sc["parity"]["max_abs_err"])
    return ExportResult(onnx_path, sc_path, sc)



def cached_export(model_id: str, part: str, precision: str = "fp32", opset: int = A.DEFAULT_OPSET,
                  include_convention: bool = True, **kw) -> ExportResult:
    """The export runtimes use: ``<cache>/exports/<model>/`` keyed by part, graph precision, opset,
    convention and weights sha256; exported on first use, verified on every later use."""
    entry = get_model(model_id)
    check_args(entry, part, precision, opset, kw.get("exporter", "torchscript"))
    gprec = A.graph_precision(precision)
    digest = weights_digest(entry, A.model_part(part))
    key = digest.replace("+", "")[:16]
    cal = None
    if gprec == "int8":  # a new calibration is a new graph
        cal = Q.find_calibration(entry, A.model_part(part), digest)[0]
        key += "-cal" + Q.calibration_sha256(cal)[:8]
    name = A.artifact_name(entry.id, part, gprec, opset, include_convention) + f"-{key}"
    out = A.export_cache_dir() / entry.id
    path = out / f"{name}.onnx"
    if path.is_file():
        try:
            sc = A.verify_artifact(path, weights_sha256=digest)
            return ExportResult(path, A.sidecar_path(path), sc)
        except ExportError as e:
            log.warning("cached export is unusable (%s); exporting again", e)
    return export_onnx(entry, part, out, precision=gprec, opset=opset, include_convention=include_convention,
                       name=name, calibration=cal, **kw)
