"""Runtime backends behind one interface, so the CLI never branches per backend.

``get_backend(name, model_id, part, precision, ...)`` returns a ``Runner``; ``runner(x)`` takes and
returns the same tensors as ``VAE.encode`` / ``VAE.decode``: float NCHW images in [0, 1] in and
diffusion-space latents out (encoder), or the reverse (decoder, clamped to [0, 1]); float32 out.
Where an ONNX graph leaves the latent convention out, the runner applies it through
vaepack/latents.py (``export.graph_pre`` / ``graph_post``).

Backends and precisions:
- torch: fp32, bf16 (CPU: channels_last + autocast, as in vaepack/vae.py), fp16 on CUDA only.
- onnxruntime: fp32, fp16 (the fp16 graph), int8 (the QDQ graph of vaepack/quantize.py). Providers TensorRT > CUDA > CPU where available;
  threads and graph optimization level exposed; sessions cached per artifact for the process.
- openvino: fp32, bf16 (``INFERENCE_PRECISION_HINT`` on the fp32 graph), int8 (the QDQ graph, the
  float ops left in it run fp32: a bf16 hint measured slower, 65.7 vs 62.3 ms, on the default encoder at
  512 px); compiled models cached on disk (``CACHE_DIR`` = <cache>/openvino) and per process.
- tensorrt: fp32, fp16, bf16 engines built from the export with a named profile (export/profiles);
  inputs outside the profile are refused before running.
ONNX files come from ``export.cached_export`` (exported on first use into <cache>/exports, keyed by
model, part, weights sha256, opset and graph precision) or from an explicit ``onnx_path``, which is
verified against its sidecar and the model's current weights.

Outputs are on the backend's device: CPU for onnxruntime/openvino, CUDA for tensorrt, the VAE's
device for torch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaepack import export as X
from vaepack.errors import BackendUnavailableError, ExportError, UsageError
from vaepack.paths import cache_dir

log = logging.getLogger("vaepack")

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
ALIASES = {"ort": "onnxruntime", "ov": "openvino", "trt": "tensorrt", "pytorch": "torch"}
BACKEND_PRECISIONS = {
    "torch": ("fp32", "bf16", "fp16"),
    "onnxruntime": ("fp32", "fp16", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
    "tensorrt": ("fp32", "fp16", "bf16"),
}
GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")
ORT_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
DEFAULT_TRT_PROFILE = "hires-1024"

# Per-process caches keyed by artifact path + hash + settings: one session / compiled model per
# artifact, reused across every batch and every get_backend call. Empty at import.
_ORT_SESSIONS: dict[tuple, Any] = {}
_OV_COMPILED: dict[tuple, Any] = {}
_OV_CORE: list[Any] = []


def clear_caches() -> None:
    _ORT_SESSIONS.clear()
    _OV_COMPILED.clear()
    _OV_CORE.clear()


# --------------------------------------------------------------------------- interface
class Runner:
    """``runner(x) -> y`` with VAE.encode/VAE.decode semantics (see the module docstring)."""

    backend = "?"

    def __init__(self, model_id: str, part: str, precision: str, *, in_channels: int, latent_input: bool,
                 factor: int, size_multiple: int):
        self.model_id, self.part, self.precision = model_id, part, precision
        self._in_channels, self._latent_input = in_channels, latent_input
        self._factor, self._mult = factor, size_multiple

    def check_input(self, x: torch.Tensor) -> None:
        what = f"{self.backend} {self.part} of '{self.model_id}'"
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise UsageError(f"{what} takes a float (B, C, H, W) tensor, got {got}")
        if x.shape[1] != self._in_channels:
            raise UsageError(f"{what} takes {self._in_channels} channels, got {x.shape[1]}")
        h, w = x.shape[-2:]
        px_h, px_w = (h * self._factor, w * self._factor) if self._latent_input else (h, w)
        if px_h % self._mult or px_w % self._mult or h == 0 or w == 0:
            unit = "latent sizes" if self._latent_input else "image sizes"
            m = self._mult // self._factor if self._latent_input else self._mult
            raise UsageError(f"{what} needs {unit} that are multiples of {m}, got {h}x{w}",
                             hint="pad the input (the pipeline does this)")

    def __call__(self, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.backend} {self.precision}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.model_id} {self.part} {self.describe()}>"


@contextlib.contextmanager
def _torch_threads(n: int | None):
    # torch's thread count is process-global; set it only for the call and put it back.
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- torch
class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, model_id: str, part: str, precision: str = "fp32", device: str | None = None,
                 threads: int | None = None):
        from vaepack.manifest import get_model
        from vaepack.vae import load_vae, pick_device

        if part not in ("encoder", "decoder"):
            raise UsageError(f"the torch backend runs encoder or decoder, not '{part}'")
        dev = pick_device(device)
        if precision == "fp16" and dev.type != "cuda":
            raise UsageError("torch fp16 runs on CUDA only", hint="use --precision bf16 on CPU")
        entry = get_model(model_id)
        super().__init__(entry.id, part, precision, in_channels=3 if part == "encoder" else entry.space.channels,
                         latent_input=part == "decoder", factor=entry.space.factor,
                         size_multiple=X.size_multiple(entry, part))
        self.threads = threads
        self.vae = load_vae(entry, parts=(part,), device=str(dev), dtype=precision)

    def __call__(self, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        with _torch_threads(self.threads):
            return self.vae.encode(x) if self.part == "encoder" else self.vae.decode(x)

    def describe(self) -> str:
        return f"torch {torch.__version__} {self.vae.device.type} {self.precision}"


# --------------------------------------------------------------------------- ONNX-based runners
class _GraphRunner(Runner):
    """Shared by the ONNX-file backends: input checks and the convention outside the graph."""

    def __init__(self, sc: dict, precision: str):
        first = sc["inputs"][0]["shape"]
        super().__init__(sc["model"], sc["part"], precision, in_channels=int(first[1]),
                         latent_input=first[2] == "latent_height", factor=int(sc["factor"]),
                         size_multiple=int(sc["size_multiple"]))
        self.sidecar = sc
        self.input_names = [t["name"] for t in sc["inputs"]]

    def __call__(self, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if len(more) != len(self.input_names) - 1:
            raise UsageError(f"{self.backend} {self.part} of '{self.model_id}' takes {len(self.input_names)} "
                             f"inputs ({', '.join(self.input_names)}), got {1 + len(more)}")
        xs = [X.graph_pre(self.sidecar, x.detach().float().cpu())] + [m.detach().float().cpu() for m in more]
        arrays = {n: np.ascontiguousarray(t.numpy()) for n, t in zip(self.input_names, xs)}
        y = torch.from_numpy(self._run(arrays))
        return X.graph_post(self.sidecar, y).contiguous()

    def _run(self, arrays: dict[str, np.ndarray]) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def _ort_providers(ort, requested: list | None, precision: str) -> list:
    if requested:
        return list(requested)
    avail = ort.get_available_providers()
    out: list = []
    for p in ORT_PROVIDER_ORDER:
        if p not in avail:
            continue
        if p == "TensorrtExecutionProvider":
            trt_dir = cache_dir() / "onnxruntime-trt"
            out.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_dir),
                            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(trt_dir)}))
        else:
            out.append(p)
    return out


class OnnxRuntimeRunner(_GraphRunner):
    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path, sc: dict, precision: str | None = None, *, providers: list | None = None,
                 threads: int | None = None, graph_optimization: str = "all", cache: bool = True):
        ort = X.require_onnxruntime()
        precision = precision or sc["graph_precision"]
        super().__init__(sc, precision)
        if graph_optimization not in GRAPH_OPT_LEVELS:
            raise UsageError(f"unknown graph optimization level '{graph_optimization}' "
                             f"(choose {', '.join(GRAPH_OPT_LEVELS)})")
        self.onnx_path = Path(onnx_path)
        provs = _ort_providers(ort, providers, precision)
        key = (str(self.onnx_path.resolve()), sc.get("onnx_sha256"), repr(provs), threads, graph_optimization)
        sess = _ORT_SESSIONS.get(key) if cache else None
        if sess is None:
            so = ort.SessionOptions()
            if threads:
                so.intra_op_num_threads = int(threads)
                so.inter_op_num_threads = 1
            so.graph_optimization_level = {
                "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            }[graph_optimization]
            so.log_severity_level = 3  # warnings about fp16 Cast insertion on CPU are expected
            try:
                sess = ort.InferenceSession(str(self.onnx_path), so, providers=provs)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise ExportError(f"onnxruntime cannot load the graph: {str(e).splitlines()[0][:200]}",
                                  path=str(self.onnx_path), hint="re-export it with this vaepack") from None
            if cache:
                _ORT_SESSIONS[key] = sess
        self.session = sess
        self.output_name = sess.get_outputs()[0].name

    def _run(self, arrays):
        return self.session.run([self.output_name], arrays)[0]

    def describe(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__} {','.join(self.session.get_providers())} {self.precision}"


def _ov_core():
    if not _OV_CORE:
        ov = X.require_openvino()
        _OV_CORE.append(ov.Core())
    return _OV_CORE[0]


class OpenVINORunner(_GraphRunner):
    backend = "openvino"

    def __init__(self, onnx_path: str | Path, sc: dict, precision: str = "fp32", *, threads: int | None = None,
                 cache: bool = True):
        ov = X.require_openvino()
        import openvino.properties as props
        import openvino.properties.hint as hints

        if precision not in BACKEND_PRECISIONS["openvino"]:
            raise UsageError(f"openvino runs fp32, bf16 or int8 on CPU, not {precision}")
        want = X.graph_precision(precision)
        if sc["graph_precision"] != want:
            raise UsageError(f"openvino {precision} compiles the {want} export (bf16 is a runtime hint on the fp32 one)",
                             path=str(onnx_path))
        super().__init__(sc, precision)
        self.onnx_path = Path(onnx_path)
        key = (str(self.onnx_path.resolve()), sc.get("onnx_sha256"), precision, threads)
        compiled = _OV_COMPILED.get(key) if cache else None
        if compiled is None:
            cfg: dict = {
                hints.inference_precision: ov.Type.bf16 if precision == "bf16" else ov.Type.f32,  # int8: see above
                hints.performance_mode: hints.PerformanceMode.LATENCY,
            }
            if threads:
                cfg[props.inference_num_threads] = int(threads)
            if cache:
                cdir = cache_dir() / "openvino"
                cdir.mkdir(parents=True, exist_ok=True)
                cfg[props.cache_dir] = str(cdir)
            try:
                compiled = _ov_core().compile_model(str(self.onnx_path), "CPU", cfg)
            except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
                raise ExportError(f"OpenVINO cannot compile the graph: {str(e).strip().splitlines()[0][:200]}",
                                  path=str(self.onnx_path)) from None
            if cache:
                _OV_COMPILED[key] = compiled
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def _run(self, arrays):
        res = self.request.infer(arrays)
        # The request reuses its output buffer on the next call: copy it out.
        return np.array(res[self.compiled.output(0)], dtype=np.float32, copy=True)

    def describe(self) -> str:
        import openvino as ov

        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        hint = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        return f"openvino {ov.__version__.split('-')[0]} CPU {self.precision} (inference precision {hint})"


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, engine_path: str | Path, esc: dict | None = None, *, profile: X.Profile | None = None,
                 verify: bool = True):
        trt = X.require_tensorrt()
        self.engine_path = Path(engine_path)
        esc = X.read_engine_sidecar(self.engine_path) if (esc is None or verify) else esc
        first = esc["inputs"][0]["shape"]
        super().__init__(esc["model"], esc["part"], esc["engine_precision"], in_channels=int(first[1]),
                         latent_input=first[2] == "latent_height", factor=int(esc["factor"]),
                         size_multiple=int(esc["size_multiple"]))
        self.sidecar = esc
        p = esc["profile"]
        self.profile = profile or X.Profile(
            name=p["name"], path=Path(p.get("path", p["name"])), batch=X.Range(**p["batch"]),
            height=X.Range(**p["height"]), width=X.Range(**p["width"]))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._rt = trt.Runtime(self._logger)
        self.engine = self._rt.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise ExportError("TensorRT cannot load the engine (built by another TensorRT version or GPU?)",
                              path=str(self.engine_path), hint="rebuild it: vaepack export --trt")
        self.context = self.engine.create_execution_context()
        self.input_names = [t["name"] for t in esc["inputs"]]
        self.output_name = esc["outputs"][0]["name"]

    def __call__(self, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        X.check_profile_shape(self.profile, self.sidecar, tuple(x.shape))  # before touching the GPU
        dev = torch.device("cuda")
        xs = [X.graph_pre(self.sidecar, x.detach().float().to(dev))] + [m.detach().float().to(dev) for m in more]
        xs = [t.contiguous() for t in xs]
        for name, t in zip(self.input_names, xs):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        y = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device=dev, dtype=torch.float32)
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        stream = torch.cuda.current_stream(dev)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed", path=str(self.engine_path))
        stream.synchronize()
        return X.graph_post(self.sidecar, y).contiguous()

    def describe(self) -> str:
        import tensorrt as trt

        return f"tensorrt {trt.__version__} {self.precision} profile {self.profile.name}"


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
    sc = X.verify_artifact(onnx_path)  # refuses a sidecar whose weights hash does not match the model's
    if sc["model"] != model_id or sc["part"] != part:
        raise UsageError(f"{Path(onnx_path).name} is the {sc['part']} of '{sc['model']}', not the {part} of "
                         f"'{model_id}'", path=str(onnx_path))
    return sc


def get_backend(name: str, model_id: str, part: str = "decoder", precision: str = "fp32", *,
                device: str | None = None, threads: int | None = None, graph_optimization: str = "all",
                providers: list | None = None, opset: int = X.DEFAULT_OPSET, include_convention: bool = True,
                onnx_path: str | Path | None = None, engine_path: str | Path | None = None,
                profile: str | Path | None = None) -> Runner:
    """One runner for ``model_id``'s ``part`` on backend ``name`` at ``precision``.

    ``onnx_path``: use this export (verified against its sidecar and the current weights) instead of
    the cache. ``engine_path``: a TensorRT engine built by ``export.build_trt_engine``. ``profile``:
    TensorRT optimization profile for on-demand engines (default ``hires-1024``).
    """
    from vaepack.manifest import get_model

    backend = _norm_backend(name)
    _check_precision(backend, precision)
    entry = get_model(model_id)
    mid = entry.id
    if part not in X.EXPORT_PARTS:
        raise UsageError(f"unknown part '{part}' (choose {', '.join(X.EXPORT_PARTS)})")
    if precision == "fp16" and not entry.fp16_safe:
        raise UsageError(f"model '{mid}' overflows in fp16 (manifest: fp16_safe: false)",
                         hint="use --precision bf16 or fp32")
    if backend == "torch":
        return TorchRunner(mid, part, precision, device=device, threads=threads)

    def artifact(graph_prec: str) -> tuple[Path, dict]:
        if onnx_path is not None:
            sc = _explicit_artifact(onnx_path, mid, part)
            if sc["graph_precision"] != graph_prec:
                raise UsageError(f"{Path(onnx_path).name} is a {sc['graph_precision']} graph; {backend} "
                                 f"{precision} needs the {graph_prec} export", path=str(onnx_path))
            return Path(onnx_path), sc
        res = X.cached_export(mid, part, graph_prec, opset=opset, include_convention=include_convention)
        return res.onnx_path, res.sidecar

    if backend == "onnxruntime":
        X.require_onnxruntime()  # fail on a missing/broken install before exporting anything
        path, sc = artifact(X.graph_precision(precision))
        return OnnxRuntimeRunner(path, sc, precision, providers=providers, threads=threads,
                                 graph_optimization=graph_optimization)
    if backend == "openvino":
        X.require_openvino()
        path, sc = artifact(X.graph_precision(precision))
        return OpenVINORunner(path, sc, precision, threads=threads)
    # tensorrt
    X.require_tensorrt()
    if engine_path is not None:
        esc = X.read_engine_sidecar(engine_path)
        if esc["model"] != mid or esc["part"] != part:
            raise UsageError(f"engine is the {esc['part']} of '{esc['model']}', not the {part} of '{mid}'",
                             path=str(engine_path))
        return TensorRTRunner(engine_path, esc)
    path, sc = artifact(X.graph_precision(precision))
    prof = X.load_profile(profile or DEFAULT_TRT_PROFILE)
    gpu = torch.cuda.get_device_name(0).replace(" ", "_")
    import tensorrt as trt

    eng = cache_dir() / "tensorrt" / f"{path.stem}.{prof.name}.{precision}.{gpu}.trt{trt.__version__}.engine"
    if eng.is_file():
        try:
            esc = X.read_engine_sidecar(eng)
            if esc.get("onnx_sha256") == sc["onnx_sha256"] and esc.get("profile") == prof.as_dict():
                return TensorRTRunner(eng, esc, profile=prof)
        except ExportError as e:
            log.warning("cached engine is unusable (%s); building it again", e)
    X.build_trt_engine(path, prof, precision, out_path=eng)
    return TensorRTRunner(eng, profile=prof)


def available_backends() -> dict[str, str | None]:
    """Backend -> None if usable here, else the reason (one line, with the install hint)."""
    out: dict[str, str | None] = {"torch": None}
    checks = {"onnxruntime": (X.require_onnx, X.require_onnxruntime),
              "openvino": (X.require_onnx, X.require_openvino), "tensorrt": (X.require_onnx, X.require_tensorrt)}
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
    say ``bf16_safe: false`` (its measured bf16 round trip loses > 0.1 dB), else fp32. On OpenVINO,
    parts whose shipped int8 calibration is marked ``auto`` run int8 (``best_part_precision``)."""
    prec = cpu_float_precision(entry)
    try:
        X.require_onnx()
        X.require_openvino()
        return "openvino", prec
    except BackendUnavailableError:
        return "torch", prec


