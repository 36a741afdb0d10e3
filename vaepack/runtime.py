"""Backend and precision choice: which runner runs a model part, and ``load_vae(backend=...)``.

``get_backend(name, model_id, part, precision, ...)`` returns a runner (vaepack.backends.runners) whose
``runner(x)`` has VAE.encode / VAE.decode semantics. ONNX files come from ``export.onnx.cached_export``
(exported on first use into <cache>/exports, keyed by model, part, weights sha256, opset and graph
precision) or from an explicit ``onnx_path``, which is verified against its sidecar and the model's
current weights.

``--backend auto`` (``best_cpu_choice``): the fastest installed CPU path whose precision meets the auto
policy of vaepack/policy.py for the model (measured; the manifest's ``bf16_safe`` records the verdict):
OpenVINO when installed, else torch; bf16 where the CPU has native bf16, else fp32.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

import torch

from vaepack import quantize as Q
from vaepack.backends import artifacts as A
from vaepack.backends import optional as O
from vaepack.backends.profiles import load_profile
from vaepack.backends.runners import (BACKEND_PRECISIONS, OnnxRuntimeRunner, OpenVINORunner, Runner, TensorRTRunner,
                                      TorchRunner)
from vaepack.errors import BackendUnavailableError, ExportError, UsageError
from vaepack.export.onnx import cached_export
from vaepack.export.trt import build_trt_engine
from vaepack.manifest import ModelEntry, check_fp16, get_model
from vaepack.paths import cache_dir
from vaepack.vae import VAE, load_torch_vae, pick_device

log = logging.getLogger("vaepack")

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
ALIASES = {"ort": "onnxruntime", "ov": "openvino", "trt": "tensorrt", "pytorch": "torch"}
DEFAULT_TRT_PROFILE = "hires-1024"


# --------------------------------------------------------------------------- selection
def _norm_backend(name: str) -> str:
    n = ALIASES.get(name.lower(), name.lower())
    if n not in BACKENDS:
        raise UsageError(f"unknown backend '{name}' (choose {', '.join(BACKENDS)})")
    return n


def _check_precision(backend: str, precision: str) -> None:
    ok = BACKEND_PRECISIONS[backend]
    if precision not in ok:
        why = {"onnxruntime": "its CPU provider has no bf16 kernels; use --backend openvino or torch for bf16",
               "openvino": "OpenVINO's CPU plugin runs fp32, bf16 or int8 here",
               "torch": "int8 runs on the exported graph: use --backend openvino or onnxruntime",
               "tensorrt": "vaepack's int8 graphs use asymmetric activations, which TensorRT does not take"
               }.get(backend, "")
        raise UsageError(f"the {backend} backend takes precision {', '.join(ok)}, not {precision}"
                         + (f" ({why})" if why else ""))


def _explicit_artifact(onnx_path: str | Path, model_id: str, part: str) -> dict:
    sc = A.verify_artifact(onnx_path)  # refuses a sidecar whose weights hash does not match the model's
    if sc["model"] != model_id or sc["part"] != part:
        raise UsageError(f"{Path(onnx_path).name} is the {sc['part']} of '{sc['model']}', not the {part} of "
                         f"'{model_id}'", path=str(onnx_path))
    return sc


def get_backend(name: str, model_id: str, part: str = "decoder", precision: str = "fp32", *,
                device: str | None = None, threads: int | None = None, graph_optimization: str = "all",
                providers: list | None = None, opset: int = A.DEFAULT_OPSET, include_convention: bool = True,
                onnx_path: str | Path | None = None, engine_path: str | Path | None = None,
                profile: str | Path | None = None) -> Runner:
    """One runner for ``model_id``'s ``part`` on backend ``name`` at ``precision``.

    ``onnx_path``: use this export (verified against its sidecar and the current weights) instead of
    the cache. ``engine_path``: a TensorRT engine built by ``export.build_trt_engine``. ``profile``:
    TensorRT optimization profile for on-demand engines (default ``hires-1024``).
    """
    backend = _norm_backend(name)
    _check_precision(backend, precision)
    entry = get_model(model_id)
    mid = entry.id
    if part not in A.EXPORT_PARTS:
        raise UsageError(f"unknown part '{part}' (choose {', '.join(A.EXPORT_PARTS)})")
    if precision == "fp16":
        check_fp16(mid, entry.fp16_safe, hint="use --precision bf16 or fp32")
    if backend == "torch":
        return TorchRunner(mid, part, precision, device=device, threads=threads)

    def artifact(graph_prec: str) -> tuple[Path, dict]:
        if onnx_path is not None:
            sc = _explicit_artifact(onnx_path, mid, part)
            if sc["graph_precision"] != graph_prec:
                raise UsageError(f"{Path(onnx_path).name} is a {sc['graph_precision']} graph; {backend} "
                                 f"{precision} needs the {graph_prec} export", path=str(onnx_path))
            return Path(onnx_path), sc
        res = cached_export(mid, part, graph_prec, opset=opset, include_convention=include_convention)
        return res.onnx_path, res.sidecar

    if backend == "onnxruntime":
        O.require_onnxruntime()  # fail on a missing/broken install before exporting anything
        path, sc = artifact(A.graph_precision(precision))
        return OnnxRuntimeRunner(path, sc, precision, providers=providers, threads=threads,
                                 graph_optimization=graph_optimization)
    if backend == "openvino":
        O.require_openvino()
        path, sc = artifact(A.graph_precision(precision))
        # An int8 graph that keeps Convs float runs them (and its other float ops) in bf16 where that is
        # native and the model bf16-safe: the default decoder's (4 float Convs) ran 240 instead of 341 ms at
        # 768 px; an all-int8 graph stays on fp32, which measured faster for it (benchmarks/results/int8.md).
        mixed = precision == "int8" and (sc.get("int8") or {}).get("float_convs", 0) > 0
        hint = cpu_float_precision(entry) if mixed else "fp32"
        return OpenVINORunner(path, sc, precision, threads=threads, float_hint=hint)
    # tensorrt
    O.require_tensorrt()
    if engine_path is not None:
        esc = A.read_engine_sidecar(engine_path)
        if esc["model"] != mid or esc["part"] != part:
            raise UsageError(f"engine is the {esc['part']} of '{esc['model']}', not the {part} of '{mid}'",
                             path=str(engine_path))
        return TensorRTRunner(engine_path, esc)
    path, sc = artifact(A.graph_precision(precision))
    prof = load_profile(profile or DEFAULT_TRT_PROFILE)
    gpu = torch.cuda.get_device_name(0).replace(" ", "_")
    import tensorrt as trt

    eng = cache_dir() / "tensorrt" / f"{path.stem}.{prof.name}.{precision}.{gpu}.trt{trt.__version__}.engine"
    if eng.is_file():
        try:
            esc = A.read_engine_sidecar(eng)
            if esc.get("onnx_sha256") == sc["onnx_sha256"] and esc.get("profile") == prof.as_dict():
                return TensorRTRunner(eng, esc, profile=prof)
        except ExportError as e:
            log.warning("cached engine is unusable (%s); building it again", e)
    build_trt_engine(path, prof, precision, out_path=eng)
    return TensorRTRunner(eng, profile=prof)


def projector_runner(name: str, onnx_path: Path, sc: dict, precision: str, *, threads: int | None = None) -> Runner:
    """A runner for an exported bridge projector (vaepack.export.bridge) on an ONNX backend at a float
    precision: ``runner(image[, latent])`` -> target latent."""
    backend = _norm_backend(name)
    if backend not in ("openvino", "onnxruntime"):
        raise UsageError(f"a bridge's projector graph runs on openvino or onnxruntime, not {backend}")
    _check_precision(backend, precision)
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"a bridge's projector graph runs at fp32 or bf16, not {precision}")
    if backend == "onnxruntime":
        O.require_onnxruntime()
        return OnnxRuntimeRunner(onnx_path, sc, precision, threads=threads)
    O.require_openvino()
    return OpenVINORunner(onnx_path, sc, precision, threads=threads)


def available_backends() -> dict[str, str | None]:
    """Backend -> None if usable here, else the reason (one line, with the install hint)."""
    out: dict[str, str | None] = {"torch": None}
    checks = {"onnxruntime": (O.require_onnx, O.require_onnxruntime),
              "openvino": (O.require_onnx, O.require_openvino), "tensorrt": (O.require_onnx, O.require_tensorrt)}
    for name, fns in checks.items():
        try:
            for fn in fns:
                fn()
            out[name] = None
        except BackendUnavailableError as e:
            out[name] = str(e)
    return out


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16/AMX on x86, BF16 on Arm); without it bf16
    is emulated and slower than fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() == "arm64" and platform.system() == "Darwin"  # Apple M2+ have BF16
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_float_precision(entry=None) -> str:
    """bf16 where the CPU has native bf16 and the model's manifest entry does not say
    ``bf16_safe: false``, else fp32."""
    return "bf16" if cpu_has_native_bf16() and getattr(entry, "bf16_safe", True) else "fp32"


def best_cpu_choice(entry=None) -> tuple[str, str]:
    """(backend, precision) of the fastest CPU path that keeps round-trip quality: OpenVINO when
    installed, else torch; bf16 where the CPU has native bf16 and the model's manifest entry does not
    say ``bf16_safe: false`` (its measured bf16 round trip fails vaepack/policy.py), else fp32. On OpenVINO,
    parts whose shipped int8 calibration is marked ``auto`` run int8 (``best_part_precision``)."""
    prec = cpu_float_precision(entry)
    try:
        O.require_onnx()
        O.require_openvino()
        return "openvino", prec
    except BackendUnavailableError:
        return "torch", prec


def best_part_precision(entry, part: str, backend: str, precision: str) -> str:
    """int8 for a part whose manifest entry ships an int8 calibration marked ``auto: true`` (its dev
    round trip meets vaepack/policy.py) when the backend is OpenVINO, else ``precision``. The default
    encoder's does (quantization-aware weights: photos -0.18..+0.24 dB; post-training int8 moved them
    -0.26..+0.43 dB, benchmarks/results/int8.md)."""
    spec = entry.part(part)
    if backend == "openvino" and spec.int8_calibration is not None and spec.int8_auto:
        return "int8"
    return precision


def best_cpu_backend(model_id: str, part: str = "decoder", *, threads: int | None = None) -> Runner:
    """Runner for ``best_cpu_choice()``, falling back to torch if OpenVINO cannot take the model."""
    entry = get_model(model_id) if isinstance(model_id, str) else model_id
    name, prec = best_cpu_choice(entry)
    if name == "openvino":
        try:
            return get_backend("openvino", entry.id, part, best_part_precision(entry, part, name, prec),
                               threads=threads)
        except (BackendUnavailableError, ExportError, UsageError) as e:
            log.warning("OpenVINO cannot run %s %s (%s); using torch %s", model_id, part, e, prec)
    return get_backend("torch", model_id, part, prec, device="cpu", threads=threads)



def load_vae(model: str | ModelEntry, parts=("encoder", "decoder"), device: str | None = None,
             dtype: str | None = "fp32", backend: str = "torch") -> VAE:
    """Load parts of a manifest model. ``backend``: torch, onnxruntime, openvino, tensorrt, or auto
    (the fastest CPU path that is installed and keeps the model's quality, see
    vaepack.runtime.best_cpu_choice; torch on CUDA and for diffusion decoders). ``dtype`` None: auto's
    precision, else fp32; an explicit ``dtype`` is kept under auto. Under auto with no ``dtype``, a
    part whose shipped int8 calibration says ``auto: true`` runs int8 on OpenVINO (none yet).
    ``dtype="int8"`` needs an ONNX backend: parts with a calibration run int8, the others (and the
    torch modules kept for tiled runs) at ``runtime.cpu_float_precision``."""
    entry = get_model(model) if isinstance(model, str) else model
    dev = pick_device(device)
    auto = backend == "auto"
    part_prec: dict[str, str] = {}
    if auto:
        if dev.type == "cuda" or any(entry.part(p).family == "eps" for p in parts):
            name, prec = "torch", "fp32"  # the eps sampler loop runs in torch; CUDA is torch's own fast path
        else:
            name, prec = best_cpu_choice(entry)  # (imports onnx/openvino to see whether they are installed)
            if dtype is None:
                part_prec = {p: best_part_precision(entry, p, name, prec) for p in parts}
        backend, dtype = name, dtype or prec
    dtype = dtype or "fp32"
    if dtype == "int8":
        if backend == "torch":
            raise UsageError("int8 runs on an exported graph, not in torch",
                             hint="use --backend openvino or onnxruntime with --dtype int8")
        # int8 where the part has a calibration (shipped or made with `vaepack export --precision int8
        # --calibration`), the others at the float precision auto would take (e.g. the default
        # encoder int8 + its decoder bf16 in one roundtrip); --json reports each part's precision.
        dtype = cpu_float_precision(entry) if dev.type == "cpu" else "fp32"
        part_prec = {p: "int8" if Q.has_calibration(entry, p) else dtype for p in parts}
        for p, v in part_prec.items():
            if v != "int8":
                log.warning("%s %s has no int8 calibration, so it runs %s (make one: vaepack export %s --part %s "
                            "--precision int8 --calibration DIR)", entry.id, p, v, entry.id, p)
    vae = load_torch_vae(entry, parts=parts, device=str(dev), dtype=dtype)
    if backend != "torch":
        for part in parts:
            prec = part_prec.get(part, dtype)
            try:
                vae.parts[part].runner = get_backend(backend, entry.id, part, prec, device=str(dev))
                vae.parts[part].backend = backend
                vae.parts[part].precision = prec if prec != dtype else None
            except (BackendUnavailableError, ExportError, UsageError) as e:
                if not auto:
                    raise
                # auto falls back cleanly: torch at the float precision, with the reason in the log
                log.warning("%s cannot run %s %s %s (%s); using torch %s", backend, entry.id, part, prec, e, dtype)
    return vae


__all__ = [
    "BACKENDS", "BACKEND_PRECISIONS", "OnnxRuntimeRunner", "OpenVINORunner", "Runner", "TensorRTRunner",
    "TorchRunner", "available_backends", "best_cpu_backend", "best_cpu_choice", "best_part_precision",
    "cpu_float_precision", "cpu_has_native_bf16", "get_backend", "load_vae",
]
