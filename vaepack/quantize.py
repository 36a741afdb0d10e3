"""Static int8 post-training quantization of exported graphs (QDQ ONNX) for the CPU runtimes.

Why: on x86 CPUs with AVX512-VNNI (or AMX-INT8) an int8 convolution runs about twice as fast as a
bf16 one. Measured here (AMD EPYC Zen 4, 2 cores, AVX512-VNNI + AVX512-BF16, no AMX): the default
encoder at 512 px spends 103 of its 110 ms (OpenVINO bf16) in 3x3 convolutions, and those halve in
int8 (benchmarks/results/int8.md). The decoder absorbs the encoder's rounding: the default's dev-set
round trip at 1.5x keeps its PSNR, though the latents move more than in bf16 (same file).

The scheme is the one OpenVINO's and onnxruntime's CPU int8 kernels take, written as standard ONNX
QuantizeLinear/DequantizeLinear pairs (the "QDQ" format) around every Conv:
- weights: int8, symmetric, one scale per output channel (max |w| / 127);
- the Conv's input activation: uint8, asymmetric, one scale per tensor, from a calibration range
  [lo, hi] widened to contain 0 (so ReLU outputs get zero point 0 and zero is exact);
- everything else (biases, norms, resizes, the latent convention, the outputs) stays float.
TensorRT wants symmetric int8 activations, so these graphs are for onnxruntime and OpenVINO only.

Calibration: min/max of each Conv's input over calibration images, seen through PyTorch forward
hooks in fp32, on the inputs the runtimes will get: random crops remapped by the pipeline's scale
(encoder), or the model's own encoder latents of those crops (decoder). The result is a small JSON
file keyed by Conv module name and tied to the weights sha256; the embedded default ships its files
(listed in the manifest under the part as ``int8_calibration``), others are computed with
``vaepack export MODEL --precision int8 --calibration DIR`` into <cache>/int8/.
ONNX Conv nodes are matched to modules by their weights (exact equality), never by position.

A calibration may also name quantization-aware weights (``qat``: file name and sha256; made by
vaepack.train.qat): the int8 graph is then built from those float weights, found beside the
calibration, in <cache>/int8/ or in the package, and verified; the model's fp32 weights are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import contextlib
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from vaepack import __version__
from vaepack import pipeline as P
from vaepack.errors import ExportError, UsageError, VaepackError
from vaepack.files import atomic_write_bytes, sha256_file
from vaepack.io import expand_inputs, load_image
from vaepack.manifest import ModelEntry
from vaepack.paths import cache_dir, embedded_weights_dir
from vaepack.vae import load_torch_vae
from vaepack.weights import weights_digest

log = logging.getLogger("vaepack")

CALIBRATION_FORMAT = "vaepack.int8-calibration"
CALIBRATION_VERSION = "1"
DEFAULT_CROP = 256
DEFAULT_IMAGES = 64
MIN_IMAGES = 4
SENSITIVITY_IMAGES = 6  # crops the per-Conv sensitivity is measured on (one forward pass per Conv each)


# --------------------------------------------------------------------------- the int8 math (one place)
def act_qparams(rng) -> tuple[float, int]:
    """uint8 scale and zero point of an activation range, widened to contain 0 (zero stays exact,
    and a ReLU output gets zero point 0)."""
    lo, hi = min(float(rng[0]), 0.0), max(float(rng[1]), 0.0)
    s = max((hi - lo) / 255.0, 1e-8)
    return s, int(np.clip(round(-lo / s), 0, 255))


def weight_qparams(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, float32 scale per output channel): symmetric, max |w| / 127."""
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    ws = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    wq = np.clip(np.round(w / ws.reshape(-1, *([1] * (w.ndim - 1)))), -127, 127).astype(np.int8)
    return wq, ws


# --------------------------------------------------------------------------- calibration
def convs(module: nn.Module) -> dict[str, nn.Conv2d]:
    """The Conv2d modules by name: what the int8 export quantizes (matched to graph nodes by weights)."""
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Conv2d)}


