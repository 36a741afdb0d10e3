"""Parity of an artifact against PyTorch fp32 (the VAE contract): max |graph - torch| divided by the
reference output's range (max - min), on a random batch and on a real image, at two sizes; past the
tolerance the export fails and nothing is written."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaepack.backends import optional as O
from vaepack.backends import runners as R
from vaepack.backends.artifacts import model_part
from vaepack.backends.profiles import Profile
from vaepack.errors import BackendUnavailableError, ExportError, VaepackError
from vaepack.export.graph import example_inputs
from vaepack.manifest import ModelEntry, get_model
from vaepack.paths import shared_dir
from vaepack.vae import VAE, load_torch_vae, make_part

log = logging.getLogger("vaepack")

# Max abs error relative to the reference output's range (max - min). fp32 differs only by summation
# order. fp16 rounds weights and every activation to 11 significant bits (~5e-4 relative each), bf16
# to 8 bits (~4e-3); errors grow through ~30 layers, so the limits are ~20x one rounding step.
# int8 (vaepack/quantize.py): rounding every Conv input to 256 levels moves single latent values by
# up to a quarter of the latent range (default encoder, dev photos at 1.5x: max |error| / range median
# 0.14, worst 0.28; rms 15% of the latent std). The bound catches broken graphs (a wrong int8 kernel
# gave errors above the whole range); the round-trip PSNR, not this bound, decides whether a part
# runs int8 by default (the manifest's int8_calibration ... auto).
INT8_TOLERANCE = 0.3
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "int8": INT8_TOLERANCE}
PARITY_SIZES = ((64, 64), (96, 160))  # pixels (H, W): multiples of 32 (f8 and f32), non-square


def real_image(path: Path | None) -> tuple[torch.Tensor, str]:
    """A natural image for the parity check: ``path``, else the first dev image of ../shared, else a
    deterministic synthetic one (smooth gradients plus hard edges)."""
    from vaepack.io import load_image

    if path is None:
        sd = shared_dir()
        cands = sorted((sd / "data" / "dev").glob("*.png")) if sd else []
        path = cands[0] if cands else None
    if path is not None:
        return load_image(Path(path)), Path(path).name
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 256), torch.linspace(0, 1, 256), indexing="ij")
    img = torch.stack([xx, yy, ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1).float()])
    img = 0.8 * img + 0.2 * torch.rand(3, 256, 256, generator=g)
    return img.clamp(0, 1), "synthetic"


def fit_image(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Center-crop to the aspect ratio of (h, w), then resize (antialiased) to exactly (h, w)."""
    _, H, W = img.shape
    scale = min(H / h, W / w)
    ch, cw = int(h * scale), int(w * scale)
    top, left = (H - ch) // 2, (W - cw) // 2
    crop = img[:, top:top + ch, left:left + cw][None]
    return F.interpolate(crop, size=(h, w), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def check_parity_available(precision: str) -> None:
    """Raise BackendUnavailableError (with the install hint) unless a runtime can check a graph of
    ``precision``: onnxruntime, or OpenVINO where it runs that precision (not fp16)."""
    try:
        O.require_onnxruntime()
    except BackendUnavailableError:
        if precision == "fp16":
            raise
        O.require_openvino()


def parity_runner(onnx_file: Path, sc: dict, precision: str) -> tuple[R.Runner, str]:
    """(runner, precision it checks) for the parity check of a fresh graph: onnxruntime's CPU provider,
    or OpenVINO when onnxruntime is not installed (the ``openvino`` extra alone) and for bf16 (no
    onnxruntime bf16 kernels; without OpenVINO the fp32 graph bf16 runs on is checked instead)."""
    def missing(require) -> BackendUnavailableError | None:
        try:
            require()
        except BackendUnavailableError as e:
            return e
        return None

    no_ort, no_ov = missing(O.require_onnxruntime), missing(O.require_openvino)
    if precision == "bf16":
        if no_ov is None:
            return R.OpenVINORunner(onnx_file, sc, precision="bf16", cache=False), "bf16"
        precision = "fp32"
    if no_ort is None:
        return R.OnnxRuntimeRunner(onnx_file, sc, providers=["CPUExecutionProvider"], cache=False), precision
    if no_ov is None and precision in ("fp32", "int8"):
        return R.OpenVINORunner(onnx_file, sc, precision=precision, cache=False), precision
    raise no_ort


def check_parity(sc: dict, onnx_file: Path, entry: ModelEntry, part: str, module: nn.Module,
            ref_fn: nn.Module | None, sizes, image, precision: str, tolerance: float | None) -> dict:
    """Run the fresh graph and PyTorch fp32 (the VAE contract) on a random batch and a real image at
    every size; raise ExportError past the tolerance."""
    tol = TOLERANCES[precision] if tolerance is None else float(tolerance)
    runner, check_prec = parity_runner(onnx_file, sc, precision)
    if check_prec != precision and tolerance is None:
        tol = min(tol, TOLERANCES[check_prec])

    vae = VAE(entry=entry)
    vae.parts[model_part(part)] = make_part(entry, model_part(part), module, sc["weights_sha256"])
    real, real_name = real_image(Path(image) if image else None)
    encoder = None
    if part == "decoder" and "encoder" in entry.parts:
        encoder = load_torch_vae(entry, parts=("encoder",), device="cpu")

    gen = torch.Generator().manual_seed(1234)
    checks = []
    for size in sizes:
        cases = [("random", example_inputs(entry, part, size, batch=2, gen=gen))]
        img = fit_image(real, *size)
        if part == "encoder":
            cases.append((f"real:{real_name}", (img,)))
        elif part == "decoder" and encoder is not None:
            cases.append((f"real:{real_name}", (encoder.encode(img),)))
        elif part == "eps-step":
            t = torch.full((1,), 0.5)
            cases.append((f"real:{real_name}", (img * 2 - 1, t, torch.randn(1, entry.space.channels,
                                                                         size[0] // entry.space.factor,
                                                                         size[1] // entry.space.factor,
                                                                         generator=gen))))
        else:
            log.warning("%s has no encoder: the decoder parity check uses random latents only", entry.id)
        for label, args in cases:
            with torch.no_grad():
                if part == "encoder":
                    ref = vae.encode(args[0])
                elif part == "decoder":
                    ref = vae.decode(args[0])
                else:
                    ref = ref_fn(*args)
            try:
                got = runner(*args) if part == "eps-step" else runner(args[0])
            except VaepackError:
                raise
            except Exception as e:  # noqa: BLE001 - a runtime's own error: the graph is broken
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise ExportError(f"the exported graph fails in {runner.backend} on {label} "
                                  f"{list(args[0].shape)}: {msg}; nothing was written",
                                  hint="try the other exporter or another --opset") from None
            diff = (got.float() - ref).abs()
            err = float(diff.max()) if torch.isfinite(got).all() else float("inf")
            rng = float(ref.max() - ref.min())
            rel = err / max(rng, 1e-6)
            # int8: activations outside the calibration range clip by design, so random inputs (noise
            # images, Gaussian latents) are recorded but only the real image decides.
            gating = not (precision == "int8" and label == "random")
            checks.append({"input": label, "shape": list(args[0].shape), "max_abs_err": err,
                           "mean_abs_err": float(diff.mean()), "output_range": rng, "rel_err": rel,
                           "passed": rel <= tol or not gating, "gating": gating})
    if check_prec == "fp16" and "CPUExecutionProvider" in runner.describe():
        # onnxruntime's CPU provider has no fp16 Conv: it casts whole fp16 chains to fp32, so this
        # checks the graph and the fp16 weight rounding, not fp16 arithmetic (the engine check does).
        check_prec = "fp16 weights, fp32 arithmetic (onnxruntime CPU)"
    decisive = [c for c in checks if c["gating"]] or checks
    worst = max(decisive, key=lambda c: c["rel_err"])
    result = {
        "reference": "torch fp32 (VAE contract)" if part != "eps-step" else "torch fp32 step",
        "runtime": runner.describe(), "precision_checked": check_prec, "tolerance_rel": tol,
        "max_abs_err": max(c["max_abs_err"] for c in decisive), "max_rel_err": worst["rel_err"],
        "passed": all(c["passed"] for c in checks), "checks": checks,
    }
    if not result["passed"]:
        raise ExportError(
            f"parity check failed for {entry.id} {part} ({precision}): max abs err {worst['max_abs_err']:.3g} "
            f"= {worst['rel_err']:.3g} of the output range on {worst['input']} {worst['shape']}, "
            f"tolerance {tol:g}; nothing was written",
            hint="export fp32, or report it with the model and opset")
    return result


def parity_summary(parity: dict) -> list[str]:
    """Lines for the CLI: one per parity check, then the verdict."""
    lines = [f"{c['input']:<28} {'x'.join(map(str, c['shape'])):<16} max abs err {c['max_abs_err']:.3g} "
             f"({c['rel_err']:.2g} of range {c['output_range']:.3g})" for c in parity.get("checks", [])]
    verdict = "passed" if parity.get("passed") else "FAILED"
    lines.append(f"parity {verdict}: max abs err {parity.get('max_abs_err', float('nan')):.3g}, tolerance "
                 f"{parity.get('tolerance_rel')} of the range ({parity.get('precision_checked', '?')} on "
                 f"{parity.get('runtime', '?')})")
    return lines


def check_engine_parity(engine_file: Path, esc: dict, prof: Profile, precision: str) -> dict:
    """Engine vs PyTorch fp32 at the profile's min and opt sizes (random inputs and a real image)."""
    runner = R.TensorRTRunner(engine_file, esc, profile=prof, verify=False)
    vae = load_torch_vae(esc["model"], parts=tuple({esc["part"], "encoder"} & set(get_model(esc["model"]).parts)),
                   device="cpu")
    real, real_name = real_image(None)
    m = esc["size_multiple"]
    sizes = {(max(prof.height.min // m * m, m), max(prof.width.min // m * m, m)),
             (prof.height.opt // m * m, prof.width.opt // m * m)}
    tol = TOLERANCES[precision]
    checks = []
    gen = torch.Generator().manual_seed(1234)
    entry = get_model(esc["model"])
    for size in sorted(sizes):
        x = example_inputs(entry, esc["part"], size, batch=max(prof.batch.min, 1), gen=gen)[0]
        img = fit_image(real, *size)
        cases = [("random", x)]
        if esc["part"] == "encoder":
            cases.append((f"real:{real_name}", img))
        elif vae.has("encoder"):
            cases.append((f"real:{real_name}", vae.encode(img)))
        for label, inp in cases:
            ref = vae.encode(inp) if esc["part"] == "encoder" else vae.decode(inp)
            got = runner(inp).float().cpu()
            err = float((got - ref).abs().max())
            rng = float(ref.max() - ref.min())
            checks.append({"input": label, "shape": list(inp.shape), "max_abs_err": err, "output_range": rng,
                           "rel_err": err / max(rng, 1e-6), "passed": err / max(rng, 1e-6) <= tol})
    worst = max(checks, key=lambda c: c["rel_err"])
    if not worst["passed"]:
        raise ExportError(f"TensorRT {precision} engine parity failed: max abs err {worst['max_abs_err']:.3g} "
                          f"({worst['rel_err']:.3g} of the range) on {worst['input']} {worst['shape']}, "
                          f"tolerance {tol:g}; nothing was written", hint="build fp32 or bf16")
    return {"reference": "torch fp32 (VAE contract)", "runtime": runner.describe(), "tolerance_rel": tol,
            "max_abs_err": max(c["max_abs_err"] for c in checks), "max_rel_err": worst["rel_err"],
            "passed": True, "checks": checks}