def best_part_precision(entry, part: str, backend: str, precision: str) -> str:
    """int8 for a part whose manifest entry ships an int8 calibration marked ``auto: true`` (every
    dev photo's round trip within 0.1 dB of fp32) when the backend is OpenVINO, else ``precision``.
    No part qualifies yet: the default encoder's int8 round trip is +0.10 dB on average but moves
    single photos by -0.30 to +0.42 dB (benchmarks/results/int8.md)."""
    spec = entry.part(part)
    if backend == "openvino" and spec.int8_calibration is not None and spec.int8_auto:
        return "int8"
    return precision


def best_cpu_backend(model_id: str, part: str = "decoder", *, threads: int | None = None) -> Runner:
    """Runner for ``best_cpu_choice()``, falling back to torch if OpenVINO cannot take the model."""
    from vaepack.manifest import get_model

    entry = get_model(model_id) if isinstance(model_id, str) else model_id
    name, prec = best_cpu_choice(entry)
    if name == "openvino":
        try:
            return get_backend("openvino", entry.id, part, best_part_precision(entry, part, name, prec),
                               threads=threads)
        except (BackendUnavailableError, ExportError, UsageError) as e:
            log.warning("OpenVINO cannot run %s %s (%s); using torch %s", model_id, part, e, prec)
    return get_backend("torch", model_id, part, prec, device="cpu", threads=threads)


__all__ = [
    "BACKENDS", "BACKEND_PRECISIONS", "OnnxRuntimeRunner", "OpenVINORunner", "Runner", "TensorRTRunner",
    "TorchRunner", "available_backends", "best_cpu_backend", "best_cpu_choice", "best_part_precision", "clear_caches",
    "cpu_float_precision", "cpu_has_native_bf16", "get_backend",
]
