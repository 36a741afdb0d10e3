"""The engine of ``vaepack bench``: latency, throughput, cost and quality of VAE parts.

``run_bench`` measures one row per (model, precision, backend, part, size, scale, batch[, nfe]);
``run_rd`` measures rate-distortion of stored latents next to JPEG and WebP. Both return a plain
dict (the JSON document; schema in benchmarks/README.md, version ``SCHEMA_VERSION``) that
``validate`` checks, ``to_markdown`` renders and ``plot`` draws. The CLI only parses options.

Measurement choices (why they are what they are):

- Latency is wall time (``time.perf_counter``) of the part's full call (``VAE.encode``/``decode``:
  range conversion, autocast, network), on a random input of the work size, after ``warmup``
  untimed calls; CUDA is synchronized before each clock read. Median and p90 (linear interpolation
  between order statistics) over ``repeat`` calls. Scale remap (resizing) and I/O are not timed:
  the row measures the network at the resolution the remap produces.
- Work size: ``size`` is the side of a square input image; the part runs on
  round(size * scale) rounded up to the model's factor (the padding ``vaepack.pipeline`` adds).
- FLOPs: ``vaepack.flops`` (FLOPs = 2 * MACs of convs/linears/matmuls) on a batch-1 call of the
  same function, per image. Achieved GFLOP/s = flops_per_image * batch / median latency.
- Memory on CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs) over warm-up
  and timed calls, minus the RSS right before warm-up (weights and input already resident, glibc
  free lists trimmed). So it is activations + workspace + one-time kernel caches, not weights
  (those are ``param_mb``). Without clear_refs a thread samples /proc/self/statm every 1 ms
  (``mem_method`` says which); short spikes can then be missed. On CUDA it is
  ``torch.cuda.max_memory_allocated`` above the allocation before warm-up.
- Quality (with ``data_dir``): each image, cropped to a multiple of 8 (top-left), is round-tripped
  by ``vaepack.pipeline`` at the row's scale (bilinear upsample, encode, decode, antialiased
  bilinear downsample) with the model's encoder and the decoder of ``decoder`` (default: the
  model), at the row's precision, torch backend only; PSNR/SSIM/MS-SSIM are per-image means
  (vaepack.metrics). PSNR of identical images is stored as ``metrics.PSNR_CAP_DB`` (100.0).

Backends: ``torch`` is built in (fp32; bf16 = autocast + channels_last, as ``VAE`` does on CPU).
``onnxruntime``/``openvino``/``tensorrt`` go through ``vaepack.runtime.get_backend`` (imported
lazily; ONNX export and compilation happen before timing); ``register_backend`` adds others. An
unavailable backend or precision gives ``skipped`` rows with the reason, never a crash. Ctrl-C returns the rows finished so far with ``interrupted: true``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import inspect
import json
import math
import os
import platform
import re
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from vaepack import __version__
from vaepack import metrics as M
from vaepack.errors import BackendUnavailableError, UsageError, VaepackError

SCHEMA_VERSION = 1
PARTS = ("encoder", "decoder")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # int8: onnxruntime/openvino with an int8 calibration
KNOWN_BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
JPEG_QUALITIES = (10, 20, 30, 50, 70, 90)
WEBP_QUALITIES = (10, 20, 30, 50, 70, 90)
LATENT_FORMATS = ("fp16", "bf16", "q8", "fp16+zlib", "q8+zlib", "q8+zstd")

Progress = Callable[[int, int, dict], None]


class BenchSchemaError(VaepackError):
    """A benchmark result that does not follow the documented schema."""


# =========================================================================== machine info
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The few ISA flags that decide which kernels torch/oneDNN can use."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    have = set(m.group(1).split()) if m else set()
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16",
                        "amx_int8") if f in have]


def _git_commit() -> dict | None:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def _pkg_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device | None = None) -> dict:
    """What the numbers were measured on. The load average is there because a busy machine
    inflates latency; a result with load well above ``threads`` should not be compared."""
    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
               "cuda": torch.version.cuda}
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_model(), "cpu_flags": _cpu_flags(), "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "gpu": gpu, "device": str(device or "cpu"),
        "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "vaepack": __version__, "onnxruntime": _pkg_version("onnxruntime"), "openvino": _pkg_version("openvino"),
        "git": _git_commit(), "loadavg": load,
    }


# =========================================================================== memory
def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        m = re.search(r"VmHWM:\s+(\d+)", f.read())
    return int(m.group(1)) if m else 0


def _trim_heap() -> None:
    """Return freed heap to the OS so the baseline is honest (glibc only; harmless elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the work done inside the ``with`` block, above the level at its start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "none"
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_allocated"
            return self
        if not Path("/proc/self/statm").exists():
            return self
        _trim_heap()
        self._base = _rss_kb()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "rss_hwm"
        except OSError:
            self.method = "rss_sampled"
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss_kb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 1e6
        elif self.method == "rss_hwm":
            self.peak_mb = max(0, _hwm_kb() - self._base) * 1024 / 1e6
        elif self.method == "rss_sampled":
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_kb())
            self.peak_mb = max(0, self._max - self._base) * 1024 / 1e6
        return False


