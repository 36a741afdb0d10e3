"""``vaepack export``: ONNX (+ sidecar, parity) and TensorRT engines."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vaepack.cli.common import JsonOpt, emit_json, note
from vaepack.errors import UsageError


def export(
    model: str = typer.Argument("default", help="Model id or alias."),
    part: str = typer.Option("decoder", "--part", help="encoder, decoder or eps-step (diffusion decoders)."),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Write the ONNX graph (always, for --trt)."),
    trt: bool = typer.Option(False, "--trt", help="Also build a TensorRT engine (needs tensorrt + CUDA)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16, bf16 or int8 (onnxruntime/OpenVINO)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="int8: images (folder/files/glob) to "
                                              "calibrate on, or a calibration JSON (default: the shipped one)."),
    calibration_images: int = typer.Option(64, "--calibration-images", help="int8: images used (one random crop each)."),
    calibration_scale: float = typer.Option(1.5, "--calibration-scale", help="int8: the --scale your encodes use."),
    keep_float: int = typer.Option(0, "--keep-float", min=0, help="int8 calibration: leave the N Convs whose int8 "
                                   "error is largest in float (measured on the calibration crops)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default: vaepack's)."),
    profile: str = typer.Option("hires-1024", "--profile", help="TensorRT profile name (export/profiles) or file."),
    raw: bool = typer.Option(False, "--raw", help="Leave the latent convention out of the graph (recorded in "
                             "the sidecar; runtimes apply it)."),
    image: Optional[Path] = typer.Option(None, "--image", help="Real image for the parity check."),
    out_dir: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (default export/artifacts)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing artifacts in the output folder."),
    as_json: bool = JsonOpt,
):
    """Export a model part to ONNX (+ sidecar JSON with convention, hashes, parity) and TensorRT."""
    from vaepack.export.onnx import export_onnx
    from vaepack.export.parity import parity_summary
    from vaepack.export.trt import export_trt

    kw: dict = {"opset": opset} if opset else {}
    if calibration is not None or keep_float:  # (prepare_calibration refuses --keep-float without images)
        from vaepack import quantize as Q
        from vaepack.manifest import get_model

        if precision != "int8":
            raise UsageError("--calibration is for --precision int8")
        if calibration is not None and not calibration.lower().endswith(".json"):
            note(f"calibrating int8 on up to {calibration_images} images of {calibration}")
        kw["calibration"] = Q.prepare_calibration(get_model(model), "decoder" if part == "eps-step" else part,
                                                  calibration, count=calibration_images, scale=calibration_scale,
                                                  keep_float=keep_float)
    if trt:
        res, engine = export_trt(model, part, profile=profile, precision=precision, out_dir=out_dir,
                                 include_convention=not raw, force=force, **kw)
    else:
        if not onnx:
            raise UsageError("nothing to do: give --onnx or --trt")
        res = export_onnx(model, part, out_dir=out_dir, precision=precision, include_convention=not raw,
                          image=image, force=force, **kw)
        engine = None
    if as_json:
        emit_json({"onnx": str(res.onnx_path), "sidecar": str(res.sidecar_path), "engine": engine and str(engine),
                    "parity": res.parity})
        return
    for line in parity_summary(res.parity):
        note(line)
    note(f"wrote {res.onnx_path} and {res.sidecar_path.name}" + (f"; engine {engine}" if engine else ""))

