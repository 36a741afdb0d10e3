"""Export a shipped Bridge's projector (paper 001) to ONNX, so ``vaepack convert`` runs a bridge on the
same runtimes as the pixel path (issue 14: the bridge must cost no more than decode + re-encode).

For an ``rgb``-tap bridge the frozen tap *is* the source model's decoder, which already has its own
export (``export.onnx.cached_export``) and runner; only the projector is new. The projector graph takes
the decoded image in [0, 1] (``image``) and, when the bridge reads the source latent too
(``latent_skip``), that latent (``latent``, 1/8 of the image), and returns the target-space latent.
Target-space latents of TAE encoders are diffusion-space latents already, so the graph has no
convention step; the sidecar records the target space's convention for the file writer to check.

The artifact lives in ``<cache>/exports/bridges/`` keyed by the bridge's weights sha256 and opset,
with a sidecar in the format runtimes read (``backends.artifacts``), verified on every use: the ONNX
file's sha256 and the bridge's weights sha256 must match. Parity against the torch projector (fp32)
is checked with onnxruntime or OpenVINO before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaepack import __version__
from vaepack import latents as L
from vaepack.backends import artifacts as A
from vaepack.backends import optional as O
from vaepack.bridges import LoadedBridge
from vaepack.errors import BackendUnavailableError, ExportError, UsageError
from vaepack.export import graph as G
from vaepack.files import sha256_file
from vaepack.io import atomic_output

log = logging.getLogger("vaepack")

BRIDGE_PART = "bridge-projector"
PARITY_TOLERANCE = 1e-4  # max |graph - torch| / output range, fp32 (summation order only)


class _Projector(nn.Module):
    """The exported function: (image[, latent]) -> target latent, float32 in and out."""

    def __init__(self, lb: LoadedBridge):
        super().__init__()
        self.projector = lb.projector
        self.skip = bool(lb.cfg.latent_skip)

    def forward(self, image, *latent):
        return self.projector(image, latent[0] if self.skip else None).float()


def projector_io(lb: LoadedBridge) -> tuple[list[dict], list[dict]]:
    ins = [{"name": "image", "shape": ["batch", 3, "height", "width"], "dtype": "float32"}]
    if lb.cfg.latent_skip:
        ins.append({"name": "latent", "shape": ["batch", lb.cfg.latent_skip, "source_height", "source_width"],
                    "dtype": "float32"})
    outs = [{"name": "target_latent", "shape": ["batch", lb.cfg.target_channels, "latent_height", "latent_width"],
             "dtype": "float32"}]
    return ins, outs


def check_exportable(lb: LoadedBridge) -> None:
    if lb.cfg.tap != "rgb":
        raise UsageError(f"bridge '{lb.entry.id}' taps its source decoder at '{lb.cfg.tap}': only rgb-tap bridges "
                         "run on exported graphs (their tap is the source decoder's own export)",
                         hint="use --backend torch for this bridge")


def _example(lb: LoadedBridge, h: int, w: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, 3, h, w, generator=g),)
    if lb.cfg.latent_skip:
        sf = lb.source.space.factor
        x += (torch.randn(batch, lb.cfg.latent_skip, h // sf, w // sf, generator=g),)
    return x


def _run_graph(path: Path, inputs: list[dict], xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The graph's output with onnxruntime when installed, else OpenVINO fp32 (the parity oracle)."""
    arrays = {t["name"]: x.numpy() for t, x in zip(inputs, xs)}
    try:
        ort = O.require_onnxruntime()
    except BackendUnavailableError:
        ov = O.require_openvino()
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return torch.from_numpy(compiled(arrays)[compiled.output(0)].copy())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, arrays)[0])