# =========================================================================== backends
@dataclass
class Runner:
    """A timed callable: ``fn(x) -> y`` with torch tensors, plus how to wait for it to finish."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    sync: Callable[[], None] = lambda: None


# name -> factory(vae, part, precision, input_shape, decode_kwargs) -> Runner
_BACKENDS: dict[str, Callable[..., Runner]] = {}


def register_backend(name: str, factory: Callable[..., Runner]) -> None:
    """Add a backend: ``factory(vae, part, precision, input_shape, decode_kwargs) -> Runner``.

    ``vae`` is the fp32 torch ``VAE`` holding ``part`` (the source for an export); the factory
    raises ``BackendUnavailableError`` when the backend cannot run here.
    """
    _BACKENDS[name] = factory


def _torch_runner(vae, part: str, precision: str, input_shape, decode_kwargs) -> Runner:
    if precision == "fp16" and vae.device.type != "cuda":
        # CPU autocast to fp16 exists but runs emulated and slow: not a number worth reporting.
        raise UsageError("torch fp16 runs on CUDA only (use bf16 on CPU)")
    fn = vae.encode if part == "encoder" else (lambda z: vae.decode(z, **decode_kwargs))
    dev = vae.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    return Runner(fn=fn, sync=sync)


def _external_runner(backend: str):
    """onnxruntime / openvino / tensorrt through ``vaepack.runtime.get_backend`` (imported only when
    asked for). The runner exports/compiles on first use, before anything is timed."""

    def factory(vae, part, precision, input_shape, decode_kwargs) -> Runner:
        if decode_kwargs:
            raise UsageError(f"the {backend} backend cannot pass --nfe to a diffusion decoder; use torch")
        try:
            from vaepack import runtime
        except ImportError as e:
            raise BackendUnavailableError(f"backend '{backend}' needs vaepack.runtime ({e})") from None
        r = runtime.get_backend(backend, vae.entry.id, part, precision, device=str(vae.device))
        if backend == "tensorrt":  # outputs live on CUDA; wait for the stream before reading the clock
            return Runner(fn=r, sync=torch.cuda.synchronize)
        return Runner(fn=r)

    return factory


register_backend("torch", _torch_runner)


def _factory(backend: str):
    return _BACKENDS.get(backend) or _external_runner(backend)


# =========================================================================== helpers
def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def work_hw(size: int, scale: float, factor: int) -> tuple[int, int]:
    """Side of the tensor the encoder sees for a size x size image at ``scale`` (padded up)."""
    s = max(1, round(size * scale))
    s = -(-s // factor) * factor
    return s, s


def _split(v) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v)
    return [v]  # a single id, number or VAE object


def _load_images(data_dir, max_images: int | None, crop: int | None = None,
                 multiple: int = 8) -> list[tuple[str, torch.Tensor]]:
    """Images of ``data_dir`` (sorted), each cropped to a multiple of 8: top-left normally, or a
    centered crop of at most ``crop`` x ``crop`` (quick runs; the networks cost O(pixels))."""
    from vaepack.io import center_crop, expand_inputs, load_image

    d = Path(data_dir)
    if not d.is_dir():
        raise UsageError(f"--data must be a folder of images, got {d}")
    paths = expand_inputs([str(d)])
    if max_images:
        paths = paths[:max_images]
    out = []
    for p in paths:
        x = center_crop(load_image(p), crop)
        h, w = x.shape[-2:]
        h, w = h - h % multiple, w - w % multiple
        if h < 16 or w < 16:
            continue  # too small for SSIM's window after the crop
        out.append((p.name, x[:, :h, :w].contiguous()))
    if not out:
        raise UsageError(f"no usable images (at least 16x16) in {d}")
    return out


class _DecodeWith:
    """A VAE whose ``decode`` gets extra keyword arguments (``nfe`` of a diffusion decoder)."""

    def __init__(self, vae, kwargs: dict):
        self._vae, self._kw = vae, kwargs

    def __getattr__(self, name):
        return getattr(self._vae, name)

    def decode(self, z, tiler=None):
        return self._vae.decode(z, tiler, **self._kw)


def _mean_metrics(pairs) -> dict:
    """Per-image metrics averaged over a list of (original, reconstruction)."""
    acc = {"psnr": [], "ssim": [], "ms_ssim": []}
    for a, b in pairs:
        acc["psnr"].append(M.psnr(a, b))
        acc["ssim"].append(M.ssim(a, b))
        acc["ms_ssim"].append(M.ms_ssim(a, b))
    n = len(acc["psnr"])
    return {"psnr": M.json_psnr(sum(acc["psnr"]) / n), "ssim": sum(acc["ssim"]) / n,
            "ms_ssim": sum(acc["ms_ssim"]) / n, "images": n}


class _Models:
    """Loads each (model, part, precision) once. Models may be ids or prebuilt ``VAE`` objects."""

    def __init__(self, device):
        self.device = device
        self.objs: dict[str, Any] = {}
        self.cache: dict[tuple, Any] = {}
        self.failed: dict[tuple, VaepackError] = {}  # so missing weights are looked for only once

    def name(self, m) -> str:
        if isinstance(m, str):
            from vaepack.manifest import get_model

            return get_model(m).id  # UnknownModelError for a typo, before any work starts
        self.objs[m.entry.id] = m
        return m.entry.id

    def has(self, mid: str, part: str) -> bool:
        if mid in self.objs:
            return self.objs[mid].has(part)
        from vaepack.manifest import get_model

        return part in get_model(mid).parts

    def get(self, mid: str, part: str, precision: str):
        key = (mid, part, precision)
        if key in self.failed:
            raise self.failed[key]
        if key not in self.cache:
            try:
                self.cache[key] = self._load(mid, part, precision)
            except VaepackError as e:
                self.failed[key] = e
                raise
        return self.cache[key]

    def _load(self, mid: str, part: str, precision: str):
        if not self.has(mid, part):
            raise UsageError(f"model '{mid}' has no {part}")
        if mid in self.objs:
            from vaepack.vae import check_dtype

            base = self.objs[mid]
            check_dtype(base.entry, precision)
            return dataclasses.replace(base, parts={part: base.parts[part]}, dtype=precision)
        from vaepack.vae import load_vae

        return load_vae(mid, parts=(part,), device=str(self.device), dtype=precision)


# =========================================================================== run_bench
ROW_FIELDS: dict[str, tuple] = {
    # field: (types, nullable)
    "model": ((str,), False), "part": ((str,), False), "network": ((str,), False), "decoder": ((str,), True),
    "backend": ((str,), False), "precision": ((str,), False), "device": ((str,), False),
    "size": ((int,), False), "scale": ((int, float), False), "batch": ((int,), False), "nfe": ((int,), True),
    "input_shape": ((list,), True), "status": ((str,), False), "reason": ((str,), True),
    "runs": ((int,), False), "latency_ms_median": ((int, float), True), "latency_ms_p90": ((int, float), True),
    "latency_ms_min": ((int, float), True), "throughput_img_s": ((int, float), True),
    "params": ((int,), True), "param_mb": ((int, float), True), "param_dtype": ((str,), True),
    "macs_per_image": ((int, float), True), "flops_per_image": ((int, float), True),
    "gflops_per_s": ((int, float), True), "peak_mem_mb": ((int, float), True), "mem_method": ((str,), True),
    "psnr": ((int, float), True), "ssim": ((int, float), True), "ms_ssim": ((int, float), True),
    "quality_images": ((int,), True), "quality_note": ((str,), True),
}
RD_ROW_FIELDS: dict[str, tuple] = {
    "codec": ((str,), False), "variant": ((str,), False), "quality_setting": ((int,), True),
    "model": ((str,), True), "decoder": ((str,), True), "scale": ((int, float), True),
    "bpp": ((int, float), False), "psnr": ((int, float), False), "ssim": ((int, float), False),
    "ms_ssim": ((int, float), False), "images": ((int,), False),
}
STATUSES = ("ok", "skipped", "error")
MACHINE_FIELDS = ("cpu", "logical_cpus", "threads", "device", "python", "torch", "vaepack")


def _empty_row(**kw) -> dict:
    row = {k: None for k in ROW_FIELDS}
    row.update(status="ok", runs=0)
    row.update(kw)
    return row


def _check_args(parts, precisions, scales, sizes, batches, repeat, warmup, nfe, backends):
    for p in parts:
        if p not in PARTS:
            raise UsageError(f"unknown part '{p}' (choose encoder, decoder)")
    for p in precisions:
        if p not in PRECISIONS:
            raise UsageError(f"unknown precision '{p}' (choose {', '.join(PRECISIONS)})")
    for s in scales:
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise UsageError(f"--scales must be positive numbers, got {s!r}")
    for name, vals in (("--sizes", sizes), ("--batch", batches), ("--nfe", nfe)):
        for v in vals:
            if not (isinstance(v, int) and v > 0):
                raise UsageError(f"{name} must be positive integers, got {v!r}")
    if not (isinstance(repeat, int) and repeat >= 1):
        raise UsageError(f"--repeat must be at least 1, got {repeat!r}")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise UsageError(f"warmup must be 0 or more, got {warmup!r}")
    for b in backends:
        if b not in KNOWN_BACKENDS and b not in _BACKENDS:
            raise UsageError(f"unknown backend '{b}' (choose {', '.join(sorted(set(KNOWN_BACKENDS) | set(_BACKENDS)))})")
    for name, vals in (("--parts", parts), ("--precision", precisions), ("--backends", backends)):
        if not vals:
            raise UsageError(f"{name} needs at least one value")


def run_bench(models, parts=("encoder", "decoder"), backends=("torch",), precisions=("fp32",),
              scales=(1.0,), sizes=(256,), batches=(1,), data_dir=None, decoder=None, nfe=None,
              repeat: int = 10, warmup: int = 2, device: str | None = None, threads: int | None = None,
              max_images: int | None = None, crop: int | None = None,
              progress: Progress | None = None) -> dict:
    """Benchmark every combination; returns the result document (see benchmarks/README.md).

    ``models``/``decoder``: manifest ids or prebuilt ``vaepack.vae.VAE`` objects. ``nfe``: list of
    step counts for diffusion decoders (their ``decode`` must take ``nfe=``); with ``nfe`` every
    decoder row is repeated per value, and decoders without it give skipped rows.
    ``progress(done, total, row)`` is called after each row.
    """
    from vaepack.vae import pick_device

    models, parts, backends = _split(models), _split(parts), _split(backends)
    precisions, scales, sizes, batches = _split(precisions), _split(scales), _split(sizes), _split(batches)
    nfes = _split(nfe)
    if not models:
        raise UsageError("--models needs at least one model")
    _check_args(parts, precisions, scales, sizes, batches, repeat, warmup, nfes, backends)
    dev = pick_device(device)
    reg = _Models(dev)
    model_ids = [reg.name(m) for m in models]
    dec_id = reg.name(decoder) if decoder is not None else None
    images = _load_images(data_dir, max_images, crop) if data_dir else None

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    result = {
        "schema_version": SCHEMA_VERSION, "kind": "bench",
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "interrupted": False, "machine": machine_info(dev),
        "config": {"models": model_ids, "parts": parts, "backends": backends, "precisions": precisions,
                   "scales": [float(s) for s in scales], "sizes": sizes, "batches": batches,
                   "data_dir": str(data_dir) if data_dir else None, "decoder": dec_id, "nfe": nfes or None,
                   "repeat": repeat, "warmup": warmup, "max_images": max_images, "crop": crop},
        "rows": [],
    }
    plan = []
    for mid in model_ids:
        for prec in precisions:
            for be in backends:
                for part in parts:
                    for size in sizes:
                        for scale in scales:
                            for batch in batches:
                                for n in (nfes if part == "decoder" and nfes else [None]):
                                    plan.append((mid, prec, be, part, size, scale, batch, n))
    quality_cache: dict[tuple, dict] = {}
    flops_cache: dict[tuple, tuple] = {}
    try:
        for i, (mid, prec, be, part, size, scale, batch, n) in enumerate(plan):
            row = _bench_row(reg, mid, prec, be, part, size, scale, batch, n, dec_id, dev, repeat, warmup,
                             images, quality_cache, flops_cache)
            result["rows"].append(row)
            if progress:
                progress(i + 1, len(plan), row)
    except KeyboardInterrupt:
        result["interrupted"] = True
    finally:
        torch.set_num_threads(old_threads)
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def _bench_row(reg: _Models, mid, prec, be, part, size, scale, batch, n, dec_id, dev, repeat, warmup,
               images, quality_cache, flops_cache) -> dict:
    network = (dec_id or mid) if part == "decoder" else mid
    quality_dec = dec_id or mid
    row = _empty_row(model=mid, part=part, network=network, decoder=quality_dec, backend=be, precision=prec,
                     device=str(dev), size=size, scale=float(scale), batch=batch, nfe=n)
    try:
        if not reg.has(network, part):
            raise UsageError(f"model '{network}' has no {part}")
        if be != "torch" and network in reg.objs:
            raise UsageError(f"'{network}' was passed as a Python object; only the torch backend runs those")
        vae = reg.get(network, part, prec if be == "torch" else "fp32")
        f = vae.factor
        h, w = work_hw(size, scale, f)
        shape = (batch, 3, h, w) if part == "encoder" else (batch, vae.space.channels, h // f, w // f)
        row["input_shape"] = list(shape)
        dkw = {}
        if n is not None:
            if not vae.sampling:  # only a diffusion decoder takes decode(z, nfe=)
                raise UsageError(f"decoder '{network}' takes no --nfe (only diffusion decoders do)")
            dkw = {"nfe": n}
        runner = _factory(be)(vae, part, prec, shape, dkw)
    except VaepackError as e:
        row.update(status="skipped", reason=str(e))
        return row

    from vaepack.flops import count_flops, param_bytes, param_count

    module = vae.parts[part].module
    row["params"] = param_count(module)
    row["param_mb"] = param_bytes(module) / 1e6
    row["param_dtype"] = str(next(module.parameters()).dtype).replace("torch.", "")
    if prec == "int8":  # the graph stores conv weights int8 (1 byte each; norms, biases, scales stay fp32)
        conv_w = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Conv2d))
        row["param_mb"] = (param_bytes(module) - conv_w * (next(module.parameters()).element_size() - 1)) / 1e6
        row["param_dtype"] = "int8 conv weights"
    fkey = (network, part, shape[1:], n)
    if fkey not in flops_cache:
        fvae = reg.get(network, part, "fp32")
        fn = fvae.encode if part == "encoder" else (lambda z: fvae.decode(z, **dkw))
        fc = count_flops(module, (1,) + tuple(shape[1:]), run=fn, dtype=torch.float32, device=dev)
        flops_cache[fkey] = (fc.macs, fc.flops)
    row["macs_per_image"], row["flops_per_image"] = flops_cache[fkey]

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=gen) if part == "encoder" else torch.randn(shape, generator=gen)
    x = x.to(dev)
    times = []
    try:
        with torch.inference_mode(), PeakMemory(dev) as mem:
            for _ in range(warmup):
                runner.fn(x)
                runner.sync()
            for _ in range(repeat):
                t0 = time.perf_counter()
                runner.fn(x)
                runner.sync()
                times.append(time.perf_counter() - t0)
    except (torch.OutOfMemoryError, MemoryError) as e:
        row.update(status="error", reason=f"out of memory: {str(e).splitlines()[0] if str(e) else 'MemoryError'}")
        return row
    except VaepackError as e:
        row.update(status="skipped", reason=str(e))
        return row
    med = _percentile(times, 0.5)
    row.update(runs=len(times), latency_ms_median=med * 1e3, latency_ms_p90=_percentile(times, 0.9) * 1e3,
               latency_ms_min=min(times) * 1e3, throughput_img_s=batch / med,
               gflops_per_s=row["flops_per_image"] * batch / med / 1e9,
               peak_mem_mb=mem.peak_mb, mem_method=mem.method)

    if images is not None:
        qkey = (mid, quality_dec, prec, float(scale), n, be)
        if qkey not in quality_cache:
            quality_cache[qkey] = _quality(reg, mid, quality_dec, prec, scale, n, be, images)
        q = quality_cache[qkey]
        row.update(psnr=q.get("psnr"), ssim=q.get("ssim"), ms_ssim=q.get("ms_ssim"),
                   quality_images=q.get("images"), quality_note=q.get("note"))
    return row


def _quality(reg: _Models, enc_id, dec_id, prec, scale, n, backend, images) -> dict:
    if backend != "torch":
        return {"note": "quality is measured with the torch backend only"}
    if not reg.has(enc_id, "encoder"):
        return {"note": f"model '{enc_id}' has no encoder to round-trip with"}
    if not reg.has(dec_id, "decoder"):
        return {"note": f"model '{dec_id}' has no decoder to round-trip with (pass --decoder)"}
    from vaepack import pipeline as P

    try:
        enc, dec = reg.get(enc_id, "encoder", prec), reg.get(dec_id, "decoder", prec)
        if n is not None:
            dec = _DecodeWith(dec, {"nfe": n})
        pairs = []
        with torch.inference_mode():
            for _, x in images:
                y, _ = P.roundtrip_tensor(enc, dec, x, scale=float(scale), filter="bilinear")
                pairs.append((x, y.cpu()))
    except VaepackError as e:
        return {"note": str(e)}
    return _mean_metrics(pairs)


# =========================================================================== run_rd
def _q8(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel affine 8-bit quantization; returns (dequantized float, uint8 codes).

    The side info a file needs is an fp16 minimum and an fp16 step per channel (32 bits per
    channel); min/step are rounded through fp16 here so the dequantized values are the stored ones.
    """
    zc = z.float()
    lo = zc.amin(dim=(-2, -1), keepdim=True).half().float()
    hi = zc.amax(dim=(-2, -1), keepdim=True)
    step = ((hi - lo) / 255).clamp_min(1e-8).half().float()
    q = ((zc - lo) / step).round().clamp(0, 255)
    return q * step + lo, q.to(torch.uint8)


