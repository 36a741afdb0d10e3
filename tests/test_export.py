"""ONNX export: dynamic shapes, checker, sidecar, parity, atomic writes, refusal of stale artifacts,
TensorRT profiles (engine builds themselves are `gpu` tests).

Models: tiny random-init members of every family that exists (TAE f8/f32, AutoencoderKL with FLUX.2
BatchNorm statistics, the student, the eps-VAE decoder's denoiser step) in a private
manifest + mirror, and the real TAEF2/TAESana weights when ../shared/weights is present.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from vaepack.backends import artifacts as A
from vaepack.backends import profiles as PF
from vaepack.export import graph as G
from vaepack.export import onnx as XO
from vaepack.export import parity as XP
from vaepack.export import trt as XT
from vaepack.errors import BackendUnavailableError, ExportError, UsageError
from vaepack.paths import manifest_path, shared_dir

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SHARED_WEIGHTS = (shared_dir() / "weights") if shared_dir() else None
HAS_TAEF2 = bool(SHARED_WEIGHTS and (SHARED_WEIGHTS / "taef2_decoder.pth").is_file())
SIZES = ((32, 32), (48, 80))  # small parity sizes: multiples of 16 (FLUX.2 packing) and non-square


# --------------------------------------------------------------------------- a private model zoo
def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_zoo(root: Path, mp: pytest.MonkeyPatch, seed: int = 0) -> dict[str, str]:
    """Write tiny random-init models to a mirror and a manifest (the real one plus these), point
    vaepack at them and at a private cache. Returns the ids of the tiny models present."""
    from safetensors.torch import save_file

    from vaepack.loader import build_part
    from vaepack.manifest import PartSpec

    mp.delenv("VAEPACK_MANIFEST", raising=False)
    data = yaml.safe_load(manifest_path().read_text())
    data["spaces"]["tinyflux2"] = {"channels": 8, "factor": 8, "scale": 1.0, "shift": 0.0, "norm": "flux2_bn"}
    mirror = root / "mirror"
    mirror.mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}

    def add(key, mid, space, parts, fp16_safe=True):
        entry = {}
        for part, (family, cfg) in parts.items():
            torch.manual_seed(seed + len(ids) * 10 + len(entry))
            m = build_part(PartSpec(part, family, cfg, ()), mid)
            with torch.no_grad():
                for prm in m.parameters():  # no zero-initialised layers: every path shows in parity
                    prm.add_(torch.randn_like(prm) * 0.02)
                for name, buf in m.named_buffers():
                    if name.endswith("running_mean"):
                        buf.normal_(0, 0.5)
                    elif name.endswith("running_var"):
                        buf.uniform_(0.5, 2.0)
            f = mirror / f"{mid}-{part}-{seed}.safetensors"
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(f))
            entry[part] = {"family": family, "config": cfg,
                           "files": [{"name": f.name, "url": None, "size": f.stat().st_size, "sha256": _sha(f)}]}
        data["models"][mid] = {"description": "test", "license": "MIT", "space": space,
                               "fp16_safe": fp16_safe, "parts": entry}
        ids[key] = mid

    tae = {"kind": "f8", "latent_channels": 4, "width": 16, "midblock_gn": True}
    add("tae", "tiny-tae", "sd1", {"encoder": ("tae", tae), "decoder": ("tae", tae)})
    add("tae32", "tiny-tae32", "sana", {"encoder": ("tae", {"kind": "f32", "latent_channels": 32, "width": 16})})
    kl = {"latent_channels": 8, "block_out": [16, 16, 32, 32], "layers_per_block": 1, "norm_groups": 8,
          "quant_conv": True, "flux2_bn": True}
    add("kl", "tiny-kl", "tinyflux2", {"encoder": ("kl", kl), "decoder": ("kl", kl)}, fp16_safe=False)
    kl3 = dict(kl, latent_channels=16, flux2_bn=False, quant_conv=False)
    add("kl_sd3", "tiny-kl-sd3", "sd3", {"encoder": ("kl", kl3), "decoder": ("kl", kl3)})
    add("student", "tiny-student", "sd1",
        {"encoder": ("student", {"width": 8, "latent_channels": 4, "fused": True, "stage_blocks": [1, 1, 1]})})
    add("eps", "tiny-eps", "sd1", {"decoder": ("eps", {"latent_channels": 4, "width": 8, "mults": [1, 2],
                                                       "groups": 4, "steps": 1})})

    man = root / f"manifest-{seed}.yaml"
    man.write_text(yaml.safe_dump(data, sort_keys=False))
    mirrors = [str(mirror)] + ([str(SHARED_WEIGHTS)] if SHARED_WEIGHTS else [])
    mp.setenv("VAEPACK_MANIFEST", str(man))
    mp.setenv("VAEPACK_MIRROR", os.pathsep.join(mirrors))
    mp.setenv("VAEPACK_HOME", str(root / "home"))
    return ids


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        yield make_zoo(tmp_path_factory.mktemp("zoo"), mp)


@pytest.fixture
def out(tmp_path):
    return tmp_path / "artifacts"


@pytest.fixture(scope="module")
def tae_decoder(zoo, tmp_path_factory):
    """One shared fp32 export for the tests that only read an artifact."""
    return XO.export_onnx(zoo["tae"], "decoder", tmp_path_factory.mktemp("shared"), parity_sizes=SIZES)


# --------------------------------------------------------------------------- helpers
def assert_dynamic(onnx_path: Path, names=("batch", "height", "width")):
    m = onnx.load(str(onnx_path))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[0] and isinstance(dims[2], str) and isinstance(dims[3], str), dims
    onnx.checker.check_model(str(onnx_path), full_check=True)


def run_ort(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


def check_sidecar(res: XO.ExportResult, model: str, part: str, precision: str = "fp32"):
    sc = json.loads(res.sidecar_path.read_text())
    assert sc == res.sidecar
    assert sc["model"] == model and sc["part"] == part and sc["precision"] == precision
    assert sc["opset"] == A.DEFAULT_OPSET and sc["onnx_sha256"] == _sha(res.onnx_path)
    from vaepack.loader import load_part

    assert sc["weights_sha256"] == load_part(model, "decoder" if part == "eps-step" else part)[2]
    assert {"vaepack", "torch", "onnx", "onnxruntime"} <= set(sc["versions"])
    assert sc["inputs"][0]["shape"][0] == "batch" and sc["exporter"] == "torchscript"
    p = sc["parity"]
    assert p["passed"] and p["max_abs_err"] <= p["tolerance_rel"] * max(c["output_range"] for c in p["checks"])
    sizes = {tuple(c["shape"][-2:]) for c in p["checks"]}
    assert len(sizes) == 2, "parity runs at two spatial sizes"
    kinds = {c["input"].split(":")[0] for c in p["checks"]}
    assert "random" in kinds
    return sc


# --------------------------------------------------------------------------- exports per family
@pytest.mark.parametrize("part", ["encoder", "decoder"])
@pytest.mark.parametrize("conv", [True, False])
def test_tae_f8_export(zoo, out, part, conv):
    res = XO.export_onnx(zoo["tae"], part, out, include_convention=conv, parity_sizes=SIZES)
    assert res.onnx_path == out / f"tiny-tae-{part}-fp32-op{A.DEFAULT_OPSET}{'' if conv else '-raw'}.onnx"
    assert res.sidecar_path == res.onnx_path.with_suffix(".json")
    sc = check_sidecar(res, zoo["tae"], part)
    assert sc["include_convention"] is conv
    assert {c["input"].split(":")[0] for c in sc["parity"]["checks"]} == {"random", "real"}
    assert_dynamic(res.onnx_path)
    # A third size and batch, not seen at export: the graph is really dynamic.
    from vaepack.runtime import load_vae

    vae = load_vae(zoo["tae"], parts=(part,))
    x = torch.rand(3, 3, 40, 24) if part == "encoder" else torch.randn(3, 4, 5, 3)
    ref = vae.encode(x) if part == "encoder" else vae.decode(x)
    got = A.graph_post(sc, run_ort(res.onnx_path, A.graph_pre(sc, x)))
    assert (got - ref).abs().max() <= 1e-4 * (ref.max() - ref.min())


def test_tae_f32_encoder_export(zoo, out):
    res = XO.export_onnx(zoo["tae32"], "encoder", out, parity_sizes=((64, 64), (96, 160)))
    sc = check_sidecar(res, zoo["tae32"], "encoder")
    assert sc["factor"] == 32 and sc["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert sc["outputs"][0]["shape"] == ["batch", 32, "latent_height", "latent_width"]
    assert_dynamic(res.onnx_path)


@pytest.mark.skipif(not HAS_TAEF2, reason="needs ../shared/weights (TAEF2)")
@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_real_taef2_export(zoo, out, part):
    res = XO.export_onnx("taef2", part, out)  # default parity sizes, real weights, real image
    sc = check_sidecar(res, "taef2", part)
    assert sc["parity"]["max_rel_err"] <= XP.TOLERANCES["fp32"]
    # TAEF2 outputs FLUX.2's normalized *unpacked* latent: no 2x2 packing, so multiples of 8 suffice
    # (a KL FLUX.2 export needs 16, see test_kl_flux2_bn_export).
    assert sc["space"]["norm"] == "flux2_bn" and sc["size_multiple"] == 8


@pytest.mark.skipif(not HAS_TAEF2, reason="needs ../shared/weights (TAESana)")
def test_real_taesana_export(zoo, out):
    res = XO.export_onnx("taesana", "encoder", out)
    check_sidecar(res, "taesana", "encoder")


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_da_export(out, part):
    """DA-VAE (embedded weights): the encoder's antialiased 2x downsample has no ONNX op, so it is
    traced as models.da.half_fir; parity at two sizes and a third one unseen at export."""
    res = XO.export_onnx("taef2-da", part, out, parity_sizes=((64, 64), (96, 160)))
    sc = check_sidecar(res, "taef2-da", part)
    assert sc["parity"]["max_rel_err"] <= XP.TOLERANCES["fp32"] and sc["size_multiple"] == 16
    assert_dynamic(res.onnx_path)
    from vaepack.runtime import load_vae

    vae = load_vae("da", parts=(part,))
    torch.manual_seed(0)
    x = torch.rand(1, 3, 80, 48) if part == "encoder" else torch.randn(1, 64, 5, 3)
    ref = vae.encode(x) if part == "encoder" else vae.decode(x)
    got = A.graph_post(sc, run_ort(res.onnx_path, A.graph_pre(sc, x)))
    assert (got - ref).abs().max() <= 1e-4 * (ref.max() - ref.min())


@pytest.mark.parametrize("part", ["encoder", "decoder"])
@pytest.mark.parametrize("conv", [True, False])
def test_kl_flux2_bn_export(zoo, out, part, conv):
    res = XO.export_onnx(zoo["kl"], part, out, include_convention=conv, parity_sizes=SIZES)
    sc = check_sidecar(res, zoo["kl"], part)
    assert sc["image_range"] == "-1,1" and sc["native_is_diffusion"] is False
    assert len(sc["bn_stats"]["running_mean"]) == 32  # 4 x 8 packed channels, recorded for runners
    assert sc["size_multiple"] == 16  # the convention packs 2x2 latent pixels
    assert_dynamic(res.onnx_path)


def test_kl_scale_shift_decoder_export(zoo, out):
    res = XO.export_onnx(zoo["kl_sd3"], "decoder", out, parity_sizes=SIZES)
    check_sidecar(res, zoo["kl_sd3"], "decoder")


def test_student_export(zoo, out):
    res = XO.export_onnx(zoo["student"], "encoder", out, parity_sizes=SIZES)
    check_sidecar(res, zoo["student"], "encoder")
    assert_dynamic(res.onnx_path)


def test_eps_step_export(zoo, out):
    res = XO.export_onnx(zoo["eps"], "eps-step", out, parity_sizes=SIZES)
    sc = check_sidecar(res, zoo["eps"], "eps-step")
    assert [t["name"] for t in sc["inputs"]] == ["x_t", "t", "z"] and sc["outputs"][0]["name"] == "v"
    assert sc["include_convention"] is False
    m = onnx.load(str(res.onnx_path))
    assert [i.name for i in m.graph.input] == ["x_t", "t", "z"]


@pytest.mark.slow
def test_dynamo_exporter(zoo, out):
    res = XO.export_onnx(zoo["tae"], "decoder", out, exporter="dynamo", opset=18, parity_sizes=SIZES)
    assert res.sidecar["exporter"] == "dynamo" and res.parity["passed"]
    assert_dynamic(res.onnx_path)


def test_eps_step_needs_eps_family(zoo, out):
    with pytest.raises(UsageError, match="eps-VAE"):
        XO.export_onnx(zoo["tae"], "eps-step", out)


def test_eps_sampler_is_not_one_graph(zoo, out):
    with pytest.raises(UsageError, match="eps-step"):
        XO.export_onnx(zoo["eps"], "decoder", out)


# --------------------------------------------------------------------------- precisions
def test_fp16_export(zoo, out):
    res = XO.export_onnx(zoo["tae"], "decoder", out, precision="fp16", parity_sizes=SIZES)
    sc = check_sidecar(res, zoo["tae"], "decoder", "fp16")
    assert sc["graph_precision"] == "fp16" and sc["io_dtype"] == "float32"
    assert sc["parity"]["tolerance_rel"] == XP.TOLERANCES["fp16"]
    m = onnx.load(str(res.onnx_path))
    types_ = {i.data_type for i in m.graph.initializer if len(i.dims) == 4}
    assert types_ == {onnx.TensorProto.FLOAT16}  # conv weights are fp16
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    fp32 = XO.export_onnx(zoo["tae"], "decoder", out, parity_sizes=SIZES)
    assert res.onnx_path.stat().st_size < 0.7 * fp32.onnx_path.stat().st_size


def test_fp16_refused_for_unsafe_model(zoo, out):
    with pytest.raises(UsageError, match="fp16"):
        XO.export_onnx(zoo["kl"], "decoder", out, precision="fp16")
    assert not out.exists() or not any(out.iterdir())


def test_bf16_export_is_fp32_graph(zoo, out):
    res = XO.export_onnx(zoo["tae"], "decoder", out, precision="bf16", parity_sizes=SIZES)
    sc = res.sidecar
    assert sc["precision"] == "bf16" and sc["graph_precision"] == "fp32"
    has_ov = importlib.util.find_spec("openvino") is not None
    assert sc["parity"]["precision_checked"] == ("bf16" if has_ov else "fp32")
    assert sc["parity"]["runtime"].startswith("openvino" if has_ov else "onnxruntime")


def _no_onnxruntime(monkeypatch):
    from vaepack.backends import optional as O

    def missing():
        raise BackendUnavailableError("the onnxruntime backend needs the 'onnxruntime' package")
    monkeypatch.setattr(O, "require_onnxruntime", missing)


def test_openvino_alone_checks_parity(zoo, out, monkeypatch):
    """The `openvino` extra does not install onnxruntime: fp32 exports are then checked on OpenVINO."""
    pytest.importorskip("openvino")
    _no_onnxruntime(monkeypatch)
    res = XO.export_onnx(zoo["tae"], "decoder", out, parity_sizes=SIZES)
    assert res.parity["passed"] and res.parity["runtime"].startswith("openvino")
    assert res.parity["precision_checked"] == "fp32"


def test_fp16_needs_onnxruntime_for_parity(zoo, out, monkeypatch):
    _no_onnxruntime(monkeypatch)  # OpenVINO's CPU plugin has no fp16 graphs: nothing can check one
    with pytest.raises(BackendUnavailableError, match="onnxruntime"):
        XO.export_onnx(zoo["tae"], "decoder", out, precision="fp16", parity_sizes=SIZES)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kw,match", [({"precision": "int8"}, "precision"), ({"opset": 9}, "opset"),
                                      ({"part": "middle"}, "part"), ({"exporter": "jit"}, "exporter")])
def test_bad_arguments(zoo, out, kw, match):
    args = {"part": "decoder", **kw}
    part = args.pop("part")
    with pytest.raises(UsageError, match=match):
        XO.export_onnx(zoo["tae"], part, out, **args)


def test_part_missing(zoo, out):
    with pytest.raises(UsageError, match="has no decoder"):
        XO.export_onnx(zoo["tae32"], "decoder", out)


# --------------------------------------------------------------------------- atomicity, refusal
def _listing(d: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in d.iterdir()} if d.exists() else {}


def test_parity_failure_writes_nothing(zoo, out):
    good = XO.export_onnx(zoo["tae"], "decoder", out, parity_sizes=SIZES)
    before = _listing(out)
    with pytest.raises(ExportError, match="parity check failed.*nothing was written"):
        XO.export_onnx(zoo["tae"], "decoder", out, parity_sizes=SIZES, tolerance=-1.0)
    assert _listing(out) == before  # old artifact intact, no temp files left
    A.verify_artifact(good.onnx_path)


def test_exporter_crash_leaves_no_partial_file(zoo, out, monkeypatch):
    def boom(graph, example, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise ExportError("simulated exporter failure")

    monkeypatch.setattr(G, "torch_export", boom)
    with pytest.raises(ExportError, match="simulated"):
        XO.export_onnx(zoo["tae"], "encoder", out, parity_sizes=SIZES)
    assert _listing(out) == {}


def test_refuses_mismatched_sidecar(zoo, out):
    res = XO.export_onnx(zoo["tae"], "encoder", out, parity_sizes=SIZES)
    A.verify_artifact(res.onnx_path)
    sc = json.loads(res.sidecar_path.read_text())
    res.sidecar_path.write_text(json.dumps(dict(sc, weights_sha256="0" * 64)))
    with pytest.raises(ExportError, match="re-export"):
        A.verify_artifact(res.onnx_path)
    res.sidecar_path.write_text(json.dumps(sc))
    with open(res.onnx_path, "ab") as f:  # same sidecar, different file
        f.write(b"\0")
    with pytest.raises(ExportError, match="does not match its sidecar"):
        A.verify_artifact(res.onnx_path)
    res.sidecar_path.unlink()
    with pytest.raises(ExportError, match="no sidecar"):
        A.verify_artifact(res.onnx_path)


def test_refuses_export_of_replaced_weights(tmp_path, out):
    """The model's weights change after the export (new file, new hash): the artifact is refused."""
    with pytest.MonkeyPatch.context() as mp:
        ids = make_zoo(tmp_path / "a", mp, seed=0)
        res = XO.export_onnx(ids["tae"], "encoder", out, parity_sizes=SIZES)
        make_zoo(tmp_path / "b", mp, seed=7)  # same model id, different weights
        with pytest.raises(ExportError, match="exported from weights"):
            A.verify_artifact(res.onnx_path)