def export_bridge_onnx(lb: LoadedBridge, out_dir: str | Path, name: str | None = None,
                       opset: int = A.DEFAULT_OPSET) -> tuple[Path, dict[str, Any]]:
    """Export ``lb``'s projector to ``out_dir/<name>.onnx`` + ``<name>.json``; parity-checked against
    torch fp32 at two sizes before either file is written (both atomically, the sidecar last)."""
    check_exportable(lb)
    onnx = O.require_onnx()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or f"{lb.entry.id}-{BRIDGE_PART}-fp32-op{opset}"
    onnx_path, sc_path = out_dir / f"{name}.onnx", out_dir / f"{name}.json"
    graph = _Projector(lb).float().eval().cpu()
    inputs, outputs = projector_io(lb)
    tgt = lb.target.space
    sc: dict[str, Any] = {
        "format": A.SIDECAR_FORMAT, "format_version": A.FORMAT_VERSION,
        # runners read model/part/factor/size_multiple/inputs: the first input is a [0, 1] image whose
        # sides are multiples of the target factor (32), the bridge writes that many times fewer cells
        "model": lb.entry.id, "part": BRIDGE_PART, "family": "bridge", "bridge": lb.entry.id,
        "weights_sha256": lb.sha256, "source_decoder_sha256": lb.source_decoder_sha256,
        "source": lb.source.id, "target": lb.target.id, "config": dataclasses.asdict(lb.cfg),
        "precision": "fp32", "graph_precision": "fp32", "io_dtype": "float32", "opset": opset,
        "exporter": "torchscript", "include_convention": True, "image_range": "0,1",
        "space": dataclasses.asdict(tgt), "convention": L.convention(tgt),
        "factor": tgt.factor, "size_multiple": tgt.factor, "inputs": inputs, "outputs": outputs,
    }
    t0 = time.time()
    with atomic_output(onnx_path) as tmp:
        G.torch_export(graph, _example(lb, 96, 160), tmp, inputs, outputs, opset, "torchscript")
        model = onnx.load(str(tmp))
        del model.metadata_props[:]
        for k, v in {"vaepack.bridge": lb.entry.id, "vaepack.weights_sha256": lb.sha256,
                     "vaepack.version": __version__}.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"the bridge graph fails the ONNX checker: {str(e).splitlines()[0][:200]}",
                              path=str(onnx_path)) from None
        worst = 0.0
        for i, (h, w) in enumerate(((64, 64), (96, 160))):
            xs = _example(lb, h, w, batch=1, seed=i + 1)
            with torch.no_grad():
                ref = graph(*xs)
            got = _run_graph(tmp, inputs, xs)
            err = float((got - ref).abs().max() / (ref.max() - ref.min()).clamp_min(1e-8))
            worst = max(worst, err)
        if worst > PARITY_TOLERANCE:
            raise ExportError(f"the bridge graph differs from torch by {worst:.2g} of the output range "
                              f"(> {PARITY_TOLERANCE})", path=str(onnx_path))
        sc["parity"] = {"max_rel_err": worst, "sizes": [[64, 64], [96, 160]]}
        sc["export_seconds"] = round(time.time() - t0, 2)
        sc["onnx_file"] = onnx_path.name
        sc["onnx_sha256"] = sha256_file(tmp)
        sc["onnx_bytes"] = tmp.stat().st_size
        sc["versions"] = O.versions("onnxruntime", "openvino")
        sc["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with atomic_output(sc_path) as tmp:
        tmp.write_text(json.dumps(sc, indent=1) + "\n")
    log.info("exported %s; parity %.2g", onnx_path, worst)
    return onnx_path, sc


def verify_bridge_artifact(onnx_path: Path, lb: LoadedBridge) -> dict[str, Any]:
    """The sidecar of a bridge export after checking the file's hash and that it holds ``lb``'s weights."""
    sc = A.read_sidecar(onnx_path)
    have = sha256_file(onnx_path)
    if have != sc["onnx_sha256"]:
        raise ExportError(f"ONNX file does not match its sidecar (sha256 {have[:12]}…)", path=str(onnx_path))
    if sc.get("bridge") != lb.entry.id or sc["weights_sha256"] != lb.sha256:
        raise ExportError(f"exported from other weights than bridge '{lb.entry.id}' ({sc['weights_sha256'][:12]}…)",
                          path=str(onnx_path))
    return sc


def cached_bridge_export(lb: LoadedBridge, opset: int = A.DEFAULT_OPSET) -> tuple[Path, dict[str, Any]]:
    """``<cache>/exports/bridges/<id>-bridge-projector-fp32-op<opset>-<sha16>.onnx``: exported on first
    use, verified on every later use (re-exported when unusable)."""
    name = f"{lb.entry.id}-{BRIDGE_PART}-fp32-op{opset}-{lb.sha256.replace('+', '')[:16]}"
    path = A.export_cache_dir() / "bridges" / f"{name}.onnx"
    if path.is_file():
        try:
            return path, verify_bridge_artifact(path, lb)
        except ExportError as e:
            log.warning("cached bridge export is unusable (%s); exporting again", e)
    return export_bridge_onnx(lb, path.parent, name, opset)