def _compress(data: bytes, method: str) -> bytes:
    if method == "zlib":
        return zlib.compress(data, 9)
    import zstandard  # optional; checked before use

    return zstandard.ZstdCompressor(level=19).compress(data)


def _latent_variant(z: torch.Tensor, fmt: str) -> tuple[torch.Tensor, int]:
    """(dequantized latent, stored bits) for one latent format."""
    base, _, packer = fmt.partition("+")
    c = z.shape[1]
    if base == "fp16":
        zq = z.half()
        payload = zq.numpy().tobytes()
        out = zq.float()
        side = 0
    elif base == "bf16":
        zq = z.bfloat16()
        payload = zq.view(torch.int16).numpy().tobytes()
        out = zq.float()
        side = 0
    elif base == "q8":
        out, q = _q8(z)
        payload = q.numpy().tobytes()
        side = 32 * c
    else:
        raise UsageError(f"unknown latent format '{fmt}' (choose {', '.join(LATENT_FORMATS)})")
    nbytes = len(_compress(payload, packer)) if packer else len(payload)
    return out, nbytes * 8 + side


def _pil_codec(x: torch.Tensor, fmt: str, quality: int) -> tuple[torch.Tensor, int]:
    import io as _io

    from PIL import Image

    from vaepack.io import pil_to_tensor, tensor_to_pil

    buf = _io.BytesIO()
    tensor_to_pil(x).save(buf, format=fmt, quality=quality)
    nbits = len(buf.getvalue()) * 8
    buf.seek(0)
    return pil_to_tensor(Image.open(buf)), nbits


