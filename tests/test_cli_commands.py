"""CLI wiring of export, --backend and bench (the libraries have their own tests)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def photo_crop(tmp_path, dev_photo, shared_weights):
    from PIL import Image

    p = tmp_path / "crop.png"
    Image.open(dev_photo).convert("RGB").crop((0, 0, 72, 56)).save(p)
    return p


def test_export_cli_writes_onnx_and_sidecar(run_cli, tmp_path, shared_weights, one_thread):
    out = tmp_path / "art"
    code, stdout, err = run_cli("export", "taef2", "--part", "encoder", "-o", out, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    sidecar = json.loads(open(res["sidecar"]).read())
    assert res["parity"]["passed"] is True
    assert sidecar["weights_sha256"] and sidecar["opset"]
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".onnx"]  # no temp files left


def test_export_trt_without_tensorrt_is_one_clean_line(run_cli, tmp_path, clean_error, shared_weights):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed")
    except ImportError:
        pass
    code, _, err = run_cli("export", "taef2", "--trt", "-o", tmp_path)
    assert code == 1
    clean_error(err, "tensorrt")
    assert not any(tmp_path.iterdir())


def test_roundtrip_backend_onnxruntime_matches_torch(run_cli, photo_crop, one_thread):
    pytest.importorskip("onnxruntime")
    res = {}
    for b in ("torch", "onnxruntime"):
        code, out, err = run_cli("roundtrip", photo_crop, "-m", "taef2", "--backend", b, "--json")
        assert code == 0, err
        res[b] = json.loads(out)["ok"][0]["psnr"]
    assert res["onnxruntime"] == pytest.approx(res["torch"], abs=0.01)


def test_unknown_backend_is_usage_error(run_cli, photo_crop, clean_error):
    code, _, err = run_cli("roundtrip", photo_crop, "-m", "taef2", "--backend", "tflite")
    assert code == 2
    clean_error(err, "tflite")


def test_bench_cli_json(run_cli, tmp_path, shared_weights, one_thread):
    out = tmp_path / "b.json"
    code, stdout, err = run_cli("bench", "--models", "taef2", "--parts", "encoder", "--sizes", "64",
                                "--repeat", "2", "--warmup", "1", "--json", out)
    assert code == 0, err
    from vaepack.bench import load, validate

    res = load(out)
    validate(res)
    (row,) = res["rows"]
    assert row["status"] == "ok" and row["latency_ms_median"] > 0 and row["params"] > 1_000_000


def test_decode_with_eps_decoder_is_seeded_and_restores_size(run_cli, photo_crop, tmp_path, one_thread):
    import numpy as np
    from PIL import Image

    lat = tmp_path / "c.latent.safetensors"
    assert run_cli("encode", photo_crop, "-m", "taef2", "--scale", "1.5", "-o", lat)[0] == 0
    outs = []
    for i in range(2):
        o = tmp_path / f"r{i}.png"
        code, _, err = run_cli("decode", lat, "--decoder", "eps", "--steps", "2", "--seed", "7", "-o", o)
        assert code == 0, err
        outs.append(np.asarray(Image.open(o)))
    assert outs[0].shape == (56, 72, 3)
    assert np.array_equal(outs[0], outs[1])  # --seed: bit-identical on the same machine


def test_steps_on_a_deterministic_decoder_is_a_usage_error(run_cli, photo_crop, tmp_path, clean_error):
    lat = tmp_path / "c.latent.safetensors"
    assert run_cli("encode", photo_crop, "-m", "taef2", "-o", lat)[0] == 0
    code, _, err = run_cli("decode", lat, "--steps", "3", "-o", tmp_path / "r.png")
    assert code == 2
    clean_error(err, "deterministic")