def _crops(paths: list[Path], crop: int, count: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """One random crop (crop x crop, or the whole image if smaller) from each of up to ``count``
    images, unreadable files skipped with a warning (calibration needs many, not all)."""
    rng = random.Random(seed)
    chosen = sorted(paths)
    rng.shuffle(chosen)
    out = []
    for p in chosen:
        if len(out) >= count:
            break
        try:
            x = load_image(p)
        except VaepackError as e:
            log.warning("calibration skips %s: %s", p.name, e)
            continue
        _, h, w = x.shape
        ch, cw = min(crop, h), min(crop, w)
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        out.append((p.name, x[:, top:top + ch, left:left + cw]))
    return out


def calibrate(entry: ModelEntry, part: str, images: list[Path], *, scale: float = 1.5, crop: int = DEFAULT_CROP,
              count: int = DEFAULT_IMAGES, seed: int = 0, source: str = "", keep_float: int = 0,
              sensitivity_images: int = SENSITIVITY_IMAGES) -> dict[str, Any]:
    """Calibration record for ``entry``'s ``part`` from random crops of ``images`` (see the module
    docstring). ``scale``: the remap the pipeline applies before encoding (the default model is
    used at 1.5x); the decoder sees the encoder's latents of the same remapped crops.

    The range is the observed min/max. Clipping long tails where the expected quantization error is
    smallest (histogram + MSE search) was tried on the default model and did not help: encoder latent
    rms error 13.1% vs 14.7% of the latent std (median over dev photos) but a worse maximum (30% vs
    26%), decoder round trip 29.249 vs 29.252 dB; most of the error comes from the int8 weights
    (weights alone: 7.7%), so it was not kept. Neither was keeping the Convs float whose int8 moved
    the latents most (the stem and first H/2 conv of the default encoder): the latent error halved but
    the dev round trip's per-image spread grew from 0.17 to 0.41 dB (benchmarks/results/int8.md).

    ``keep_float`` > 0: the ``keep_float`` Convs whose int8 error is largest (``conv_sensitivity`` on the
    first ``sensitivity_images`` crops) get no range, so the export leaves them float. On the default
    decoder four small Convs (3 % of its MACs) hold a third of the int8 error: keeping them float moves the
    dev round trip from -0.21 to -0.14 dB vs fp32 and keeps most of int8's speed-up (benchmarks/results/int8.md)."""
    if part not in ("encoder", "decoder"):
        raise UsageError(f"int8 covers encoders and decoders, not '{part}'")
    crops = _crops(list(images), crop, count, seed)
    if len(crops) < MIN_IMAGES:
        raise UsageError(f"int8 calibration needs at least {MIN_IMAGES} readable images, found {len(crops)}",
                         path=source or None, hint="point --calibration at a folder of photos like your inputs")
    parts = ("encoder", "decoder") if part == "decoder" else ("encoder",)
    if part == "decoder" and "encoder" not in entry.parts:
        raise UsageError(f"'{entry.id}' has no encoder to make calibration latents for its decoder")
    vae = load_torch_vae(entry, parts=parts, device="cpu", dtype="fp32")
    module = vae.parts[part].module
    if part == "decoder" and vae.sampling:
        raise UsageError(f"the decoder of '{entry.id}' is a diffusion decoder; int8 covers single-pass decoders")
    # the part's inputs, computed once (a decoder's come from its own encoder, whose convs are not hooked)
    with torch.no_grad():
        inputs = [P.prepare(x, vae.factor, scale, "bilinear")[0] for _, x in crops]
        if part == "decoder":
            inputs = [vae.encode(x) for x in inputs]
    run = vae.encode if part == "encoder" else vae.decode

    t0 = time.time()
    ranges: dict[str, list[float]] = {}

    def minmax(name, a):
        lo, hi = float(a.min()), float(a.max())
        r = ranges.setdefault(name, [lo, hi])
        r[0], r[1] = min(r[0], lo), max(r[1], hi)

    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: minmax(n, args[0].detach()))
               for n, m in convs(module).items()]
    try:
        with torch.no_grad():
            for x in inputs:
                run(x)
    finally:
        for h in handles:
            h.remove()
    seconds = time.time() - t0
    extra: dict[str, Any] = {}
    if keep_float > 0:
        t1 = time.time()
        xs = [_module_input(module, run, x) for x in inputs[:max(1, sensitivity_images)]]
        sens = conv_sensitivity(module, xs, ranges)
        # Not a Conv that reads another Conv's output directly: OpenVINO 2026.4 miscomputes an int8 Conv
        # whose output feeds a float Conv and a float Add (the default decoder's first block conv kept
        # float: dev round trip 11.4 dB; onnxruntime ran the same graph right, parity passed).
        producer = FakeQuantPlan(module, xs[0], ranges).producer
        conv_names = set(convs(module))
        eligible = [n for n in sens if producer.get(n) not in conv_names]
        kept = sorted(eligible, key=sens.get, reverse=True)[:keep_float]
        for n in kept:
            ranges.pop(n)
        extra = {"float_convs": kept, "sensitivity": {k: float(f"{v:.4g}") for k, v in sorted(sens.items())},
                 "sensitivity_images": min(len(inputs), max(1, sensitivity_images))}
        seconds += time.time() - t1
        log.info("int8 calibration keeps %s float (largest int8 error)", ", ".join(kept))
    return {
        "format": CALIBRATION_FORMAT, "format_version": CALIBRATION_VERSION,
        "model": entry.id, "part": part, "weights_sha256": weights_digest(entry, part),
        "method": "minmax", "activations": "uint8 per tensor, asymmetric, range widened to contain 0",
        "weights": "int8 per output channel, symmetric (max |w| / 127)",
        "data": {"source": source, "images": len(crops), "crop": crop, "scale": scale, "seed": seed,
                 "files": [n for n, _ in crops]},
        "ranges": {k: [round(v[0], 6), round(v[1], 6)] for k, v in sorted(ranges.items())},
        **extra, "seconds": round(seconds, 1), "vaepack": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _module_input(module: nn.Module, run, x: torch.Tensor) -> torch.Tensor:
    """What ``run(x)`` (the VAE part call: convention, padding) hands to ``module``."""
    box: list[torch.Tensor] = []
    h = module.register_forward_pre_hook(lambda _m, args: box.append(args[0].detach()))
    try:
        with torch.no_grad():
            run(x)
    finally:
        h.remove()
    return box[0]


def prepare_calibration(entry: ModelEntry, part: str, source: str | Path | None, *, count: int = DEFAULT_IMAGES,
                        scale: float = 1.5, crop: int = DEFAULT_CROP, keep_float: int = 0) -> dict | None:
    """``vaepack export --precision int8 --calibration SOURCE``: SOURCE is a calibration JSON (checked
    against the current weights) or images (a folder, files or globs) to calibrate on. Either way the
    result is also stored in <cache>/int8/ so that runtimes find it later. None: nothing to prepare
    (the export uses the shipped or cached calibration)."""
    is_json = source is not None and Path(source).suffix.lower() == ".json"
    if keep_float and (source is None or is_json):
        raise UsageError("--keep-float applies when calibrating on images",
                         hint="give --calibration DIR (a calibration JSON already says which Convs stay float)")
    if source is None:
        return None
    digest = weights_digest(entry, part)
    src = Path(source)
    dest = cached_calibration_path(entry, part, digest)
    if is_json and src.is_file():
        cal = load_calibration(src, entry, part, digest)
        qat = qat_weights_path(cal, src)
        if qat is not None and qat.parent != dest.parent:  # runtimes find the weights in the cache later
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest.parent / qat.name, qat.read_bytes())
    else:
        images = expand_inputs([str(source)])
        cal = calibrate(entry, part, images, scale=scale, crop=crop, count=count, source=str(source),
                        keep_float=keep_float)
    save_calibration(cal, dest)
    return cal