def run_rd(models, data_dir, scales=(1.0,), formats=None, jpeg_qualities=JPEG_QUALITIES,
           webp_qualities=WEBP_QUALITIES, decoder=None, precision: str = "fp32", device: str | None = None,
           max_images: int | None = None, crop: int | None = None, progress: Progress | None = None) -> dict:
    """Rate-distortion: bits per pixel of stored latents vs PSNR/SSIM/MS-SSIM, next to JPEG/WebP.

    ``models``: one id/``VAE`` or a list; each is encoded with its own encoder and decoded with
    ``decoder`` (default: itself). JPEG/WebP rows are measured once, on the same images.
    bpp = stored bits / (H*W of the original image), averaged over images. Latent formats: fp16,
    bf16, q8 (per-channel affine uint8 + fp16 min/step per channel), each optionally packed with
    zlib (level 9) or zstd (level 19, only if ``zstandard`` is installed). JPEG/WebP: Pillow at
    the given qualities (JPEG with Pillow's default 4:2:0 subsampling).
    """
    from vaepack import pipeline as P
    from vaepack.vae import pick_device

    if formats is None:
        formats = [f for f in LATENT_FORMATS if not f.endswith("zstd") or _pkg_version("zstandard")]
    formats = _split(formats)
    for f in formats:
        if f.partition("+")[0] not in ("fp16", "bf16", "q8") or f.partition("+")[2] not in ("", "zlib", "zstd"):
            raise UsageError(f"unknown latent format '{f}' (choose {', '.join(LATENT_FORMATS)})")
        if f.endswith("+zstd") and not _pkg_version("zstandard"):
            raise BackendUnavailableError("latent format '+zstd' needs the zstandard package (pip install zstandard)")
    scales = _split(scales)
    _check_args(["encoder"], [precision], scales, [], [], 1, 0, [], ["torch"])
    dev = pick_device(device)
    reg = _Models(dev)
    mids = [reg.name(m) for m in _split(models)]
    if not mids:
        raise UsageError("--models needs at least one model")
    dec_id = reg.name(decoder) if decoder is not None else None
    for mid in mids:  # refuse before any work rather than after the JPEG rows
        if not reg.has(mid, "encoder"):
            raise UsageError(f"model '{mid}' has no encoder; rate-distortion needs one")
        if not reg.has(dec_id or mid, "decoder"):
            raise UsageError(f"model '{dec_id or mid}' has no decoder", hint="pass --decoder")
    images = _load_images(data_dir, max_images, crop)
    result = {
        "schema_version": SCHEMA_VERSION, "kind": "rd",
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "interrupted": False, "machine": machine_info(dev),
        "config": {"models": mids, "decoder": dec_id, "precision": precision, "scales": [float(s) for s in scales],
                   "formats": formats, "jpeg_qualities": list(jpeg_qualities), "webp_qualities": list(webp_qualities),
                   "data_dir": str(data_dir), "max_images": max_images, "crop": crop},
        "rows": [],
    }
    jobs = [("latent", f, None, s, mid) for mid in mids for s in scales for f in formats]
    jobs += [("jpeg", f"q{q}", q, None, None) for q in jpeg_qualities]
    jobs += [("webp", f"q{q}", q, None, None) for q in webp_qualities]
    try:
        # Encode once per (model, scale); every latent format re-decodes the same latents.
        recs: dict[tuple, list] = {}
        for i, (codec, variant, q, s, mid) in enumerate(jobs):
            pairs, bpps = [], []
            did = dec_id or mid
            with torch.inference_mode():
                if codec == "latent" and (mid, s) not in recs:
                    enc = reg.get(mid, "encoder", precision)
                    recs[(mid, s)] = [P.encode_tensor(enc, im, scale=float(s)) for _, im in images]
                for k, (_, x) in enumerate(images):
                    npx = x.shape[-2] * x.shape[-1]
                    if codec == "latent":
                        rec = recs[(mid, s)][k]
                        zq, bits = _latent_variant(rec.latent, variant)
                        dec = reg.get(did, "decoder", precision)
                        y = P.decode_record(dec, dataclasses.replace(rec, latent=zq))
                    else:
                        y, bits = _pil_codec(x, "JPEG" if codec == "jpeg" else "WEBP", q)
                    pairs.append((x, y.cpu()))
                    bpps.append(bits / npx)
            m = _mean_metrics(pairs)
            row = {"codec": codec, "variant": variant, "quality_setting": q,
                   "model": mid if codec == "latent" else None, "decoder": did if codec == "latent" else None,
                   "scale": float(s) if s is not None else None, "bpp": sum(bpps) / len(bpps),
                   "psnr": m["psnr"], "ssim": m["ssim"], "ms_ssim": m["ms_ssim"], "images": m["images"]}
            result["rows"].append(row)
            if progress:
                progress(i + 1, len(jobs), row)
    except KeyboardInterrupt:
        result["interrupted"] = True
    return result


