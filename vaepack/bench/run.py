"""``run_bench``: one timed row per (model, precision, backend, part, size, scale, batch[, nfe]).

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
- Memory: ``machine.PeakMemory`` over warm-up and timed calls, minus the level right before
  warm-up (weights and input already resident): activations + workspace + one-time kernel caches,
  not weights (those are ``param_mb``). ``mem_method`` says how it was measured.
- Quality (with ``data_dir``): each image, cropped to a multiple of 8 (top-left), is round-tripped
  by ``vaepack.pipeline`` at the row's scale (bilinear upsample, encode, decode, antialiased
  bilinear downsample) with the model's encoder and the decoder of ``decoder`` (default: the
  model), at the row's precision, torch backend only; PSNR/SSIM/MS-SSIM (vaepack.metrics) and the
  perceptual indices HaarPSI/GMSD (vaepack.perceptual) are per-image means. PSNR of identical
  images is stored as ``metrics.PSNR_CAP_DB`` (100.0).

Backends: ``torch`` is built in (fp32; bf16 = autocast + channels_last, as ``VAE`` does on CPU).
``onnxruntime``/``openvino``/``tensorrt`` go through ``vaepack.runtime.get_backend`` (imported
lazily; ONNX export and compilation happen before timing); ``register_backend`` adds others. An
unavailable backend or precision gives ``skipped`` rows with the reason, never a crash. Ctrl-C
returns the rows finished so far with ``interrupted: true``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from vaepack.bench.inputs import ModelCache, Progress, as_list, load_images, mean_metrics
from vaepack.bench.machine import PeakMemory, load_average, machine_info
from vaepack.bench.schema import empty_row, new_result
from vaepack.errors import BackendUnavailableError, UsageError, VaepackError
from vaepack.vae import check_device_dtype

PARTS = ("encoder", "decoder")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # int8: onnxruntime/openvino with an int8 calibration
KNOWN_BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")


# =========================================================================== backends
@dataclass
class TimedCall:
    """What a benchmark row times: ``fn(x) -> y`` with torch tensors, plus how to wait for it to
    finish (a CUDA synchronize) before the clock is read. Not a ``vaepack.runtime.Runner``: one
    is wrapped by a ``TimedCall`` for the external backends."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    sync: Callable[[], None] = lambda: None


# name -> factory(vae, part, precision, input_shape, decode_kwargs) -> TimedCall
_BACKENDS: dict[str, Callable[..., TimedCall]] = {}


@dataclass
class Timing:
    """Wall times (seconds) of the timed calls, and the memory probe that watched them."""

    times: list[float]
    mem: PeakMemory

    @property
    def median_ms(self) -> float:
        return _percentile(self.times, 0.5) * 1e3

    @property
    def p90_ms(self) -> float:
        return _percentile(self.times, 0.9) * 1e3


def time_call(call: TimedCall, x: torch.Tensor, warmup: int, repeat: int, device) -> Timing:
    """The one timing loop (``run_bench`` rows, ``vaepack tune``): ``warmup`` untimed calls, then
    ``repeat`` timed ones, each clock read after ``call.sync()``, under inference mode and
    ``machine.PeakMemory``. Errors (out of memory, a backend refusing) propagate to the caller."""
    times = []
    with torch.inference_mode(), PeakMemory(device) as mem:
        for _ in range(warmup):
            call.fn(x)
            call.sync()
        for _ in range(repeat):
            t0 = time.perf_counter()
            call.fn(x)
            call.sync()
            times.append(time.perf_counter() - t0)
    return Timing(times, mem)


def register_backend(name: str, factory: Callable[..., TimedCall]) -> None:
    """Add a backend: ``factory(vae, part, precision, input_shape, decode_kwargs) -> TimedCall``.

    ``vae`` is the fp32 torch ``VAE`` holding ``part`` (the source for an export); the factory
    raises ``BackendUnavailableError`` when the backend cannot run here.
    """
    _BACKENDS[name] = factory


def _torch_call(vae, part: str, precision: str, input_shape, decode_kwargs) -> TimedCall:
    check_device_dtype(vae.device, precision)  # CPU fp16 is emulated and slow: not a number worth reporting
    fn = vae.encode if part == "encoder" else (lambda z: vae.decode(z, **decode_kwargs))
    dev = vae.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    return TimedCall(fn=fn, sync=sync)


