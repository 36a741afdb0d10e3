"""vaepack.bench end to end on a tiny random-init TAE (seconds), plus schema, suites and RD."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vaepack.bench import inputs, machine, rd, report, run, schema, suites
from vaepack.errors import UsageError, VaepackError
from vaepack.flops import count_flops, param_bytes, param_count


def tiny_vae(width: int = 8, encoder: bool = True, decoder: bool = True):
    """taef2's manifest entry with a randomly initialized, narrow TAE (no weights needed)."""
    from vaepack.manifest import get_model
    from vaepack.models import tae
    from vaepack.vae import VAE, Part

    torch.manual_seed(0)
    cfg = tae.TAEConfig(kind="f8", latent_channels=32, width=width, midblock_gn=True)
    parts = {}
    if encoder:
        parts["encoder"] = Part(tae.encoder(cfg).eval(), "0,1", True, "random")
    if decoder:
        parts["decoder"] = Part(tae.decoder(cfg).eval(), "0,1", True, "random")
    return VAE(entry=get_model("taef2"), parts=parts)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 48), (37, 45)]):  # the second is cropped to 32x40
        a = rng.random((h // 4 + 1, w // 4 + 1, 3))
        a = np.kron(a, np.ones((4, 4, 1)))[:h, :w]  # blocky, so SSIM windows see structure
        Image.fromarray((a * 255).astype(np.uint8)).save(d / f"img{i}.png")
    return d


@pytest.fixture(scope="module")
def result(data_dir):
    torch.set_num_threads(1)
    return run.run_bench([tiny_vae()], parts=["encoder", "decoder"], precisions=["fp32", "bf16"], sizes=[32],
                           scales=[1, 1.5], batches=[1, 2], data_dir=data_dir, repeat=2, warmup=1)


def test_every_row_complete_and_sane(result):
    schema.validate(result)
    vae = tiny_vae()
    assert result["kind"] == "bench" and result["schema_version"] == schema.SCHEMA_VERSION
    assert not result["interrupted"]
    assert len(result["rows"]) == 2 * 2 * 2 * 2
    m = result["machine"]
    assert m["cpu"] and m["threads"] >= 1 and m["torch"] == torch.__version__
    for r in result["rows"]:
        assert set(r) == set(schema.ROW_FIELDS)
        assert r["status"] == "ok", r["reason"]
        mod = vae.parts[r["part"]].module
        assert r["params"] == param_count(mod)
        assert r["param_mb"] == pytest.approx(param_bytes(mod) / 1e6)
        h = run.work_hw(32, r["scale"], 8)[0]
        shape = (1, 3, h, h) if r["part"] == "encoder" else (1, 32, h // 8, h // 8)
        assert r["input_shape"] == [r["batch"], *shape[1:]]
        assert r["flops_per_image"] == 2 * r["macs_per_image"] == count_flops(mod, shape).flops > 0
        assert 0 < r["latency_ms_min"] <= r["latency_ms_median"] <= r["latency_ms_p90"]
        assert r["runs"] == 2
        assert r["throughput_img_s"] == pytest.approx(r["batch"] / (r["latency_ms_median"] / 1e3))
        assert r["gflops_per_s"] == pytest.approx(r["flops_per_image"] * r["throughput_img_s"] / 1e9)
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0 and r["mem_method"]
        # Random weights reconstruct badly, but the numbers must be real metrics.
        assert 0 < r["psnr"] < 100 and -1 <= r["ssim"] <= 1 and 0 <= r["ms_ssim"] <= 1
        assert r["quality_images"] == 2
    json.loads(schema.to_json(result))


def test_markdown_and_plot(result, tmp_path):
    md = report.to_markdown(result)
    assert md.count("\n| taef2 |") == len(result["rows"])
    report.plot(result, tmp_path / "p.png")
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size[0] > 100


def test_validate_rejects_broken(result):
    import copy

    for breaker, match in [
        (lambda r: r.pop("machine"), "missing 'machine'"),
        (lambda r: r.update(schema_version=99), "schema_version"),
        (lambda r: r["rows"][0].pop("latency_ms_p90"), "latency_ms_p90 missing"),
        (lambda r: r["rows"][0].update(params="big"), "params should be int"),
        (lambda r: r["rows"][0].update(psnr=math.inf), "not finite"),
        (lambda r: r["rows"][0].update(status="fine"), "status"),
        (lambda r: r["rows"][0].update(latency_ms_median=None), "null in an 'ok' row"),
        (lambda r: r["rows"][0].update(status="skipped", reason=None), "without a reason"),
        (lambda r: r.update(interrupted="no"), "interrupted"),
    ]:
        bad = copy.deepcopy(result)
        breaker(bad)
        with pytest.raises(schema.BenchSchemaError, match=match):
            schema.validate(bad)
    assert issubclass(schema.BenchSchemaError, VaepackError)


def test_identical_images_psnr_is_capped():
    x = torch.rand(3, 32, 32)
    q = inputs.mean_metrics([(x, x), (x, x)])
    assert q["psnr"] == 100.0 and q["ssim"] == pytest.approx(1.0) and q["ms_ssim"] == pytest.approx(1.0)


def test_skipped_rows_and_bad_args():
    enc_only = tiny_vae(decoder=False)
    r = run.run_bench([enc_only], parts=["decoder"], sizes=[16], repeat=1, warmup=0)
    (row,) = r["rows"]
    assert row["status"] == "skipped" and "has no decoder" in row["reason"]
    schema.validate(r)
    r = run.run_bench([tiny_vae()], parts=["decoder"], sizes=[16], nfe=[1], repeat=1, warmup=0)
    assert r["rows"][0]["status"] == "skipped" and "nfe" in r["rows"][0]["reason"]
    r = run.run_bench([tiny_vae()], parts=["encoder"], backends=["onnxruntime"], sizes=[16], repeat=1, warmup=0)
    assert r["rows"][0]["status"] == "skipped" and r["rows"][0]["reason"]
    if not torch.cuda.is_available():
        r = run.run_bench([tiny_vae()], parts=["encoder"], precisions=["fp16"], sizes=[16], repeat=1, warmup=0)
        assert r["rows"][0]["status"] == "skipped" and "CUDA" in r["rows"][0]["reason"]
    for kw in ({"backends": ["tflite"]}, {"parts": ["middle"]}, {"precisions": ["int4"]}, {"scales": [0]},
               {"sizes": [-1]}, {"repeat": 0}, {"batches": [1.5]}):
        with pytest.raises(UsageError):
            run.run_bench([tiny_vae()], **kw)
    with pytest.raises(UsageError):
        run.run_bench(["no-such-model"])


def test_interrupt_returns_partial():
    def stop(done, total, row):
        if done == 1:
            raise KeyboardInterrupt

    r = run.run_bench([tiny_vae()], parts=["encoder"], sizes=[16], batches=[1, 2], repeat=1, warmup=0, progress=stop)
    assert r["interrupted"] is True and len(r["rows"]) == 1
    schema.validate(r)
    assert "INTERRUPTED" in report.to_markdown(r)


def test_work_size_and_percentile():
    assert run.work_hw(64, 1.5, 8) == (96, 96)
    assert run.work_hw(100, 1, 8) == (104, 104)
    assert run._percentile([1, 2, 3, 4, 5], 0.5) == 3 and run._percentile([1.0, 2.0], 0.9) == pytest.approx(1.9)


def test_peak_memory_sees_an_allocation():
    with machine.PeakMemory(torch.device("cpu")) as m:
        x = torch.ones(40_000_000 // 4)  # 40 MB, touched
        del x
    assert m.method in ("rss_hwm", "rss_sampled")
    assert m.peak_mb >= 30


def test_rd(data_dir, tmp_path):
    torch.set_num_threads(1)
    r = rd.run_rd(tiny_vae(), data_dir, formats=["fp16", "q8", "q8+zlib"], jpeg_qualities=[50], webp_qualities=[50])
    schema.validate(r)
    rows = {(x["codec"], x["variant"]): x for x in r["rows"]}
    assert set(rows) == {("latent", "fp16"), ("latent", "q8"), ("latent", "q8+zlib"), ("jpeg", "q50"), ("webp", "q50")}
    # 32 channels at 1/64 of the pixels: fp16 = 32 * 16 / 64 = 8 bits per pixel exactly.
    assert rows[("latent", "fp16")]["bpp"] == pytest.approx(8.0)
    assert rows[("latent", "q8")]["bpp"] > 4.0  # 4 bpp of codes plus the per-channel side info
    assert rows[("latent", "q8+zlib")]["bpp"] <= rows[("latent", "q8")]["bpp"] + 0.5
    assert all(0 < x["psnr"] <= 100 and x["images"] == 2 for x in r["rows"])
    md = report.to_markdown(r)
    assert "| jpeg | - | q50 |" in md and "| codec | model | variant |" in md
    assert sum(line.startswith("| latent | ") and " | - | " not in line[:30] for line in md.splitlines()) == 3
    report.plot(r, tmp_path / "rd.png")
    schema.save(r, tmp_path / "rd.json")
    assert schema.load(tmp_path / "rd.json") == r
    with pytest.raises(UsageError):
        rd.run_rd(tiny_vae(), data_dir, formats=["fp8"])
    with pytest.raises(UsageError, match="no decoder"):
        rd.run_rd(tiny_vae(decoder=False), data_dir)


def test_suites_load():
    names = suites.list_suites()
    assert {"table5", "remap", "backends", "rd", "eps-nfe"} <= set(names)
    for n in names:
        s = suites.load_suite(n)
        assert s["kind"] in ("bench", "rd") and isinstance(s["params"], dict)
    assert not any(suites.load_suite(n)["pending"] for n in names)  # every shipped suite is runnable
    assert suites.load_suite("eps-nfe")["params"]["decoder"] in ("taef2-eps", "eps")


def test_pending_suite_refused(tmp_path):
    p = tmp_path / "later.yaml"
    p.write_text("name: later\ndescription: x\nkind: bench\npending: weights not published\nparams: {models: [taef2]}\n")
    assert suites.load_suite(str(p))["pending"] == "weights not published"
    with pytest.raises(UsageError, match="pending"):
        suites.run_suite(str(p))
    with pytest.raises(UsageError, match="unknown benchmark suite"):
        suites.load_suite("nope")


def test_taef2_64px(shared_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("VAEPACK_MIRROR", str(shared_weights))
    monkeypatch.setenv("VAEPACK_HOME", str(tmp_path))
    from vaepack.runtime import load_vae

    r = run.run_bench(["taef2"], parts=["encoder"], sizes=[64], repeat=2, warmup=1)
    schema.validate(r)
    (row,) = r["rows"]
    assert row["status"] == "ok"
    assert row["params"] == param_count(load_vae("taef2", parts=("encoder",)).parts["encoder"].module)
    assert row["flops_per_image"] > 1e9 and row["latency_ms_median"] > 0


def test_suite_overrides_replace_and_none_removes(tmp_path, monkeypatch):
    p = tmp_path / "s.yaml"
    p.write_text("name: s\ndescription: x\nkind: bench\nparams: {models: [taef2], nfe: [1, 2], repeat: 5}\n")
    seen = {}
    real = run.run_bench

    def fake(*args, **kw):  # same signature check as the real one, then record what it was given
        import inspect

        inspect.signature(real).bind(*args, **kw)
        seen.update({k: v for k, v in kw.items() if k != "progress"})
        return {"config": {}}

    import inspect

    fake.__signature__ = inspect.signature(real)  # load_suite checks suite params against it

    monkeypatch.setattr(run, "run_bench", fake)
    res = suites.run_suite(str(p), repeat=2, nfe=None, crop=64)
    assert seen == {"models": ["taef2"], "repeat": 2, "crop": 64} and res["config"]["suite"] == "s"


def test_eps_decoder_rows_per_nfe(shared_weights, tmp_path, monkeypatch):
    """The shipped diffusion decoder gets one row per NFE; its cost grows with NFE (paper 004's axis)."""
    monkeypatch.setenv("VAEPACK_MIRROR", str(shared_weights))
    monkeypatch.setenv("VAEPACK_HOME", str(tmp_path))
    r = run.run_bench(["taef2"], parts=["decoder"], decoder="eps", sizes=[32], nfe=[1, 3], repeat=1, warmup=0,
                      threads=1)
    schema.validate(r)
    one, three = r["rows"]
    assert (one["status"], three["status"]) == ("ok", "ok"), (one["reason"], three["reason"])
    assert (one["nfe"], three["nfe"]) == (1, 3) and one["network"] == "taef2-eps"
    assert three["flops_per_image"] > one["flops_per_image"] > 0
    det = run.run_bench(["taef2"], parts=["decoder"], sizes=[32], nfe=[1], repeat=1, warmup=0, threads=1)
    assert det["rows"][0]["status"] == "skipped" and "nfe" in det["rows"][0]["reason"]