# =========================================================================== validate / save
def _type_ok(v, types) -> bool:
    if isinstance(v, bool):
        return bool in types
    return isinstance(v, types)


def validate(result) -> None:
    """Raise ``BenchSchemaError`` (one line) if ``result`` does not follow the documented schema."""

    def bad(msg):
        raise BenchSchemaError(f"invalid benchmark result: {msg}")

    if not isinstance(result, dict):
        bad(f"expected an object, got {type(result).__name__}")
    for key, types in (("schema_version", (int,)), ("kind", (str,)), ("created_utc", (str,)),
                       ("interrupted", (bool,)), ("machine", (dict,)), ("config", (dict,)), ("rows", (list,))):
        if key not in result:
            bad(f"missing '{key}'")
        if not _type_ok(result[key], types):
            bad(f"'{key}' should be {types[0].__name__}, got {type(result[key]).__name__}")
    if result["schema_version"] != SCHEMA_VERSION:
        bad(f"schema_version {result['schema_version']} (this vaepack reads {SCHEMA_VERSION})")
    if result["kind"] not in ("bench", "rd"):
        bad(f"kind must be 'bench' or 'rd', got {result['kind']!r}")
    for key in MACHINE_FIELDS:
        if key not in result["machine"]:
            bad(f"machine.{key} missing")
    fields = ROW_FIELDS if result["kind"] == "bench" else RD_ROW_FIELDS
    for i, row in enumerate(result["rows"]):
        if not isinstance(row, dict):
            bad(f"rows[{i}] is not an object")
        for key, (types, nullable) in fields.items():
            if key not in row:
                bad(f"rows[{i}].{key} missing")
            v = row[key]
            if v is None:
                if not nullable:
                    bad(f"rows[{i}].{key} is null")
                continue
            if not _type_ok(v, types):
                bad(f"rows[{i}].{key} should be {types[0].__name__}, got {type(v).__name__}")
            if isinstance(v, float) and not math.isfinite(v):
                bad(f"rows[{i}].{key} is not finite ({v}); PSNR of identical images is stored as {M.PSNR_CAP_DB}")
        if result["kind"] == "bench":
            if row["status"] not in STATUSES:
                bad(f"rows[{i}].status must be one of {', '.join(STATUSES)}, got {row['status']!r}")
            if row["status"] == "ok":
                for key in ("latency_ms_median", "latency_ms_p90", "throughput_img_s", "params", "flops_per_image"):
                    if row[key] is None:
                        bad(f"rows[{i}].{key} is null in an 'ok' row")
            elif not row["reason"]:
                bad(f"rows[{i}] is '{row['status']}' without a reason")


