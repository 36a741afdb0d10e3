"""Runtime backends: one Runner interface, same latents/images across backends within the parity
tolerance, on-demand export cache, session reuse, clean failures for missing/broken installs."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from vaepack.backends import artifacts as A
from vaepack.backends import optional as O
from vaepack.backends import runners as RN
from vaepack.export import onnx as XO
from vaepack.export import parity as XP
from vaepack.paths import cache_dir
from vaepack import runtime as R
from vaepack.errors import BackendUnavailableError, ExportError, UsageError

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

try:  # the zoo helper lives with the export tests (pytest puts tests/ on sys.path)
    from test_export import HAS_TAEF2, make_zoo
except ImportError:  # pragma: no cover - tests/ collected as a package
    from tests.test_export import HAS_TAEF2, make_zoo

HAS_OV = importlib.util.find_spec("openvino") is not None
FP32, BF16 = XP.TOLERANCES["fp32"], XP.TOLERANCES["bf16"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        ids = make_zoo(tmp_path_factory.mktemp("zoo"), mp)
        yield ids
    RN.clear_caches()


def _inputs(model: str, part: str, batch: int = 2, size=(48, 80)) -> torch.Tensor:
    from vaepack.manifest import get_model

    sp = get_model(model).space
    g = torch.Generator().manual_seed(5)
    if part == "encoder":
        return torch.rand(batch, 3, *size, generator=g)
    return torch.randn(batch, sp.channels, size[0] // sp.factor, size[1] // sp.factor, generator=g)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float().cpu() - ref.float().cpu()).abs().max() / (ref.max() - ref.min()).clamp_min(1e-6))


def _cases():
    cases = [("tae", "encoder"), ("tae", "decoder"), ("tae32", "encoder")]
    cases += [("kl", "encoder"), ("kl", "decoder"), ("kl_sd3", "decoder")]
    return cases


# --------------------------------------------------------------------------- same results everywhere
@pytest.mark.parametrize("key,part", _cases())
@pytest.mark.parametrize("conv", [True, False])
def test_backends_agree_fp32(zoo, key, part, conv):
    model = zoo[key]
    x = _inputs(model, part, size=(64, 96) if key == "tae32" else (48, 80))
    ref = R.get_backend("torch", model, part)(x)
    names = ["onnxruntime"] + (["openvino"] if HAS_OV else [])
    for name in names:
        runner = R.get_backend(name, model, part, include_convention=conv)
        y = runner(x)
        assert y.shape == ref.shape and y.dtype == torch.float32 and y.device.type == "cpu"
        assert _rel(y, ref) <= FP32, (name, _rel(y, ref))
        if part == "decoder":
            assert 0 <= float(y.min()) and float(y.max()) <= 1  # the contract clamps


@pytest.mark.skipif(not HAS_TAEF2, reason="needs ../shared/weights (TAEF2)")
def test_real_taef2_roundtrip_across_backends(zoo):
    img = XP.fit_image(XP.real_image(None)[0], 64, 96)
    enc_t, dec_t = R.get_backend("torch", "taef2", "encoder"), R.get_backend("torch", "taef2", "decoder")
    z_ref = enc_t(img)
    y_ref = dec_t(z_ref)
    for name in ["onnxruntime"] + (["openvino"] if HAS_OV else []):
        z = R.get_backend(name, "taef2", "encoder")(img)
        assert _rel(z, z_ref) <= FP32
        assert _rel(R.get_backend(name, "taef2", "decoder")(z_ref), y_ref) <= FP32


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_bf16_paths_within_bf16_tolerance(zoo, part):
    model = zoo["tae"]
    x = _inputs(model, part)
    ref = R.get_backend("torch", model, part)(x)
    assert _rel(R.get_backend("torch", model, part, "bf16", device="cpu")(x), ref) <= BF16
    if HAS_OV:
        r = R.get_backend("openvino", model, part, "bf16")
        assert "bf16" in r.describe()
        assert _rel(r(x), ref) <= BF16


def test_onnxruntime_fp16_graph(zoo):
    model = zoo["tae"]
    x = _inputs(model, "decoder")
    ref = R.get_backend("torch", model, "decoder")(x)
    r = R.get_backend("onnxruntime", model, "decoder", "fp16")
    assert r.sidecar["graph_precision"] == "fp16"
    assert _rel(r(x), ref) <= XP.TOLERANCES["fp16"]


def test_eps_step_runner(zoo):
    from vaepack.loader import load_part

    r = R.get_backend("onnxruntime", zoo["eps"], "eps-step")
    dec = load_part(zoo["eps"], "decoder")[0]
    x_t, t, z = torch.randn(2, 3, 32, 64), torch.tensor([0.2, 0.9]), torch.randn(2, 4, 4, 8)
    with torch.no_grad():
        ref = dec.step(x_t, t, z)
    assert _rel(r(x_t, t, z), ref) <= FP32
    with pytest.raises(UsageError, match="takes 3 inputs"):
        r(x_t)


# --------------------------------------------------------------------------- caching
def test_export_cache_and_session_reuse(zoo):
    model = zoo["tae"]
    r1 = R.get_backend("onnxruntime", model, "decoder")
    path = r1.onnx_path
    assert path.parent == A.export_cache_dir() / model
    mtime = path.stat().st_mtime_ns
    r2 = R.get_backend("onnxruntime", model, "decoder")
    assert r2.onnx_path == path and path.stat().st_mtime_ns == mtime  # reused, not re-exported
    assert r2.session is r1.session  # one session per artifact and settings
    r3 = R.get_backend("onnxruntime", model, "decoder", threads=1, graph_optimization="basic")
    assert r3.session is not r1.session
    x = _inputs(model, "decoder")
    assert _rel(r3(x), r1(x)) <= FP32
    if HAS_OV:
        o = R.get_backend("openvino", model, "decoder")
        assert o.onnx_path == path  # OpenVINO compiles the same fp32 export
        assert (cache_dir() / "openvino").is_dir()


def test_cache_is_keyed_by_weights(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        ids = make_zoo(tmp_path / "a", mp, seed=0)
        p0 = R.get_backend("onnxruntime", ids["tae"], "encoder").onnx_path
        make_zoo(tmp_path / "b", mp, seed=3)  # same id, new weights
        mp.setenv("VAEPACK_HOME", str(tmp_path / "a" / "home"))  # same cache as before
        r = R.get_backend("onnxruntime", ids["tae"], "encoder")
        assert r.onnx_path != p0 and r.onnx_path.parent == p0.parent
        ref = R.get_backend("torch", ids["tae"], "encoder")
        x = _inputs(ids["tae"], "encoder")
        assert _rel(r(x), ref(x)) <= FP32
        with pytest.raises(ExportError, match="exported from weights"):
            R.get_backend("onnxruntime", ids["tae"], "encoder", onnx_path=p0)  # stale explicit file
    RN.clear_caches()


def test_explicit_onnx_path(zoo, tmp_path):
    res = XO.export_onnx(zoo["tae"], "decoder", tmp_path, include_convention=False, parity_sizes=((32, 32), (48, 80)))
    r = R.get_backend("onnxruntime", zoo["tae"], "decoder", onnx_path=res.onnx_path)
    x = _inputs(zoo["tae"], "decoder")
    assert _rel(r(x), R.get_backend("torch", zoo["tae"], "decoder")(x)) <= FP32
    with pytest.raises(UsageError, match="not the encoder"):
        R.get_backend("onnxruntime", zoo["tae"], "encoder", onnx_path=res.onnx_path)
    with pytest.raises(UsageError, match="fp16 needs the fp16 export"):
        R.get_backend("onnxruntime", zoo["tae"], "decoder", "fp16", onnx_path=res.onnx_path)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name,prec,match", [
    ("onnxruntime", "bf16", "no bf16 kernels"),
    ("openvino", "fp16", "fp32, bf16 or int8"),
    ("torch", "int8", "precision"),
    ("cuda-magic", "fp32", "unknown backend"),
])
def test_bad_backend_or_precision(zoo, name, prec, match):
    with pytest.raises(UsageError, match=match):
        R.get_backend(name, zoo["tae"], "decoder", prec)


def test_torch_fp16_needs_cuda(zoo):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UsageError, match="CUDA"):
        R.get_backend("torch", zoo["tae"], "decoder", "fp16", device="cpu")


def test_fp16_refused_for_unsafe_model(zoo):
    with pytest.raises(UsageError, match="overflows in fp16"):
        R.get_backend("onnxruntime", zoo["kl"], "decoder", "fp16")


def test_input_validation(zoo):
    r = R.get_backend("onnxruntime", zoo["tae"], "encoder")
    with pytest.raises(UsageError, match="takes 3 channels"):
        r(torch.rand(1, 4, 32, 32))
    with pytest.raises(UsageError, match="multiples of 8"):
        r(torch.rand(1, 3, 36, 32))
    with pytest.raises(UsageError, match=r"float \(B, C, H, W\)"):
        r(torch.zeros(3, 32, 32, dtype=torch.uint8))
    # FLUX.2-style BatchNorm packs 2x2 latents: even latent sizes only
    d = R.get_backend("onnxruntime", zoo["kl"], "decoder")
    with pytest.raises(UsageError, match="latent sizes that are multiples of 2"):
        d(torch.randn(1, 8, 5, 4))


def test_broken_onnxruntime_mix_detected(monkeypatch):
    from importlib import metadata

    real = metadata.version

    def fake(name):
        if name in ("onnxruntime", "onnxruntime-gpu"):
            return "1.0"
        return real(name)

    monkeypatch.setattr(metadata, "version", fake)
    with pytest.raises(BackendUnavailableError, match="onnxruntime and onnxruntime-gpu.*pip uninstall"):
        O.require_onnxruntime()
    assert "onnxruntime-gpu" in R.available_backends()["onnxruntime"]


def test_missing_openvino_falls_back_to_torch(zoo, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(BackendUnavailableError, match=r"vaepack\[openvino\]"):
        R.get_backend("openvino", zoo["tae"], "decoder")
    assert R.available_backends()["openvino"] is not None
    name, prec = R.best_cpu_choice()
    assert name == "torch" and prec == ("bf16" if R.cpu_has_native_bf16() else "fp32")
    r = R.best_cpu_backend(zoo["tae"], "decoder")
    assert isinstance(r, R.TorchRunner) and r.precision == prec
    x = _inputs(zoo["tae"], "decoder")
    assert _rel(r(x), R.get_backend("torch", zoo["tae"], "decoder")(x)) <= BF16


@pytest.mark.skipif(not HAS_OV, reason="OpenVINO not installed")
def test_best_cpu_backend_prefers_openvino(zoo):
    r = R.best_cpu_backend(zoo["tae"], "encoder")
    assert isinstance(r, R.OpenVINORunner)
    assert r.precision == ("bf16" if R.cpu_has_native_bf16() else "fp32")


def test_missing_onnxruntime(zoo, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(O, "onnxruntime_distributions", lambda: [])
    with pytest.raises(BackendUnavailableError, match=r"vaepack\[onnx\]"):
        R.get_backend("onnxruntime", zoo["tae"], "decoder")


def _trt_ready() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(_trt_ready(), reason="TensorRT and a GPU are present")
def test_tensorrt_unavailable_is_clear(zoo):
    with pytest.raises(BackendUnavailableError, match="TensorRT|CUDA"):
        R.get_backend("tensorrt", zoo["tae"], "decoder")


@pytest.mark.gpu
@pytest.mark.skipif(not _trt_ready(), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_runner(zoo):
    model = zoo["tae"]
    r = R.get_backend("tensorrt", model, "decoder", "fp32", profile="preview-512")
    x = _inputs(model, "decoder", size=(256, 256))
    ref = R.get_backend("torch", model, "decoder")(x)
    assert _rel(r(x).cpu(), ref) <= FP32
    with pytest.raises(UsageError, match="outside TensorRT profile 'preview-512'"):
        r(_inputs(model, "decoder", size=(1024, 1024)))
    r16 = R.get_backend("tensorrt", model, "decoder", "fp16", profile="preview-512")
    assert _rel(r16(x).cpu(), ref) <= XP.TOLERANCES["fp16"]


def test_no_side_effects_at_import(tmp_path):
    import subprocess

    import vaepack

    root = os.path.dirname(os.path.dirname(vaepack.__file__))
    env = dict(os.environ, VAEPACK_HOME=str(tmp_path / "home"),
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    code = ("import sys, vaepack.export.onnx, vaepack.export.trt, vaepack.runtime; "
            "bad = [m for m in ('onnx', 'onnxruntime', 'openvino', 'tensorrt') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(tmp_path),
                   timeout=120)
    assert not (tmp_path / "home").exists()


def test_auto_keeps_fp32_for_a_model_whose_bf16_round_trip_is_not_safe():
    from vaepack.manifest import get_model

    student, taef2 = get_model("vaepack-f2-s32"), get_model("taef2")
    assert not student.bf16_safe and taef2.bf16_safe  # measured: -0.11 dB vs -0.016 dB (benchmarks/README.md)
    assert R.best_cpu_choice(student)[1] == "fp32"
    assert R.best_cpu_choice(taef2)[1] == ("bf16" if R.cpu_has_native_bf16() else "fp32")
