"""``vaepack tune``: the fastest configuration that meets a quality target on the user's images.

Candidates are every (model/decoder pair incl. a diffusion decoder's NFE, remap scale, backend,
precision) asked for. Each is measured on this machine:

- **Latency**: the round trip of one random ``size`` x ``size`` image through ``vaepack.pipeline``
  (upsample, pad, encode, decode, downsample: what ``roundtrip`` runs; ``part="encoder"`` times
  ``encode_tensor`` alone, for latent caching), with the bench timing loop
  (``vaepack.bench.run.time_call``), median of ``repeat`` calls (see 1. below). Never tiled.
- **Quality**: the same round trip of every given image at its own size; PSNR, SSIM (images of at
  least 11x11 px), HaarPSI and GMSD (vaepack.perceptual), each the mean over the images.

Search, bounded by ``budget_minutes`` (checked between steps and between images; Ctrl-C keeps the
finished points, like ``vaepack bench``):

1. Latency of every candidate, in ``repeat`` round-robin rounds of one timed call each (the first
   after ``warmup`` untimed calls), so a load change on a shared machine hits every candidate alike
   instead of whichever was being timed; the median over the rounds counts. Cheapest
   configurations first, and within a group (defined next) the usually fastest backend first:
   OpenVINO, onnxruntime, torch.
2. Pruning: candidates that share model, decoder, NFE, scale and precision (a group) differ only in
   backend, and backends at one precision differ in quality only by kernel rounding (fp32 backends
   agree to under 0.01 dB: TAEF2 1x on the dev set 29.595373 dB OpenVINO vs 29.595380 torch,
   benchmarks/results/tune.md; bf16 at 1.5x: torch 29.375 dB vs OpenVINO 29.383 dB, manifest), so
   all but the fastest of a group are dominated (as good, slower) and their quality is never
   measured. Early: a candidate whose first timed call already takes ``CUTOFF`` x the first call
   of its group's fastest so far leaves the later rounds. With ``max_ms`` the candidates over it
   cannot be chosen and are measured last.
3. Quality of the rest in order of latency, so the cheapest point that meets a target is found
   before the budget runs out; slower points then fill in the frontier.

The Pareto frontier (no other point as fast and at least as good) is over latency and the target's
metric (PSNR unless ``target_ssim``). The recommendation is the cheapest point meeting
``target_psnr``/``target_ssim`` (within ``max_ms`` if also given), else with ``max_ms`` alone the
best quality within it; None with the reason when nothing qualifies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from vaepack.errors import UsageError, VaepackError

PARTS = ("roundtrip", "encoder")
DEFAULT_MODELS = ("default", "taef2")
DEFAULT_SCALES = (1.0, 1.25, 1.5, 2.0)
CPU_BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISION_COST = {"int8": 0, "bf16": 1, "fp16": 1, "fp32": 2}  # measuring order: likely cheapest first
BACKEND_COST = {"tensorrt": 0, "openvino": 1, "onnxruntime": 2, "torch": 3}  # ditto (measured: CPU tables)
CUTOFF = 1.5  # a first call this much slower than its group's best first call is no noise-level tie

Progress = Callable[[str, "Point", int, int], None]  # (phase, point, done, total)

__all__ = ["Candidate", "Point", "TuneConfig", "Latency", "parse_spec", "plan", "run_tune", "frontier", "recommend",
           "VaeMeasurer", "Measurer", "preset_of", "frontier_markdown", "plot_frontier"]


# --------------------------------------------------------------------------- candidates and points
@dataclass(frozen=True)
class Candidate:
    model: str  # manifest id of the encoder's model
    decoder: str  # manifest id of the decoder's model (the model itself unless paired)
    nfe: int | None  # sampling steps of a diffusion decoder
    scale: float
    backend: str
    precision: str  # fp32, bf16 (fp16 on CUDA), int8 (parts with a calibration; the others float)

    @property
    def pair(self) -> str:
        """``model[:decoder][@nfe]``, the ``--models`` spelling."""
        return self.model + (f":{self.decoder}" if self.decoder != self.model else "") + \
            (f"@{self.nfe}" if self.nfe is not None else "")

    @property
    def group(self) -> tuple:
        """Candidates of one group differ only in backend (see step 2 of the module docstring)."""
        return self.model, self.decoder, self.nfe, self.scale, self.precision

    @property
    def label(self) -> str:
        return f"{self.pair} x{self.scale:g} {self.backend} {self.precision}"


@dataclass
class Point:
    cand: Candidate
    status: str = "planned"  # ok | skipped | pruned | unmeasured | planned
    reason: str | None = None
    latency_ms: float | None = None
    latency_ms_p90: float | None = None
    runs: int = 0  # timed calls (1 when the early cutoff stopped it, fewer when the budget did)
    quality: dict[str, float] = field(default_factory=dict)  # psnr, ssim, haarpsi, gmsd: means over images
    images: int = 0
    encoder: dict | None = None  # {"backend", "precision"} that ran each part
    decoder_runtime: dict | None = None
    frontier: bool = False

    def as_dict(self) -> dict:
        c = self.cand
        return {"model": c.model, "decoder": c.decoder, "nfe": c.nfe, "scale": c.scale, "backend": c.backend,
                "precision": c.precision, "status": self.status, "reason": self.reason,
                "latency_ms": self.latency_ms, "latency_ms_p90": self.latency_ms_p90,
                "runs": self.runs,
                **{k: self.quality.get(k) for k in ("psnr", "ssim", "haarpsi", "gmsd")}, "images": self.images,
                "encoder": self.encoder, "decoder_runtime": self.decoder_runtime, "frontier": self.frontier}


@dataclass
class TuneConfig:
    images: list[str]
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))  # MODEL[:DECODER][@NFE]
    scales: list[float] = field(default_factory=lambda: list(DEFAULT_SCALES))
    backends: list[str] | None = None  # None: the installed CPU backends (torch on CUDA)
    precisions: list[str] | None = None  # None: fp32, bf16 where native, int8 where calibrated
    size: int = 512
    part: str = "roundtrip"
    target_psnr: float | None = None
    target_ssim: float | None = None
    max_ms: float | None = None
    budget_minutes: float = 10.0
    warmup: int = 1
    repeat: int = 3
    device: str | None = None

    @property
    def metric(self) -> str:
        return "ssim" if self.target_ssim is not None else "psnr"

    def check(self) -> None:
        if self.part not in PARTS:
            raise UsageError(f"unknown --part '{self.part}' (choose {', '.join(PARTS)})")
        if self.target_psnr is not None and self.target_ssim is not None:
            raise UsageError("give one quality target: --target-psnr or --target-ssim")
        for name, v in (("--target-psnr", self.target_psnr), ("--target-ssim", self.target_ssim),
                        ("--max-ms", self.max_ms)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise UsageError(f"{name} must be a positive number, got {v}")
        if not self.models or not self.scales:
            raise UsageError("--models and --scales need at least one value")
        if any(not (math.isfinite(s) and s > 0) for s in self.scales):
            raise UsageError("--scales must be positive numbers")
        if self.size < 16:
            raise UsageError(f"--size must be at least 16 px, got {self.size}")
        if not (self.budget_minutes > 0) or self.repeat < 1 or self.warmup < 0:
            raise UsageError("--budget-minutes must be positive, --repeat at least 1 and --warmup at least 0")


def parse_spec(spec: str) -> tuple[str, str | None, int | None]:
    """``MODEL[:DECODER][@NFE]`` -> (model, decoder or None, nfe or None)."""
    s, _, nfe = spec.strip().partition("@")
    model, _, decoder = s.partition(":")
    if not model or (":" in s and not decoder):
        raise UsageError(f"bad model spec '{spec}' (MODEL, MODEL:DECODER or MODEL:DECODER@NFE)")
    try:
        n = int(nfe) if nfe else None
    except ValueError:
        raise UsageError(f"bad NFE in '{spec}': '{nfe}' is not a whole number") from None
    if n is not None and n < 1:
        raise UsageError(f"NFE in '{spec}' must be at least 1")
    return model, decoder or None, n


def _default_backends(device) -> list[str]:
    if device.type == "cuda":
        return ["torch"]
    from vaepack.runtime import available_backends

    return [b for b, why in available_backends().items() if why is None and b in CPU_BACKENDS]


def _why_not(entry, dec_entry, nfe, backend: str, precision: str, device) -> str | None:
    """Why a candidate cannot run here (None if it can)."""
    from vaepack import quantize as Q
    from vaepack.backends.runners import BACKEND_PRECISIONS
    from vaepack.runtime import cpu_float_precision

    eps = dec_entry.part("decoder").family == "eps"
    if nfe is not None and not eps:
        return f"'{dec_entry.id}' is not a diffusion decoder, so it takes no NFE"
    if eps and backend != "torch":
        return "diffusion decoders run in torch (their sampler loop)"
    if precision not in BACKEND_PRECISIONS.get(backend, ()):
        return f"the {backend} backend runs {', '.join(BACKEND_PRECISIONS.get(backend, ()))}, not {precision}"
    if precision == "fp16" and device.type != "cuda":
        return "fp16 runs on CUDA only"
    if precision == "int8":
        cal = {"encoder": Q.has_calibration(entry, "encoder"), "decoder": Q.has_calibration(dec_entry, "decoder")}
        if not any(cal.values()):
            return f"neither '{entry.id}' encoder nor '{dec_entry.id}' decoder has an int8 calibration"
        for part, e in (("encoder", entry), ("decoder", dec_entry)):
            fl = cpu_float_precision(e) if device.type == "cpu" else "fp32"
            if not cal[part] and fl not in BACKEND_PRECISIONS.get(backend, ()):
                return (f"`--dtype int8` runs the uncalibrated {part} at {fl} (vaepack.runtime.load_vae), which "
                        f"{backend} does not run")
    if backend == "tensorrt" and device.type != "cuda":
        return "TensorRT needs a CUDA device"
    return None


def plan(cfg: TuneConfig, device) -> list[Point]:
    """Every candidate, cheapest configurations first. One that cannot run is a ``skipped`` point with
    the reason when its backend (not installed) or precision (no kernels, no calibration, a
    diffusion decoder off torch) was asked for explicitly, and left out when it came from a default."""
    from vaepack.manifest import get_model
    from vaepack.runtime import available_backends, cpu_has_native_bf16

    pairs = []
    for spec in cfg.models:
        m, d, n = parse_spec(spec)
        enc, dec = get_model(m), get_model(d or m)
        enc.part("encoder"), dec.part("decoder")  # UnknownModelError names what the model has
        if enc.space.name != dec.space.name:
            raise UsageError(f"'{enc.id}' writes {enc.space.name} latents but '{dec.id}' decodes {dec.space.name}",
                             hint="pair models of one latent space")
        pairs.append((enc, dec, n))
    from vaepack.runtime import ALIASES

    explicit_b, explicit_p = cfg.backends is not None, cfg.precisions is not None
    backends = [ALIASES.get(b.lower(), b.lower()) for b in cfg.backends] if explicit_b else _default_backends(device)
    if explicit_p:
        precisions = cfg.precisions
    else:
        native = device.type == "cuda" or cpu_has_native_bf16()
        precisions = ["fp32"] + (["bf16"] if native else []) + ([] if device.type == "cuda" else ["int8"])
    avail = available_backends()
    points = []
    for enc, dec, n in pairs:
        for scale in cfg.scales:
            for be in backends:
                if be not in avail:
                    raise UsageError(f"unknown backend '{be}' (choose {', '.join(avail)})")
                for prec in precisions:
                    c = Candidate(enc.id, dec.id, n, float(scale), be, prec)
                    if avail[be] is not None:  # not installed: listed when --backends asked for it
                        if explicit_b:
                            points.append(Point(c, status="skipped", reason=avail[be]))
                        continue
                    why = _why_not(enc, dec, n, be, prec, device)
                    if why is None:
                        points.append(Point(c))
                    elif explicit_p:  # combinations from the default precisions are left out silently
                        points.append(Point(c, status="skipped", reason=why))
    points.sort(key=lambda p: (p.cand.scale, PRECISION_COST.get(p.cand.precision, 3), p.cand.pair,
                               BACKEND_COST.get(p.cand.backend, 4)))
    return points


# --------------------------------------------------------------------------- measuring
@dataclass
class Latency:
    times_ms: list[float]  # one per timed call
    encoder: dict  # {"backend", "precision"} that ran
    decoder: dict


class Measurer(Protocol):
    def latency(self, cand: Candidate, warmup: int, calls: int) -> Latency:
        """``warmup`` untimed round trips, then ``calls`` timed ones. VaepackError = cannot run here."""

    def quality(self, cand: Candidate, stop: Callable[[], bool]) -> dict | None:
        """Mean metrics over the images (plus ``images``), or None when ``stop()`` said so midway."""


class VaeMeasurer:
    """Measures candidates with vaepack.runtime.load_vae, vaepack.pipeline and the bench timing loop."""

    MAX_LOADED = 4  # loaded parts kept (an encoder and a decoder of two candidates); measured: all kept -> 10 GB RSS

    def __init__(self, cfg: TuneConfig, device):
        self.cfg, self.device = cfg, device
        self._vaes: dict[tuple, object] = {}
        self._images = None

    def _part(self, mid: str, part: str, backend: str, precision: str, nfe: int | None):
        from vaepack import quantize as Q
        from vaepack.manifest import get_model
        from vaepack.runtime import cpu_float_precision, load_vae

        entry = get_model(mid)
        if precision == "int8" and not Q.has_calibration(entry, part):  # as `--dtype int8` runs such a part
            precision = cpu_float_precision(entry) if self.device.type == "cpu" else "fp32"
        if entry.part(part).family == "eps":
            backend = "torch"
        key = (mid, part, backend, precision, nfe)
        if key in self._vaes:
            self._vaes[key] = self._vaes.pop(key)  # most recently used last
        else:
            if len(self._vaes) >= self.MAX_LOADED:  # compiled graphs are large: keep a few, not every candidate's
                from vaepack.backends.runners import clear_caches

                while len(self._vaes) >= self.MAX_LOADED:
                    self._vaes.pop(next(iter(self._vaes)))
                clear_caches()  # the per-process session cache; the parts still loaded hold their own
            vae = load_vae(mid, parts=(part,), device=str(self.device), dtype=precision, backend=backend)
            if part == "decoder" and vae.sampling:
                vae.set_sampler(nfe, 0)  # a fixed seed: every candidate sees the same noise
            self._vaes[key] = vae
        return self._vaes[key]

    def _pair(self, c: Candidate):
        return (self._part(c.model, "encoder", c.backend, c.precision, None),
                self._part(c.decoder, "decoder", c.backend, c.precision, c.nfe))

    def latency(self, c: Candidate, warmup: int, calls: int) -> Latency:
        import torch

        from vaepack import pipeline as P
        from vaepack.bench.run import TimedCall, time_call

        enc, dec = self._pair(c)
        never = P.TileOptions(budget=0)
        if self.cfg.part == "encoder":
            def fn(x):
                return P.encode_tensor(enc, x, c.scale, "bilinear", never)
        else:
            def fn(x):
                return P.roundtrip_tensor(enc, dec, x, c.scale, "bilinear", never)
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        x = torch.rand(3, self.cfg.size, self.cfg.size, generator=torch.Generator().manual_seed(0))
        t = time_call(TimedCall(fn=fn, sync=sync), x, warmup, calls, self.device)
        rt = {p: {"backend": v.runtime(p)["backend"], "precision": v.runtime(p)["dtype"]}
              for p, v in (("encoder", enc), ("decoder", dec))}
        return Latency([s * 1e3 for s in t.times], rt["encoder"], rt["decoder"])

    def images(self):
        if self._images is None:
            from vaepack.io import expand_inputs, load_image

            self._images = [(str(p), load_image(p)) for p in expand_inputs(self.cfg.images)]
        return self._images

    def quality(self, c: Candidate, stop):
        import torch

        from vaepack import metrics as M
        from vaepack import pipeline as P
        from vaepack.perceptual import perceptual_metrics

        enc, dec = self._pair(c)
        rows = []
        with torch.inference_mode():
            for path, x in self.images():
                if stop():
                    return None
                y, _ = P.roundtrip_tensor(enc, dec, x, c.scale, "bilinear", P.TileOptions(budget=0))
                m = M.image_metrics(y.cpu(), x)
                m["psnr"] = M.json_psnr(m["psnr"])
                m.update(perceptual_metrics(y.cpu(), x))
                rows.append(m)
        out = {k: v for k, v in M.mean_of_rows(rows, ("psnr", "ssim", "haarpsi", "gmsd")).items() if k != "unavailable"}
        return {**out, "images": len(rows)}


# --------------------------------------------------------------------------- frontier and choice
def frontier(points: list[Point], metric: str = "psnr") -> list[Point]:
    """Measured points no other point dominates (as fast or faster and at least as good, one of
    them strictly), fastest first."""
    ok = [p for p in points if p.status == "ok" and p.quality.get(metric) is not None]
    ok.sort(key=lambda p: (p.latency_ms, -p.quality[metric]))
    out, best = [], -math.inf
    for p in ok:
        if p.quality[metric] > best:
            out.append(p)
            best = p.quality[metric]
    return out


def recommend(points: list[Point], cfg: TuneConfig) -> tuple[Point | None, str | None]:
    """(the recommended point, None) or (None, why nothing qualifies)."""
    m = cfg.metric
    ok = [p for p in points if p.status == "ok" and p.quality.get(m) is not None]
    unmeasured = sum(p.status in ("unmeasured", "planned") for p in points)
    tail = f"; {unmeasured} candidate(s) left unmeasured (raise --budget-minutes)" if unmeasured else ""
    target = cfg.target_psnr if m == "psnr" else cfg.target_ssim
    unit = " dB" if m == "psnr" else ""
    if not ok:
        return None, "no candidate was measured" + tail
    best = max(ok, key=lambda p: p.quality[m])
    if target is not None:
        hits = [p for p in ok if p.quality[m] >= target and (cfg.max_ms is None or p.latency_ms <= cfg.max_ms)]
        if hits:
            return min(hits, key=lambda p: (p.latency_ms, -p.quality[m])), None
        within = f" within {cfg.max_ms:g} ms" if cfg.max_ms is not None else ""
        return None, (f"no measured point reaches {m.upper()} {target:g}{unit}{within} (best: "
                      f"{best.quality[m]:.4g}{unit}, {best.cand.label}, {best.latency_ms:.0f} ms){tail}")
    if cfg.max_ms is not None:
        fast = [p for p in ok if p.latency_ms <= cfg.max_ms]
        if fast:
            return max(fast, key=lambda p: (p.quality[m], -p.latency_ms)), None
        quick = min(ok, key=lambda p: p.latency_ms)
        return None, f"no measured point runs within {cfg.max_ms:g} ms (fastest: {quick.latency_ms:.0f} ms, " \
                     f"{quick.cand.label}){tail}"
    return None, "no target given: pass --target-psnr, --target-ssim or --max-ms"


def _choice(p: Point) -> dict:
    c = p.cand
    return {"model": c.model, "decoder": c.decoder, "scale": c.scale, "nfe": c.nfe, "backend": c.backend,
            "precision": c.precision, "encoder": p.encoder, "decoder_runtime": p.decoder_runtime,
            **{k: p.quality.get(k) for k in ("psnr", "ssim", "haarpsi", "gmsd")}, "latency_ms": p.latency_ms}


# --------------------------------------------------------------------------- the search
def _set_latency(p: Point, times_ms: list[float]) -> None:
    from vaepack.bench.run import _percentile

    p.latency_ms, p.latency_ms_p90 = _percentile(times_ms, 0.5), _percentile(times_ms, 0.9)


def run_tune(cfg: TuneConfig, measurer: Measurer | None = None, progress: Progress | None = None,
             clock: Callable[[], float] = time.monotonic) -> dict:
    """Plan, measure, prune and choose (module docstring); returns the JSON document of `tune --json`."""
    from datetime import datetime, timezone

    from vaepack.bench.machine import machine_info
    from vaepack.vae import pick_device

    cfg.check()
    dev = pick_device(cfg.device)
    points = plan(cfg, dev)
    measurer = measurer or VaeMeasurer(cfg, dev)
    if isinstance(measurer, VaeMeasurer) and not measurer.images():
        raise UsageError("no images to measure quality on")
    t0 = clock()
    deadline = t0 + cfg.budget_minutes * 60
    interrupted = exhausted = False
    live = [p for p in points if p.status == "planned"]
    total, done = 2 * len(live), 0

    def note(phase: str, p: Point) -> None:
        if progress:
            progress(phase, p, done, total)

    times: dict[int, list[float]] = {}  # id(point) -> ms per timed call
    try:
        first: dict[tuple, float] = {}  # group -> its fastest first call
        for rnd in range(cfg.repeat):  # 1. latency, in round-robin rounds, cheapest configurations first
            for p in live:
                if p.status != "planned" and not (p.status == "timed" and p.runs == rnd):
                    continue  # skipped, or left behind by the early cutoff
                if clock() > deadline:
                    exhausted = True
                    break
                try:
                    lat = measurer.latency(p.cand, cfg.warmup if rnd == 0 else 0, 1)
                except VaepackError as e:
                    p.status, p.reason = "skipped", str(e)
                    done += 1
                    note("latency", p)
                    continue
                times.setdefault(id(p), []).extend(lat.times_ms)
                p.encoder, p.decoder_runtime, p.status, p.runs = lat.encoder, lat.decoder, "timed", rnd + 1
                _set_latency(p, times[id(p)])
                if rnd == 0:
                    g = p.cand.group
                    if g in first and p.latency_ms > CUTOFF * first[g]:
                        p.runs = -1  # out of the later rounds; pruned below
                    first[g] = min(first.get(g, math.inf), p.latency_ms)
                if rnd == cfg.repeat - 1 or p.runs == -1:
                    done += 1
                    note("latency", p)
                elif rnd == 0:
                    note("timing", p)  # the first call, so a long phase 1 shows progress
            if exhausted:
                break
        for p in live:
            p.runs = len(times.get(id(p), []))  # the cutoff's -1 marker done
        best: dict[tuple, Point] = {}  # group -> its fastest point
        for p in live:
            if p.status == "timed" and (p.cand.group not in best or p.latency_ms < best[p.cand.group].latency_ms):
                best[p.cand.group] = p
        timed = [p for p in live if p.status == "timed"]
        for p in timed:  # 2. prune: within a group only the fastest backend can be on the frontier
            g = best[p.cand.group]
            if p is not g:
                p.status = "pruned"
                p.reason = (f"dominated: {g.cand.backend} runs the same model, scale and precision in "
                            f"{g.latency_ms:.0f} ms vs {p.latency_ms:.0f} ms (backends differ in quality only by "
                            f"kernel rounding)")
                done += 1
                note("pruned", p)
        todo = sorted((p for p in timed if p.status == "timed"),
                      key=lambda p: (cfg.max_ms is not None and p.latency_ms > cfg.max_ms, p.latency_ms))
        for p in todo:  # 3. quality, fastest first
            if clock() > deadline:
                exhausted = True
                break
            try:
                q = measurer.quality(p.cand, lambda: clock() > deadline)
            except VaepackError as e:
                p.status, p.reason = "skipped", str(e)
                done += 1
                note("quality", p)
                continue
            if q is None:
                exhausted = True
                break
            p.images = int(q.pop("images", 0))
            p.quality, p.status = q, "ok"
            done += 1
            note("quality", p)
    except KeyboardInterrupt:
        interrupted = True
    for p in points:
        p.runs = len(times.get(id(p), []))
        if p.status in ("planned", "timed"):
            p.status = "unmeasured"
            p.reason = "interrupted" if interrupted else "the budget ran out (--budget-minutes)"
    front = frontier(points, cfg.metric)
    for p in front:
        p.frontier = True
    chosen, why = recommend(points, cfg)
    target = {k: v for k, v in (("psnr", cfg.target_psnr), ("ssim", cfg.target_ssim), ("max_ms", cfg.max_ms))
              if v is not None}
    return {
        "kind": "tune", "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(dev),
        "config": {"images": [str(i) for i in cfg.images], "models": list(cfg.models), "scales": list(cfg.scales),
                   "backends": cfg.backends, "precisions": cfg.precisions, "size": cfg.size, "part": cfg.part,
                   "budget_minutes": cfg.budget_minutes, "warmup": cfg.warmup, "repeat": cfg.repeat},
        "image_count": max((p.images for p in points), default=0),
        "metric": cfg.metric, "target": target or None, "interrupted": interrupted, "budget_exhausted": exhausted,
        "elapsed_s": round(clock() - t0, 1), "points": [p.as_dict() for p in points],
        "frontier": [p.cand.label for p in front],
        "recommended": _choice(chosen) if chosen else None, "recommended_reason": why,
    }


# --------------------------------------------------------------------------- reporting
def preset_of(result: dict, name: str, command: str | None = None):
    """The recommended point of a tune result as a vaepack.presets.Preset (None if there is none)."""
    from vaepack.presets import Preset

    r = result.get("recommended")
    if not r:
        return None
    return Preset(name=name, model=r["model"], decoder=r["decoder"], scale=r["scale"], backend=r["backend"],
                  precision=r["precision"], nfe=r["nfe"], measured={
                      **{k: r[k] for k in ("psnr", "ssim", "haarpsi", "gmsd", "latency_ms")},
                      "size": result["config"]["size"], "part": result["config"]["part"],
                      "images": result["image_count"], "cpu": result["machine"]["cpu"],
                      "created_utc": result["created_utc"], "target": result["target"], "command": command})


def _f(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def frontier_markdown(result: dict) -> str:
    """The frontier as a Markdown table, the recommended row in bold."""
    rec = result.get("recommended") or {}
    lines = ["| model | decoder | nfe | scale | backend | precision | ms/image | PSNR (dB) | SSIM | HaarPSI | GMSD |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted((p for p in result["points"] if p["frontier"]), key=lambda p: p["latency_ms"]):
        cells = [p["model"], p["decoder"], "-" if p["nfe"] is None else str(p["nfe"]), f"{p['scale']:g}", p["backend"],
                 p["precision"], _f(p["latency_ms"], 0), _f(p["psnr"]), _f(p["ssim"], 4), _f(p["haarpsi"], 4),
                 _f(p["gmsd"], 4)]
        same = all(rec.get(k) == p[k] for k in ("model", "decoder", "nfe", "scale", "backend", "precision"))
        lines.append("| " + " | ".join(f"**{c}**" if same else c for c in cells) + " |")
    return "\n".join(lines)


def plot_frontier(result: dict, path) -> None:
    """Quality vs latency per image: one marker per model pair, one colour per backend and precision,
    the frontier drawn, the recommended point starred, the target as a line (vaepack.plots)."""
    from vaepack.plots import scatter_frontier

    m = result["metric"]
    ok = [p for p in result["points"] if p["status"] == "ok" and p.get(m) is not None]
    pairs = list(dict.fromkeys(Candidate(p["model"], p["decoder"], p["nfe"], 1, "", "").pair for p in ok))
    pts = [{"x": p["latency_ms"], "y": p[m], "marker": Candidate(p["model"], p["decoder"], p["nfe"], 1, "", "").pair,
            "color": f"{p['backend']} {p['precision']}", "label": f"x{p['scale']:g}"} for p in ok]
    front = [(p["latency_ms"], p[m]) for p in ok if p["frontier"]]
    rec = result.get("recommended")
    chosen = None
    if rec:
        pair = Candidate(rec["model"], rec["decoder"], rec["nfe"], 1, "", "").pair
        chosen = (rec["latency_ms"], rec[m], f"recommended: {pair} x{rec['scale']:g} {rec['backend']} {rec['precision']}")
    t = result.get("target") or {}
    unit = "PSNR (dB)" if m == "psnr" else "SSIM"
    what = "round trip" if result["config"]["part"] == "roundtrip" else "encoder"
    scatter_frontier(path, pts, front, chosen, marker_order=pairs,
                     hline=(t[m], f"target {t[m]:g}") if m in t else None,
                     vline=(t["max_ms"], f"max {t['max_ms']:g} ms") if "max_ms" in t else None,
                     xlabel=f"{what} latency per image at {result['config']['size']} px (ms, median)",
                     ylabel=f"round-trip {unit}, mean over {result['image_count']} images",
                     title=f"vaepack tune: {result['machine']['cpu']}")