def to_json(result: dict) -> str:
    validate(result)
    return json.dumps(result, indent=1, allow_nan=False) + "\n"


def save(result: dict, path) -> None:
    """Validate and write ``result`` as JSON, atomically."""
    from vaepack.io import atomic_output

    text = to_json(result)
    with atomic_output(Path(path)) as tmp:
        Path(tmp).write_text(text)


def load(path) -> dict:
    """Read and validate a result file."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BenchSchemaError(f"cannot read benchmark result ({e})", path=str(path)) from None
    validate(result)
    return result


# =========================================================================== markdown / plot
def _fmt(v, nd=2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def to_markdown(result: dict) -> str:
    """A Markdown report: machine line, then one table row per result row."""
    m = result["machine"]
    git = m.get("git") or {}
    head = (f"<!-- vaepack bench schema {result['schema_version']} -->\n"
            f"**{result['kind']}** {result['created_utc']} - {m['cpu']}, {m['threads']} threads"
            f"{', GPU ' + m['gpu']['name'] if m.get('gpu') else ''} - torch {m['torch']}, vaepack {m['vaepack']}"
            f"{', commit ' + git['commit'][:10] + (' (dirty)' if git.get('dirty') else '') if git else ''}"
            f"{', load ' + ' '.join(f'{x:.1f}' for x in m['loadavg']) if m.get('loadavg') else ''}"
            f"{'  **INTERRUPTED (partial)**' if result['interrupted'] else ''}\n\n")
    if result["kind"] == "rd":
        cols = ["codec", "model", "variant", "scale", "bpp", "PSNR", "SSIM", "MS-SSIM", "images"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in result["rows"]:
            who = "-" if r["codec"] != "latent" else (
                r["model"] if r.get("decoder") in (None, r["model"]) else f"{r['model']}>{r['decoder']}")
            lines.append("| " + " | ".join([r["codec"], who, r["variant"], _fmt(r["scale"]), _fmt(r["bpp"], 3),
                                            _fmt(r["psnr"]), _fmt(r["ssim"], 4), _fmt(r["ms_ssim"], 4),
                                            str(r["images"])]) + " |")
        return head + "\n".join(lines) + "\n"
    cols = ["model", "part", "backend", "prec", "size", "scale", "batch", "nfe", "median ms", "p90 ms", "img/s",
            "params (M)", "MB", "GFLOP/img", "GFLOP/s", "peak MB", "PSNR", "SSIM", "MS-SSIM", "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        name = r["network"] if r["network"] == r["model"] else f"{r['model']}>{r['network']}"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
        lines.append("| " + " | ".join([
            name, r["part"], r["backend"], r["precision"], str(r["size"]), f"{r['scale']:g}", str(r["batch"]),
            _fmt(r["nfe"]), _fmt(r["latency_ms_median"]), _fmt(r["latency_ms_p90"]), _fmt(r["throughput_img_s"]),
            _fmt(r["params"] / 1e6 if r["params"] is not None else None, 3), _fmt(r["param_mb"]),
            _fmt(r["flops_per_image"] / 1e9 if r["flops_per_image"] is not None else None),
            _fmt(r["gflops_per_s"], 1), _fmt(r["peak_mem_mb"], 1), _fmt(r["psnr"]), _fmt(r["ssim"], 4),
            _fmt(r["ms_ssim"], 4), status.replace("|", "/")]) + " |")
    return head + "\n".join(lines) + "\n"


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot(result: dict, path) -> None:
    """Draw a PNG with Pillow (no plotting dependency): throughput bars for a bench result,
    PSNR-vs-bpp curves for an rd result."""
    if result["kind"] == "rd":
        series: dict[str, list[tuple[float, float]]] = {}
        for r in result["rows"]:
            key = r["codec"] if r["codec"] != "latent" else f"{r['model']} {r['variant']}"
            series.setdefault(key, []).append((r["bpp"], r["psnr"]))
        img = _line_chart(series, "bits per pixel", "PSNR (dB)", "rate-distortion (mean over images)")
    else:
        ok = [r for r in result["rows"] if r["status"] == "ok"]
        if not ok:
            raise UsageError("nothing to plot: no row finished")
        labels = [f"{r['network']} {r['part'][:3]} {r['backend']} {r['precision']} {r['size']}px x{r['scale']:g} "
                  f"b{r['batch']}" + (f" nfe{r['nfe']}" if r["nfe"] else "") for r in ok]
        img = _bar_chart(labels, [r["throughput_img_s"] for r in ok], "throughput (images/s)")
    from vaepack.io import atomic_output

    with atomic_output(Path(path)) as tmp:
        img.save(tmp, format="PNG")


def _bar_chart(labels: list[str], values: list[float], title: str):
    from PIL import Image, ImageDraw

    row_h, left, right, top = 18, 8 + 6 * max(len(s) for s in labels), 90, 30
    width = left + 420 + right
    img = Image.new("RGB", (width, top + row_h * len(labels) + 10), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 8), title, fill="black")
    vmax = max(values) or 1.0
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = top + i * row_h
        d.text((8, y + 3), lab, fill="black")
        d.rectangle([left, y + 2, left + int(420 * v / vmax), y + row_h - 3], fill=_PALETTE[i % len(_PALETTE)])
        d.text((left + int(420 * v / vmax) + 4, y + 3), f"{v:.3g}", fill="black")
    return img


def _line_chart(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str):
    from PIL import Image, ImageDraw

    w, h, l, r, t, b = 760, 480, 60, 200, 44, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    x0, x1 = 0.0, max(p[0] for p in pts) * 1.05 or 1.0
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    y0, y1 = math.floor(y0 - 0.5), math.ceil(y1 + 0.5)

    def xy(p):
        return (l + (p[0] - x0) / (x1 - x0) * (w - l - r), h - b - (p[1] - y0) / (y1 - y0) * (h - t - b))

    d.rectangle([l, t, w - r, h - b], outline="black")
    for k in range(6):
        xv, yv = x0 + (x1 - x0) * k / 5, y0 + (y1 - y0) * k / 5
        px, py = xy((xv, yv))
        d.text((px - 10, h - b + 4), f"{xv:.2g}", fill="black")
        d.text((4, py - 6), f"{yv:.1f}", fill="black")
    d.text((l, 6), title, fill="black")
    d.text(((w - r) // 2, h - 16), xlabel, fill="black")
    d.text((4, t - 14), ylabel, fill="black")
    for i, (name, s) in enumerate(series.items()):
        col = _PALETTE[i % len(_PALETTE)]
        s = sorted(s)
        if len(s) > 1:
            d.line([xy(p) for p in s], fill=col, width=2)
        for p in s:
            cx, cy = xy(p)
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=col)
        d.text((w - r + 10, t + 16 * i), name, fill=col)
    return img


# =========================================================================== suites
SUITE_KEYS = {"name", "description", "kind", "pending", "params"}


def suites_dir() -> Path:
    """Named suites live in the repository (benchmarks/suites), beside the package."""
    return Path(__file__).resolve().parent.parent / "benchmarks" / "suites"


def list_suites() -> list[str]:
    d = suites_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_suite(name_or_path: str) -> dict:
    """Read a suite: a YAML file path, or a name in benchmarks/suites/.

    Returns ``{"name", "description", "kind": "bench"|"rd", "pending": str|None, "params": {...}}``
    where ``params`` are keyword arguments of ``run_bench`` (or ``run_rd``). A ``pending`` suite
    references something not built yet and should not be run.
    """
    import yaml

    p = Path(name_or_path)
    if not (p.suffix in (".yaml", ".yml") and p.is_file()):
        p = suites_dir() / f"{name_or_path}.yaml"
    if not p.is_file():
        avail = ", ".join(list_suites()) or "none"
        raise UsageError(f"unknown benchmark suite '{name_or_path}' (available: {avail})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"suite is not valid YAML ({str(e).splitlines()[0]})", path=str(p)) from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise UsageError("suite needs a 'params' mapping", path=str(p))
    extra = set(data) - SUITE_KEYS
    if extra:
        raise UsageError(f"unknown suite keys: {', '.join(sorted(extra))}", path=str(p))
    kind = data.get("kind", "bench")
    fn = run_bench if kind == "bench" else run_rd if kind == "rd" else None
    if fn is None:
        raise UsageError(f"suite kind must be 'bench' or 'rd', got {kind!r}", path=str(p))
    allowed = set(inspect.signature(fn).parameters) - {"progress"}
    bad = set(data["params"]) - allowed
    if bad:
        raise UsageError(f"suite params not accepted by {fn.__name__}: {', '.join(sorted(bad))}", path=str(p))
    return {"name": data.get("name", p.stem), "description": data.get("description", ""), "kind": kind,
            "pending": data.get("pending") or None, "params": data["params"], "path": str(p)}


def run_suite(name_or_path: str, progress: Progress | None = None, **overrides) -> dict:
    """Load and run a suite; keyword overrides replace suite params (e.g. repeat=3, crop=256), and an
    override of None removes the suite's value (e.g. nfe=None to time a deterministic decoder)."""
    s = load_suite(name_or_path)
    if s["pending"]:
        raise UsageError(f"suite '{s['name']}' is pending: {s['pending']}")
    params = {k: v for k, v in {**s["params"], **overrides}.items() if v is not None}
    res = (run_bench if s["kind"] == "bench" else run_rd)(progress=progress, **params)
    res["config"]["suite"] = s["name"]
    return res