def test_output_exists_without_force(zoo, out):
    XO.export_onnx(zoo["tae"], "encoder", out, parity_sizes=SIZES)
    from vaepack.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        XO.export_onnx(zoo["tae"], "encoder", out, parity_sizes=SIZES, force=False)


def test_default_out_dir(zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = XO.export_onnx(zoo["tae"], "encoder", parity_sizes=SIZES)
    assert res.onnx_path.parent == tmp_path / "export" / "artifacts"


# --------------------------------------------------------------------------- TensorRT profiles
@pytest.mark.parametrize("name", ["preview-512", "hires-1024", "batch-256"])
def test_shipped_profiles(name):
    p = PF.load_profile(name)
    assert p.name == name and p.batch.min <= p.batch.opt <= p.batch.max
    assert p.precision_for("tae", True) == "fp16"
    assert p.precision_for("kl", False) == "bf16"  # SDXL/FLUX-class decoders never get fp16
    assert p.precision_for("kl", True) == "fp16"
    assert name in PF.list_profiles()


def test_profile_shapes_and_refusal(tae_decoder):
    res = tae_decoder
    p = PF.load_profile("preview-512")
    shapes = PF.profile_shapes(p, res.sidecar)
    assert shapes["latent"] == ((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 64, 64))
    PF.check_profile_shape(p, res.sidecar, (2, 4, 64, 48))
    with pytest.raises(UsageError, match="outside TensorRT profile 'preview-512'"):
        PF.check_profile_shape(p, res.sidecar, (1, 4, 128, 128))  # 1024 px
    with pytest.raises(UsageError, match="preview-512"):
        PF.check_profile_shape(p, res.sidecar, (8, 4, 64, 64))  # batch 8


def test_profile_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown TensorRT profile 'nope'.*preview-512"):
        PF.load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbatch: {min: 4, opt: 1, max: 2}\nheight: {min: 8, opt: 8, max: 8}\n"
                   "width: {min: 8, opt: 8, max: 8}\n")
    with pytest.raises(UsageError, match=r"bad\.yaml.*min <= opt <= max"):
        PF.load_profile(bad)
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UsageError, match="invalid YAML"):
        PF.load_profile(bad)
    bad.write_text("batch: {min: 1, opt: 1, max: 1}\nheight: {min: 8, opt: 8, max: 8}\n"
                   "width: {min: 8, opt: 8, max: 8}\nprecision: {tae: [int4]}\n")
    with pytest.raises(UsageError, match="int4"):
        PF.load_profile(bad)