def calibration_sha256(cal: dict) -> str:
    return hashlib.sha256(json.dumps(cal, sort_keys=True).encode()).hexdigest()


def check_calibration(cal: Any, where: str, entry: ModelEntry | None = None, part: str | None = None,
                       digest: str | None = None) -> dict:
    if not isinstance(cal, dict) or cal.get("format") != CALIBRATION_FORMAT or not isinstance(cal.get("ranges"), dict):
        raise ExportError("not a vaepack int8 calibration file", path=where)
    if entry is not None and (cal.get("model") != entry.id or cal.get("part") != part):
        raise ExportError(f"calibration is for the {cal.get('part')} of '{cal.get('model')}', not the {part} of "
                          f"'{entry.id}'", path=where)
    if digest is not None and cal.get("weights_sha256") != digest:
        raise ExportError("calibration was made for other weights of this model", path=where,
                          hint=f"calibrate again: vaepack export {cal.get('model')} --part {part} --precision int8 "
                               "--calibration DIR")
    for k, v in cal["ranges"].items():
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(t, (int, float)) and np.isfinite(t) for t in v)
                and v[0] <= v[1]):
            raise ExportError(f"calibration range of '{k}' is not [lo, hi]", path=where)
    qat = cal.get("qat")
    if qat is not None and not (isinstance(qat, dict) and isinstance(qat.get("weights"), str)
                                and Path(qat["weights"]).name == qat["weights"]
                                and isinstance(qat.get("weights_sha256"), str)):
        raise ExportError("calibration names quantization-aware weights without a file name and sha256", path=where)
    return cal


