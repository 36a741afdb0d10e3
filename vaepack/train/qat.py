"""Quantization-aware fine-tuning (issue 17, part 3): train a model in float while every Conv sees the
int8 arithmetic that vaepack.quantize writes into the exported QDQ graph, so the weights learn to
absorb the rounding.

The fake quantization is the export's scheme, computed with its own formulas (one home for the int8
math is vaepack.quantize: ``act_qparams``, ``weight_qparams``):
- each Conv's input: uint8, one scale and zero point per tensor, from the calibration range of that
  Conv (fixed during training: the ranges are shipped with the weights, so the export quantizes with
  the numbers the training saw);
- each Conv's weight: int8, symmetric, one scale per output channel = max |w| / 127, recomputed from
  the current weights at every step (the export recomputes it from the final weights);
- rounding half to even (ONNX QuantizeLinear, ``torch.fake_quantize_*``), gradients by the
  straight-through estimator (zero outside the clamp range for activations).

The trainer (``vaepack train-qat``) writes two files a user hands to `vaepack export MODEL --part P
--precision int8 --calibration RUN/MODEL-P.qat.int8.json`: ``MODEL-P.qat.safetensors`` (the fine-tuned
float weights) and ``MODEL-P.qat.int8.json`` (the calibration: the ranges the training used, and a ``qat`` entry naming the
weights file and its sha256). The model's fp32 weights are never replaced: only its int8 graph is
built from the fine-tuned ones.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from vaepack.errors import UsageError
from vaepack.quantize import act_qparams


class _WeightFakeQuant(nn.Module):
    """Parametrization of a Conv weight: symmetric int8 per output channel (``weight_qparams``)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        absmax = w.detach().abs().flatten(1).amax(1)
        scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax)).float()
        zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w.float(), scale, zp, 0, -127, 127).to(w.dtype)


def convs(module: nn.Module) -> dict[str, nn.Conv2d]:
    """The Conv2d modules by name: what the int8 export quantizes (vaepack.quantize matches them by weights)."""
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Conv2d)}


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
        for tid, names in readers.items():
            rng = [min(ranges[n][0] for n in names), max(ranges[n][1] for n in names)]
            q = act_qparams(rng)
            for n in names:
                self.ranges[n] = rng
            where = made.get(tid)
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


# ----------------------------------------------------------------------------- the trainer
Progress = Callable[[dict], None]


def _calibration(cfg, entry, digest: str) -> tuple[dict, str]:
    """The ranges to train with: ``cfg.calibration``, else the part's cached or shipped calibration,
    else a new one from the training photos (as `vaepack export --calibration DIR` makes it)."""
    from vaepack import quantize as Q
    from vaepack.train.common import training_images

    if cfg.calibration is not None:
        return Q.load_calibration(cfg.calibration, entry, cfg.part, digest), str(cfg.calibration)
    try:
        return Q.find_calibration(entry, cfg.part, digest)
    except UsageError:
        cal = Q.calibrate(entry, cfg.part, training_images(cfg.data_dir), scale=cfg.scale, source=str(cfg.data_dir))
        return cal, f"calibrated on {cfg.data_dir}"


