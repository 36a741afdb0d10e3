"""The runners behind one interface, so the CLI never branches per backend.

``runner(x)`` takes and returns the same tensors as ``VAE.encode`` / ``VAE.decode``: float NCHW images
in [0, 1] in and diffusion-space latents out (encoder), or the reverse (decoder, clamped to [0, 1]);
float32 out. Where an ONNX graph leaves the latent convention out, the runner applies it through
vaepack/latents.py (``artifacts.graph_pre`` / ``graph_post``).

- torch: fp32, bf16 (CPU: channels_last + autocast, as in vaepack/vae.py), fp16 on CUDA only.
- onnxruntime: fp32, fp16 (the fp16 graph), int8 (the QDQ graph of vaepack/quantize.py). Providers
  TensorRT > CUDA > CPU where available; threads and graph optimization level exposed; sessions cached
  per artifact for the process.
- openvino: fp32, bf16 (``INFERENCE_PRECISION_HINT`` on the fp32 graph), int8 (the QDQ graph, the
  float ops left in it run fp32: a bf16 hint measured slower, 65.7 vs 62.3 ms, on the default encoder at
  512 px; ``float_hint="bf16"`` for a graph that keeps Convs float, where bf16 measured faster);
  compiled models cached on disk (``CACHE_DIR`` = <cache>/openvino) and per process.
- tensorrt: fp32, fp16, bf16 engines built from the export with a named profile (export/profiles);
  inputs outside the profile are refused before running.
Outputs are on the backend's device: CPU for onnxruntime/openvino, CUDA for tensorrt, the VAE's
device for torch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaepack.backends import artifacts as A
from vaepack.backends import optional as O
from vaepack.backends.profiles import Profile, Range, check_profile_shape
from vaepack.errors import ExportError, UsageError
from vaepack.paths import cache_dir

BACKEND_PRECISIONS = {
    "torch": ("fp32", "bf16", "fp16"),
    "onnxruntime": ("fp32", "fp16", "int8"),
    "openvino": ("fp32", "bf16", "int8"),
    "tensorrt": ("fp32", "fp16", "bf16"),
}
GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")
ORT_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


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
        from vaepack.vae import check_device_dtype, load_torch_vae, pick_device

        if part not in ("encoder", "decoder"):
            raise UsageError(f"the torch backend runs encoder or decoder, not '{part}'")
        dev = pick_device(device)
        check_device_dtype(dev, precision)
        entry = get_model(model_id)
        super().__init__(entry.id, part, precision, in_channels=3 if part == "encoder" else entry.space.channels,
                         latent_input=part == "decoder", factor=entry.space.factor,
                         size_multiple=A.size_multiple(entry, part))
        self.threads = threads
        self.vae = load_torch_vae(entry, parts=(part,), device=str(dev), dtype=precision)

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
        xs = [A.graph_pre(self.sidecar, x.detach().float().cpu())] + [m.detach().float().cpu() for m in more]
        arrays = {n: np.ascontiguousarray(t.numpy()) for n, t in zip(self.input_names, xs)}
        y = torch.from_numpy(self._run(arrays))
        return A.graph_post(self.sidecar, y).contiguous()

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
        ort = O.require_onnxruntime()
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
        ov = O.require_openvino()
        _OV_CORE.append(ov.Core())
    return _OV_CORE[0]


class OpenVINORunner(_GraphRunner):
    backend = "openvino"

    def __init__(self, onnx_path: str | Path, sc: dict, precision: str = "fp32", *, threads: int | None = None,
                 cache: bool = True, float_hint: str = "fp32"):
        """``float_hint``: the inference precision of the float ops an int8 graph keeps (fp32 or bf16).
        fp32 unless the caller knows bf16 is native and the model bf16-safe: an all-int8 graph runs
        faster with it, a graph that keeps Convs float (quantize.calibrate ``keep_float``) slower."""
        ov = O.require_openvino()
        import openvino.properties as props
        import openvino.properties.hint as hints

        if precision not in BACKEND_PRECISIONS["openvino"]:
            raise UsageError(f"openvino runs fp32, bf16 or int8 on CPU, not {precision}")
        want = A.graph_precision(precision)
        if sc["graph_precision"] != want:
            raise UsageError(f"openvino {precision} compiles the {want} export (bf16 is a runtime hint on the fp32 one)",
                             path=str(onnx_path))
        super().__init__(sc, precision)
        self.onnx_path = Path(onnx_path)
        bf16 = precision == "bf16" or (precision == "int8" and float_hint == "bf16")
        key = (str(self.onnx_path.resolve()), sc.get("onnx_sha256"), precision, threads, bf16)
        compiled = _OV_COMPILED.get(key) if cache else None
        if compiled is None:
            cfg: dict = {
                hints.inference_precision: ov.Type.bf16 if bf16 else ov.Type.f32,  # int8: see above
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

    def __init__(self, engine_path: str | Path, esc: dict | None = None, *, profile: Profile | None = None,
                 verify: bool = True):
        trt = O.require_tensorrt()
        self.engine_path = Path(engine_path)
        esc = A.read_engine_sidecar(self.engine_path) if (esc is None or verify) else esc
        first = esc["inputs"][0]["shape"]
        super().__init__(esc["model"], esc["part"], esc["engine_precision"], in_channels=int(first[1]),
                         latent_input=first[2] == "latent_height", factor=int(esc["factor"]),
                         size_multiple=int(esc["size_multiple"]))
        self.sidecar = esc
        p = esc["profile"]
        self.profile = profile or Profile(
            name=p["name"], path=Path(p.get("path", p["name"])), batch=Range(**p["batch"]),
            height=Range(**p["height"]), width=Range(**p["width"]))
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
        check_profile_shape(self.profile, self.sidecar, tuple(x.shape))  # before touching the GPU
        dev = torch.device("cuda")
        xs = [A.graph_pre(self.sidecar, x.detach().float().to(dev))] + [m.detach().float().to(dev) for m in more]
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
        return A.graph_post(self.sidecar, y).contiguous()

    def describe(self) -> str:
        import tensorrt as trt

        return f"tensorrt {trt.__version__} {self.precision} profile {self.profile.name}"