def qat_weights_path(cal: dict, *near: str | Path | None) -> Path | None:
    """The fine-tuned weights a QAT calibration names (vaepack.train.qat), verified by sha256: looked
    up beside the calibration files in ``near``, in <cache>/int8/ and among the package's weights.
    None for a plain calibration."""
    qat = cal.get("qat")
    if not qat:
        return None
    name = qat["weights"]
    dirs = [Path(p).parent for p in near if p] + [cache_dir() / "int8", embedded_weights_dir()]
    for d in dirs:
        p = d / name
        if p.is_file():
            if sha256_file(p) != qat["weights_sha256"]:
                raise ExportError("quantization-aware weights do not match the sha256 in their calibration",
                                  path=str(p), hint="train again (vaepack train-qat) or restore the file")
            return p
    raise ExportError(f"the int8 calibration needs its quantization-aware weights {name}, which are not beside it",
                      hint="keep MODEL-PART.qat.safetensors next to MODEL-PART.qat.int8.json (vaepack train-qat writes both)")


def load_qat_weights(entry: ModelEntry, part: str, cal: dict, *near: str | Path | None) -> nn.Module | None:
    """The part built from the QAT weights ``cal`` names (the loader's strict, shape-checked path), or
    None for a plain calibration."""
    from vaepack.loader import load_part_from_files

    path = qat_weights_path(cal, *near)
    return None if path is None else load_part_from_files(entry.part(part), [path], entry.id)


def cached_calibration_path(entry: ModelEntry, part: str, digest: str) -> Path:
    return cache_dir() / "int8" / f"{entry.id}-{part}-{digest.replace('+', '')[:16]}.json"


def save_calibration(cal: dict, path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(cal, indent=1) + "\n").encode())


def shipped_calibration(entry: ModelEntry, part: str) -> Path | None:
    """The calibration file the manifest lists for this part (embedded in the package), verified."""
    spec = entry.part(part).int8_calibration
    if spec is None:
        return None
    p = embedded_weights_dir() / spec.name
    if not p.is_file():
        raise ExportError("the manifest lists an int8 calibration file that is not in the package", path=str(p),
                          hint="reinstall vaepack")
    if spec.sha256 and sha256_file(p) != spec.sha256:
        raise ExportError("int8 calibration file does not match its sha256 in the manifest", path=str(p),
                          hint="reinstall vaepack")
    return p


def find_calibration(entry: ModelEntry, part: str, digest: str) -> tuple[dict, str]:
    """(calibration, where it came from) for this part's current weights: the one you made with
    `vaepack export --precision int8 --calibration DIR|FILE` (in the cache; yours wins), else the
    file the package ships for the part."""
    cached = cached_calibration_path(entry, part, digest)
    for p in (cached if cached.is_file() else None, shipped_calibration(entry, part)):
        if p is not None:
            return load_calibration(p, entry, part, digest), str(p)
    raise UsageError(f"no int8 calibration for the {part} of '{entry.id}'",
                     hint=f"make one from photos like your inputs: vaepack export {entry.id} --part {part} "
                          "--precision int8 --calibration DIR")


