"""TensorRT engines built from a vaepack ONNX export with a named optimization profile (GPU machines)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vaepack.backends import artifacts as A
from vaepack.backends import optional as O
from vaepack.backends.profiles import TRT_PRECISIONS, Profile, load_profile, profile_shapes
from vaepack.errors import ExportError, UsageError
from vaepack.export.onnx import ExportResult, check_args, export_onnx
from vaepack.export.parity import check_engine_parity
from vaepack.files import atomic_write_bytes, sha256_file
from vaepack.io import atomic_output, check_output
from vaepack.manifest import check_fp16, get_model
from vaepack.paths import cache_dir


def _check_trt_precision(chosen: str) -> None:
    if chosen == "int8":
        raise UsageError("TensorRT engines are not built int8 here: vaepack's int8 graphs use asymmetric "
                         "activations, which TensorRT does not take", hint="int8 runs on --backend openvino or onnxruntime")
    if chosen not in TRT_PRECISIONS:
        raise UsageError(f"unknown precision '{chosen}' (choose {', '.join(TRT_PRECISIONS)})")


def _trt_has(trt, enum: str, member: str) -> bool:
    return hasattr(getattr(trt, enum, None), member)


def build_trt_engine(onnx_path: str | Path, profile: str | Path | Profile, precision: str | None = None, *,
                     out_path: str | Path | None = None, workspace_gb: float | None = None,
                     timing_cache: str | Path | None = None, parity: bool = True,
                     check_weights: bool = True, force: bool = True) -> Path:
    """Build and serialize a TensorRT engine from a vaepack ONNX export.

    - precision: ``None`` takes the profile's choice for the model's family (skipping fp16 for
      models with ``fp16_safe: false``); an explicit fp16 for such a model is refused.
    - An fp16 graph (``graph_precision: fp16``) is built strongly typed: the ONNX carries the dtypes.
      bf16 (and fp16 on an fp32 graph) uses TensorRT 10's weak-typing flags with every Resize layer
      pinned to fp32 (TensorRT has no bf16 Resize); TensorRT 11 dropped those flags, so there it
      needs an fp16 export instead. fp32 disables TF32 so the fp32 parity tolerance holds.
    - The timing cache (default ``<cache>/tensorrt/timing-<gpu>-trt<version>.cache``) is read and
      updated; the workspace limit comes from the argument or the profile.
    Writes ``<engine>`` and ``<engine minus suffix>.json`` atomically, after a parity check of the
    engine against PyTorch fp32 at the profile's min and opt sizes (``parity=False`` skips it); an
    existing engine is refused unless ``force``.
    """
    onnx_path = Path(onnx_path)
    sc = A.verify_artifact(onnx_path, check_weights=check_weights)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    if sc["part"] == "eps-step" and precision is None:
        precision = prof.precision_for("eps", sc.get("fp16_safe", True))
    chosen = precision or prof.precision_for(sc["family"], sc.get("fp16_safe", True))
    _check_trt_precision(chosen)
    if chosen == "fp16":
        check_fp16(sc["model"], sc.get("fp16_safe", True), hint="build it with --precision bf16 or fp32, or use fp16-fix weights")
    if sc["graph_precision"] == "fp16" and chosen != "fp16":
        raise UsageError(f"{onnx_path.name} is an fp16 graph; a {chosen} engine needs the fp32 export",
                         path=str(onnx_path), hint=f"export with --precision {chosen}")
    shapes = profile_shapes(prof, sc)  # also checks the profile against the model's size multiple
    out = Path(out_path) if out_path else onnx_path.with_name(f"{onnx_path.stem}.{prof.name}.{chosen}.engine")
    if not force:
        check_output(out, force=False)
    trt = O.require_tensorrt()

    strongly_typed = sc["graph_precision"] == "fp16" or chosen == "fp32"
    weak = not strongly_typed
    if weak and not _trt_has(trt, "BuilderFlag", chosen.upper()):
        raise ExportError(f"TensorRT {trt.__version__} builds only strongly typed networks and has no {chosen} "
                          "flag for an fp32 graph", hint="build from an --precision fp16 export, or fp32")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and _trt_has(trt, "NetworkDefinitionCreationFlag", "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse the ONNX graph: {errs[:300]}", path=str(onnx_path))
    config = builder.create_builder_config()
    ws = workspace_gb if workspace_gb is not None else prof.workspace_gb
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(ws * (1 << 30)))
    if chosen == "fp32" and _trt_has(trt, "BuilderFlag", "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if weak:
        config.set_flag(getattr(trt.BuilderFlag, chosen.upper()))
        pinned = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if chosen == "bf16" and layer.type == trt.LayerType.RESIZE:  # TensorRT has no bf16 Resize
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
                pinned += 1
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    opt = builder.create_optimization_profile()
    for name, (mn, op, mx) in shapes.items():
        opt.set_shape(name, mn, op, mx)
    config.add_optimization_profile(opt)

    gpu = torch.cuda.get_device_name(0).replace(" ", "_")
    tc_path = (Path(timing_cache) if timing_cache
               else cache_dir() / "tensorrt" / f"timing-{gpu}-trt{trt.__version__}.cache")
    tc_bytes = tc_path.read_bytes() if tc_path.is_file() else b""
    cache = config.create_timing_cache(tc_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.time()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build a {chosen} engine for profile '{prof.name}'",
                          path=str(onnx_path), hint="see the TensorRT log above; try fp32 or a smaller profile")
    atomic_write_bytes(tc_path, bytes(config.get_timing_cache().serialize()))

    esc = {k: v for k, v in sc.items() if k not in ("parity", "format", "onnx_file")}
    esc.update({
        "format": A.ENGINE_FORMAT, "format_version": A.FORMAT_VERSION, "engine_file": out.name,
        "onnx_file": onnx_path.name, "onnx_sha256": sc["onnx_sha256"], "engine_precision": chosen,
        "strongly_typed": strongly_typed, "profile": prof.as_dict(),
        "profile_shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
        "workspace_gb": ws, "timing_cache": str(tc_path), "gpu": torch.cuda.get_device_name(0),
        "build_seconds": round(time.time() - t0, 1), "versions": O.versions("tensorrt"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    with atomic_output(out) as tmp:
        tmp.write_bytes(bytes(plan))
        esc["engine_sha256"] = sha256_file(tmp)
        if parity and sc["part"] != "eps-step":
            esc["parity"] = check_engine_parity(tmp, esc, prof, chosen)
    with atomic_output(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(esc, indent=1) + "\n")
    return out


def export_trt(model_id: str, part: str = "decoder", profile: str | Path = "hires-1024", precision: str | None = None,
               out_dir: str | Path | None = None, opset: int = A.DEFAULT_OPSET, include_convention: bool = True,
               **kw) -> tuple[ExportResult, Path]:
    """``vaepack export --trt``: resolve the precision (argument, else the profile's choice for the
    model's family), export the matching ONNX graph (fp16 graph for fp16, fp32 graph otherwise),
    build the engine next to it. Checks TensorRT/CUDA first so nothing is exported in vain."""
    entry = get_model(model_id)
    prof = load_profile(profile)
    family = "eps" if part == "eps-step" else entry.part(part).family
    chosen = precision or prof.precision_for(family, entry.fp16_safe)
    check_args(entry, part, chosen, opset, kw.get("exporter", "torchscript"))
    _check_trt_precision(chosen)
    O.require_tensorrt()
    res = export_onnx(entry, part, out_dir, precision=chosen, opset=opset, include_convention=include_convention, **kw)
    return res, build_trt_engine(res.onnx_path, prof, chosen, force=kw.get("force", True))