def _external_call(backend: str):
    """onnxruntime / openvino / tensorrt through ``vaepack.runtime.get_backend`` (imported only when
    asked for). The runner exports/compiles on first use, before anything is timed."""

    def factory(vae, part, precision, input_shape, decode_kwargs) -> TimedCall:
        if decode_kwargs:
            raise UsageError(f"the {backend} backend cannot pass --nfe to a diffusion decoder; use torch")
        try:
            from vaepack import runtime
        except ImportError as e:
            raise BackendUnavailableError(f"backend '{backend}' needs vaepack.runtime ({e})") from None
        r = runtime.get_backend(backend, vae.entry.id, part, precision, device=str(vae.device))
        if backend == "tensorrt":  # outputs live on CUDA; wait for the stream before reading the clock
            return TimedCall(fn=r, sync=torch.cuda.synchronize)
        return TimedCall(fn=r)

    return factory


register_backend("torch", _torch_call)


def _factory(backend: str):
    return _BACKENDS.get(backend) or _external_call(backend)


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


class _DecodeWith:
    """A VAE whose ``decode`` gets extra keyword arguments (``nfe`` of a diffusion decoder)."""

    def __init__(self, vae, kwargs: dict):
        self._vae, self._kw = vae, kwargs

    def __getattr__(self, name):
        return getattr(self._vae, name)

    def decode(self, z, tiler=None):
        return self._vae.decode(z, tiler, **self._kw)


def check_args(parts, precisions, scales, sizes, batches, repeat, warmup, nfe, backends) -> None:
    """Refuse bad option values (UsageError naming the option) before any work starts."""
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


# =========================================================================== run_bench
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

    models, parts, backends = as_list(models), as_list(parts), as_list(backends)
    precisions, scales, sizes, batches = as_list(precisions), as_list(scales), as_list(sizes), as_list(batches)
    nfes = as_list(nfe)
    if not models:
        raise UsageError("--models needs at least one model")
    check_args(parts, precisions, scales, sizes, batches, repeat, warmup, nfes, backends)
    dev = pick_device(device)
    reg = ModelCache(dev)
    model_ids = [reg.name(m) for m in models]
    dec_id = reg.name(decoder) if decoder is not None else None
    images = load_images(data_dir, max_images, crop) if data_dir else None

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    result = new_result("bench", machine_info(dev), {
        "models": model_ids, "parts": parts, "backends": backends, "precisions": precisions,
        "scales": [float(s) for s in scales], "sizes": sizes, "batches": batches,
        "data_dir": str(data_dir) if data_dir else None, "decoder": dec_id, "nfe": nfes or None,
        "repeat": repeat, "warmup": warmup, "max_images": max_images, "crop": crop})
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
    result["machine"]["loadavg_end"] = load_average()
    return result


def _bench_row(reg: ModelCache, mid, prec, be, part, size, scale, batch, n, dec_id, dev, repeat, warmup,
               images, quality_cache, flops_cache) -> dict:
    network = (dec_id or mid) if part == "decoder" else mid
    quality_dec = dec_id or mid
    row = empty_row(model=mid, part=part, network=network, decoder=quality_dec, backend=be, precision=prec,
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
        call = _factory(be)(vae, part, prec, shape, dkw)
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
    try:
        timing = time_call(call, x, warmup, repeat, dev)
    except (torch.OutOfMemoryError, MemoryError) as e:
        row.update(status="error", reason=f"out of memory: {str(e).splitlines()[0] if str(e) else 'MemoryError'}")
        return row
    except VaepackError as e:
        row.update(status="skipped", reason=str(e))
        return row
    times, mem = timing.times, timing.mem
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
        row.update(psnr=q.get("psnr"), ssim=q.get("ssim"), ms_ssim=q.get("ms_ssim"), haarpsi=q.get("haarpsi"),
                   gmsd=q.get("gmsd"), quality_images=q.get("images"), quality_note=q.get("note"))
    return row


def _quality(reg: ModelCache, enc_id, dec_id, prec, scale, n, backend, images) -> dict:
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
    return mean_metrics(pairs)