def _trt_ready() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(_trt_ready(), reason="TensorRT and a GPU are present")
def test_trt_build_fails_clearly_without_gpu(tae_decoder):
    with pytest.raises(BackendUnavailableError, match="TensorRT|CUDA"):
        XT.build_trt_engine(tae_decoder.onnx_path, "preview-512")


@pytest.mark.skipif(_trt_ready(), reason="TensorRT and a GPU are present")
def test_export_trt_checks_tensorrt_before_exporting(zoo, out):
    with pytest.raises(BackendUnavailableError):
        XT.export_trt(zoo["tae"], "decoder", "preview-512", out_dir=out)
    assert not out.exists() or not any(out.iterdir())


def test_parity_summary(tae_decoder):
    res = tae_decoder
    lines = XP.parity_summary(res.parity)
    assert len(lines) == len(res.parity["checks"]) + 1 and lines[-1].startswith("parity passed")


def test_trt_refuses_fp16_for_unsafe_before_building(zoo, out):
    res = XO.export_onnx(zoo["kl"], "decoder", out, parity_sizes=SIZES)
    with pytest.raises(UsageError, match="overflows in fp16"):
        XT.build_trt_engine(res.onnx_path, "preview-512", "fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not _trt_ready(), reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_engine_build_and_parity(zoo, out, precision):
    res = XO.export_onnx(zoo["tae"], "decoder", out, precision=precision, parity_sizes=SIZES)
    eng = XT.build_trt_engine(res.onnx_path, "preview-512", precision)
    esc = A.read_engine_sidecar(eng)
    assert esc["parity"]["passed"] and esc["engine_precision"] == precision
    assert esc["strongly_typed"] is True and Path(esc["timing_cache"]).is_file()
