"""Quantization-aware fine-tuning (issue 17, part 3): train a model in float while every Conv sees the
int8 arithmetic that vaepack.quantize writes into the exported QDQ graph, so the weights learn to
absorb the rounding.

The fake quantization (``vaepack.quantize.FakeQuantPlan`` / ``fake_quantized``, beside the int8 math it
simulates) is the export's scheme:
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

import copy
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.errors import UsageError
from vaepack.quantize import FakeQuantPlan, convs, fake_quantized  # noqa: F401 - the fake quantization lives with the int8 math


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