def part_io(vae, part: str, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the part's network input, the fp32 network's output) for [0, 1] crops ``x``, exactly as the
    VAE contract feeds it (captured from the module, so range and latent conventions are the VAE's):
    an encoder sees the crops remapped by ``scale``, a decoder the fp32 encoder's latents of those."""
    from vaepack import pipeline as P

    xs = torch.cat([P.prepare(c, vae.factor, scale, "bilinear")[0] for c in x])
    box: dict[str, torch.Tensor] = {}
    module = vae.parts[part].module
    h = module.register_forward_hook(lambda _m, args, out: box.update(inp=args[0].detach(), out=out.detach()))
    try:
        if part == "encoder":
            vae.encode(xs)
        else:
            vae.decode(vae.encode(xs))
    finally:
        h.remove()
    return box["inp"], box["out"]


def image_decoder(vae) -> nn.Module:
    """The model's frozen fp32 decoder network, applied to the encoder network's raw output: possible
    where both networks work in diffusion space and the same pixel range (TAE-like models; a KL
    model's latent convention sits between them and is refused)."""
    enc, dec = vae.parts["encoder"], vae.parts["decoder"]
    if not (enc.native_is_diffusion and dec.native_is_diffusion and enc.image_range == dec.image_range):
        raise UsageError(f"--loss image needs an encoder whose output the decoder reads as is; '{vae.entry.id}' "
                         "converts latents between them", hint="use --loss mse")
    return dec.module.eval().requires_grad_(False)


def qat_loss(y: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":  # relative: int8 noise scales with the signal
        return F.mse_loss(y, target) / target.square().mean().clamp_min(1e-12)
    return F.l1_loss(y, target)  # l1, and image (decoded pixels)


def run_train_qat(cfg, progress: Progress | None = None) -> dict:
    """Fine-tune ``cfg.part`` of ``cfg.model`` with fake int8 quantization (vaepack.train.config.
    QATTrainConfig); exports the two files of ``qat_files`` into the run folder."""
    from vaepack import quantize as Q
    from vaepack.manifest import get_model
    from vaepack.train.common import (StepLog, Stop, atomic_torch_save, load_images, log, random_crops,
                                      resume_checkpoint, training_session, warmup_cosine_lr)
    from vaepack.vae import load_torch_vae
    from vaepack.weights import weights_digest

    cfg.validate()
    entry = get_model(cfg.model)
    if cfg.part not in entry.parts:
        raise UsageError(f"'{entry.id}' has no {cfg.part}")
    with training_session(cfg.out_dir, cfg.resume, cfg.threads, cfg.device, cfg.seed) as (run_dir, ckpt, device, rng):
        parts = ("encoder", "decoder") if cfg.part == "decoder" or cfg.loss == "image" else ("encoder",)
        if cfg.part == "decoder" and "encoder" not in entry.parts:
            raise UsageError(f"'{entry.id}' has no encoder to make training latents for its decoder")
        if cfg.loss == "image" and "decoder" not in entry.parts:
            raise UsageError(f"--loss image decodes with the model's decoder, and '{entry.id}' has none")
        vae = load_torch_vae(entry, parts=parts, device=str(device), dtype="fp32")
        if "decoder" in parts and vae.sampling:
            raise UsageError(f"the decoder of '{entry.id}' is a diffusion decoder; int8 covers single-pass decoders")
        decoder = image_decoder(vae) if cfg.loss == "image" else None
        teacher = vae.parts[cfg.part].module.eval().requires_grad_(False)
        digest = weights_digest(entry, cfg.part)
        if cfg.calibration is None and ckpt.exists():  # a resumed run keeps the ranges it trained with
            prev = torch.load(ckpt, weights_only=False, map_location="cpu")
            cal, cal_source = prev["calibration"], prev["calibration_source"]
        else:
            cal, cal_source = _calibration(cfg, entry, digest)
        student = copy.deepcopy(teacher).eval().requires_grad_(True)
        images = [img for _, img in load_images(cfg.data_dir, min_side=cfg.crop)]
        inp, _ = part_io(vae, cfg.part, random_crops(images, 1, cfg.crop, rng).to(device), cfg.scale)
        plan = FakeQuantPlan(student, inp, cal["ranges"])
        ranges = plan.ranges
        opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
        meta = {"model": entry.id, "part": cfg.part, "weights_sha256": digest,
                "calibration_sha256": Q.calibration_sha256(cal), "scale": cfg.scale, "crop": cfg.crop,
                "batch": cfg.batch, "lr": cfg.lr, "loss": cfg.loss}
        step = 0
        c = resume_checkpoint(ckpt, meta, device, rng, "QAT")
        if c is not None:
            student.load_state_dict(c["student"])
            opt.load_state_dict(c["opt"])
            step = c["step"]

        def save():
            atomic_torch_save({"meta": meta, "student": student.state_dict(), "opt": opt.state_dict(), "step": step,
                               "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "ranges": ranges,
                               "calibration": cal, "calibration_source": cal_source, "command": cfg.command,
                               "data": str(cfg.data_dir)}, ckpt)

        log.info("QAT of %s's %s: %d photos, %d calibrated convs (%s), loss %s", entry.id, cfg.part, len(images),
                 len(ranges), cal_source, cfg.loss)
        slog = StepLog(cfg.steps, cfg.log_every, step, cfg.save_every_minutes, progress)
        with Stop(cfg.max_minutes) as stop:
            while step < cfg.steps and not stop.interrupted and not stop.timed_out():
                x = random_crops(images, cfg.batch, cfg.crop, rng).to(device)
                inp, target = part_io(vae, cfg.part, x, cfg.scale)
                for g in opt.param_groups:
                    g["lr"] = warmup_cosine_lr(step, cfg.steps, cfg.lr, warmup=min(100, cfg.steps // 10))
                with fake_quantized(student, plan):
                    y = student(inp)
                    if decoder is not None:
                        with torch.no_grad():
                            target = decoder(target)
                        y = decoder(y)
                    loss = qat_loss(y, target, cfg.loss)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                step += 1
                slog.add(step, {"loss": loss})
                if slog.due_save():
                    save()
        save()
        outs = export_qat(run_dir)
        log.info("stopped at step %d; exported %s", step, [str(p) for p in outs])
        return {"step": step, "steps": cfg.steps, "done": step >= cfg.steps, "exported": [str(p) for p in outs],
                "minutes": slog.minutes, **meta}


def qat_files(model_id: str, part: str) -> tuple[str, str]:
    """(weights, calibration) file names of a QAT run of ``model_id``'s ``part``: unique names, so the
    package can ship them as they are (the calibration names the weights file)."""
    return f"{model_id}-{part}.qat.safetensors", f"{model_id}-{part}.qat.int8.json"


def export_qat(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint as ``MODEL-PART.qat.safetensors`` (fp32: the int8 graph is quantized from
    exactly these numbers) and ``MODEL-PART.qat.int8.json`` (its calibration, naming the weights)."""
    from vaepack import quantize as Q
    from vaepack.files import sha256_file
    from vaepack.train.common import provenance, save_safetensors

    run_dir = Path(run_dir)
    c = torch.load(run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")
    m = c["meta"]
    wname, jname = qat_files(m["model"], m["part"])
    wpath = run_dir / wname
    sd = {k: v.detach().float().contiguous() for k, v in c["student"].items() if not k.endswith("num_batches_tracked")}
    save_safetensors(sd, wpath, provenance(c.get("command"), kind=f"qat-{m['part']}", model=m["model"],
                                           base_weights_sha256=m["weights_sha256"], steps=c["step"]))
    cal = {**c["calibration"], "method": "qat",
           "ranges": {k: [float(v[0]), float(v[1])] for k, v in sorted(c["ranges"].items())},
           "qat": {"weights": wpath.name, "weights_sha256": sha256_file(wpath), "steps": c["step"],
                   "loss": m["loss"], "lr": m["lr"], "crop": m["crop"], "scale": m["scale"], "data": c.get("data"),
                   "ranges_from": c.get("calibration_source"), "command": c.get("command")},
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    jpath = run_dir / jname
    Q.save_calibration(cal, jpath)
    return [wpath, jpath]


__all__ = ["FakeQuantPlan", "convs", "export_qat", "fake_quantized", "image_decoder", "part_io", "qat_files",
           "qat_loss", "run_train_qat"]