def has_calibration(entry: ModelEntry, part: str) -> bool:
    """Whether ``find_calibration`` has something for this part (without reading or checking it)."""
    if entry.part(part).int8_calibration is not None:
        return True
    return cached_calibration_path(entry, part, weights_digest(entry, part)).is_file()


def load_calibration(path: str | Path, entry: ModelEntry, part: str, digest: str) -> dict:
    """A calibration file, read and checked against this part's current weights."""
    try:
        cal = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"unreadable int8 calibration ({e})", path=str(path)) from None
    return check_calibration(cal, str(path), entry, part, digest)


# --------------------------------------------------------------------------- fake quantization
# The export's int8 arithmetic simulated in torch: quantization-aware training (vaepack.train.qat) trains
# under it, and ``conv_sensitivity`` measures with it which Convs int8 hurts most.

class _WeightFakeQuant(nn.Module):
    """Parametrization of a Conv weight: symmetric int8 per output channel (``weight_qparams``)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        absmax = w.detach().abs().flatten(1).amax(1)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax)).float()
        zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w.float(), scale, zp, 0, -127, 127).to(w.dtype)


class FakeQuantPlan:
    """Where the export puts each activation Quantize/Dequantize pair, found by tracing one forward pass
    on ``example``: the export quantizes a Conv's input tensor once, right after it is produced, for
    *every* reader (a skip connection included) with the union of the ranges of the Convs that read it
    (vaepack.quantize.quantize_model). So the fake quantization goes on the output of the module call
    that produced the tensor (a module called twice is told apart by call order), or on the model's
    input; only a tensor made by a functional op falls back to the Conv's own input (its other
    readers, if any, then see float values: the one known difference to the graph)."""

    @torch.no_grad()
    def __init__(self, module: nn.Module, example: torch.Tensor, ranges: dict[str, list[float]]):
        missing = [n for n in ranges if n not in convs(module)]
        if missing:
            raise UsageError(f"the calibration names Convs the model does not have: {', '.join(missing[:3])}",
                             hint="calibrate this model's weights (vaepack export --precision int8 --calibration DIR)")
        made: dict[int, tuple] = {}  # id(tensor) -> ("input",) | ("output", module name, call index)
        readers: dict[int, list[str]] = {}
        keep: list[torch.Tensor] = []  # referenced until the pass ends, so ids are not reused
        calls: dict[str, int] = {}
        def root_hook(_m, args):  # (a pre-hook that returns something replaces the arguments)
            made.setdefault(id(args[0]), ("input",))

        handles = [module.register_forward_pre_hook(root_hook)]
        for name, m in module.named_modules():
            if name and not list(m.children()):
                def out_hook(_m, _args, out, name=name):
                    i = calls[name] = calls.get(name, -1) + 1
                    if torch.is_tensor(out):
                        keep.append(out)
                        made.setdefault(id(out), ("output", name, i))
                handles.append(m.register_forward_hook(out_hook))
            if name in ranges:
                def in_hook(_m, args, name=name):
                    keep.append(args[0])
                    readers.setdefault(id(args[0]), []).append(name)
                handles.append(m.register_forward_pre_hook(in_hook))
        try:
            module(example)
        finally:
            for h in handles:
                h.remove()
        self.ranges: dict[str, list[float]] = {}  # per Conv, unions applied (what the export uses)
        self.at_input: tuple[float, int] | None = None
        self.at_output: dict[tuple[str, int], tuple[float, int]] = {}
        self.at_conv: dict[str, tuple[float, int]] = {}
        self.producer: dict[str, str | None] = {}  # per Conv: the module whose output it reads (None: input/functional)
        for tid, names in readers.items():
            rng = [min(ranges[n][0] for n in names), max(ranges[n][1] for n in names)]
            q = act_qparams(rng)
            for n in names:
                self.ranges[n] = rng
            where = made.get(tid)
            self.producer.update({n: where[1] if where and where[0] == "output" else None for n in names})
            if where == ("input",):
                self.at_input = q
            elif where is not None:
                self.at_output[where[1:]] = q
            else:
                self.at_conv.update({n: q for n in names})
        self.convs = sorted(self.ranges)


def _fq(x: torch.Tensor, q: tuple[float, int]) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x.float(), q[0], q[1], 0, 255).to(x.dtype)


@contextlib.contextmanager
def fake_quantized(module: nn.Module, plan: FakeQuantPlan) -> Iterator[nn.Module]:
    """Within the block, ``module`` computes with the int8 arithmetic of its QDQ export (``plan``:
    activations; every calibrated Conv's weights per output channel); afterwards the module is plain
    again, its (trained) float weights under the original state-dict keys. Convs without a range
    stay float, as in the export."""
    handles, wrapped = [], []
    calls: dict[str, int] = {}
    mods = dict(module.named_modules())

    def reset(_m, args):
        calls.clear()
        return (_fq(args[0], plan.at_input), *args[1:]) if plan.at_input else None

    try:
        handles.append(module.register_forward_pre_hook(reset))
        for name in {n for n, _ in plan.at_output}:
            def out_hook(_m, _args, out, name=name):
                i = calls[name] = calls.get(name, -1) + 1
                q = plan.at_output.get((name, i))
                return _fq(out, q) if q else None
            handles.append(mods[name].register_forward_hook(out_hook))
        for name, q in plan.at_conv.items():
            handles.append(mods[name].register_forward_pre_hook(lambda _m, args, q=q: (_fq(args[0], q), *args[1:])))
        for name in plan.convs:
            parametrize.register_parametrization(mods[name], "weight", _WeightFakeQuant())
            wrapped.append(mods[name])
        yield module
    finally:
        for h in handles:
            h.remove()
        for conv in wrapped:
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)


@torch.no_grad()
def conv_sensitivity(module: nn.Module, inputs: list[torch.Tensor], ranges: dict[str, list[float]]) -> dict[str, float]:
    """Per calibrated Conv: the mean squared error ``module``'s output gets when only that Conv runs
    int8 (its weights and its input tensor, as the export would; ``FakeQuantPlan``), relative to the
    error with every calibrated Conv int8. Large = keeping that Conv float removes much of the error."""
    ref = [module(x) for x in inputs]

    def err(rng: dict[str, list[float]]) -> float:
        with fake_quantized(module, FakeQuantPlan(module, inputs[0], rng)):
            return sum(float(torch.mean((module(x) - r) ** 2)) for x, r in zip(inputs, ref)) / len(inputs)

    total = max(err(ranges), 1e-30)
    return {n: err({n: ranges[n]}) / total for n in ranges}


# --------------------------------------------------------------------------- QDQ rewrite
def _weight_key(w: np.ndarray) -> tuple:
    return (w.shape, hashlib.sha1(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest())


def _act_qparams(rng, prefix: str) -> list:
    from onnx import numpy_helper

    s, zp = act_qparams(rng)
    return [numpy_helper.from_array(np.array(s, np.float32), f"{prefix}_scale"),
            numpy_helper.from_array(np.array(zp, np.uint8), f"{prefix}_zp")]


def quantize_model(model, module: nn.Module, cal: dict):
    """Rewrite an fp32 ONNX ModelProto (in place) to QDQ int8 with ``cal``'s ranges.

    Every Conv whose weights match a calibrated module gets int8 weights (DequantizeLinear, per
    output channel) and its input tensor a QuantizeLinear/DequantizeLinear pair placed right after
    the tensor is produced; *every* consumer of that tensor then reads the dequantized copy (a skip
    connection included), as onnxruntime's QDQ quantizer does. Why every consumer: OpenVINO 2026.4
    computed wrong results (latent rms error 0.8 instead of 0.006) for a stride-2 int8 Conv whose
    float output was read by both a quantized Conv and a float Add; with the tensor quantized for all
    readers its int8 kernels and onnxruntime's agree (tests/test_quantize.py).

    Returns ``(model, stats)``; stats counts the Conv nodes quantized and those left in float (no
    module with the same weights, or no calibration range, e.g. a folded weight)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_weight = {_weight_key(m.weight.detach().float().numpy()): n for n, m in convs(module).items()}
    ranges = cal["ranges"]
    uses: dict[str, int] = {}
    for node in g.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    act: dict[str, list[float]] = {}  # tensor -> range (the union where several Convs read it)
    new_inits, drop, done, skipped = [], set(), [], []
    nodes = list(g.node)
    before: dict[int, list] = {}  # weight DequantizeLinear nodes, placed right before their Conv
    for idx, node in enumerate(nodes):
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        name = by_weight.get(_weight_key(w))
        if name is None or name not in ranges:
            skipped.append(node.name or node.input[1])
            continue
        tag = f"vq{len(done)}"
        wq, ws = weight_qparams(w)
        new_inits += [numpy_helper.from_array(wq, f"{tag}.w_q"), numpy_helper.from_array(ws, f"{tag}.w_scale"),
                      numpy_helper.from_array(np.zeros(w.shape[0], np.int8), f"{tag}.w_zp")]
        if uses.get(node.input[1], 0) == 1:
            drop.add(node.input[1])
        dqw = helper.make_node("DequantizeLinear", [f"{tag}.w_q", f"{tag}.w_scale", f"{tag}.w_zp"],
                               [f"{tag}.w_dq"], name=f"{tag}/DQw", axis=0)
        node.input[1] = f"{tag}.w_dq"
        before[idx] = [dqw]
        lo, hi = ranges[name]
        r = act.setdefault(node.input[0], [lo, hi])
        r[0], r[1] = min(r[0], lo), max(r[1], hi)
        done.append(name)
    if not done:
        raise ExportError(f"no Conv of the graph matches the calibration of '{cal.get('model')}' "
                          f"{cal.get('part')}: nothing to quantize")
    # One Q/DQ pair per quantized tensor, right after its producer; all readers take the DQ output.
    producers = {o: i for i, n in enumerate(nodes) for o in n.output}
    dq_of = {x: f"vqa{i}.dq" for i, x in enumerate(act)}
    pairs: dict[int, list] = {}  # insert after node index (-1: graph inputs, at the top)
    for i, (x, rng) in enumerate(act.items()):
        new_inits += _act_qparams(rng, f"vqa{i}")
        pair = [helper.make_node("QuantizeLinear", [x, f"vqa{i}_scale", f"vqa{i}_zp"], [f"vqa{i}.q"], name=f"vqa{i}/Q"),
                helper.make_node("DequantizeLinear", [f"vqa{i}.q", f"vqa{i}_scale", f"vqa{i}_zp"], [dq_of[x]],
                                 name=f"vqa{i}/DQ")]
        at = producers.get(x, -1)
        pairs.setdefault(at, []).extend(pair)
    for n in nodes:
        for k, inp in enumerate(n.input):
            if inp in dq_of:
                n.input[k] = dq_of[inp]
    ordered = pairs.get(-1, [])
    for i, n in enumerate(nodes):
        ordered.extend(before.get(i, []))
        ordered.append(n)
        ordered.extend(pairs.get(i, []))
    # The graph's outputs keep reading the float tensor (a quantized tensor that is also an output
    # stays float there: only node inputs were rewired).
    del g.node[:]
    g.node.extend(ordered)
    kept = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    return model, {"quantized_convs": len(done), "quantized_tensors": len(act), "float_convs": len(skipped),
                   "float_conv_nodes": skipped[:20]}


__all__ = [
    "CALIBRATION_FORMAT", "FakeQuantPlan", "act_qparams", "cached_calibration_path", "calibrate", "calibration_sha256",
    "conv_sensitivity", "convs", "fake_quantized",
    "check_calibration", "find_calibration", "has_calibration", "load_calibration", "load_qat_weights",
    "prepare_calibration", "qat_weights_path", "quantize_model", "save_calibration", "shipped_calibration",
    "weight_qparams",
]
