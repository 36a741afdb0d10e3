"""Modelability benchmark (issue 15, section 1): the latent flow model, the Frechet distance, the
benchmark's reproducibility and its one-line errors.

The benchmark runs on a tiny random TAE model (space ``tiny8``: 4 channels, f8) from a temporary
manifest and generated photos, with a tiny flow model, so every test takes seconds."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from vaepack.errors import UsageError
from vaepack.paths import manifest_path

TINY = {"kind": "f8", "latent_channels": 4, "width": 8, "blocks": [1, 1, 1, 1]}


def _part(root: Path, name: str, part: str, seed: int) -> dict:
    from safetensors.torch import save_file

    from vaepack.loader import build_part
    from vaepack.manifest import PartSpec

    torch.manual_seed(seed)
    sd = build_part(PartSpec(part, "tae", TINY, ())).state_dict()
    f = root / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    return {"family": "tae", "config": TINY, "files": [{"name": name, "url": None, "size": f.stat().st_size,
                                                        "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}]}


def _photos(d: Path, n: int, seed: int, size=(136, 144)) -> Path:
    from vaepack.io import save_image

    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = F.interpolate(torch.rand(1, 3, size[0] // 8, size[1] // 8, generator=g), size, mode="bilinear",
                          align_corners=False)[0]
        save_image(d / f"img{i}.png", x)
    return d


@pytest.fixture
def tiny(tmp_path, monkeypatch, one_thread):
    """A manifest with the tiny encoders ``tiny-a`` and ``tiny-b``, and train / held-out photo folders."""
    data = yaml.safe_load(manifest_path().read_text())
    data["spaces"]["tiny8"] = {"channels": 4, "factor": 8}
    for mid, seed in (("tiny-a", 0), ("tiny-b", 1)):
        data["models"][mid] = {"description": "t", "license": "MIT", "space": "tiny8",
                               "parts": {"encoder": _part(tmp_path, f"{mid}.safetensors", "encoder", seed)}}
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setenv("VAEPACK_MANIFEST", str(tmp_path / "manifest.yaml"))
    monkeypatch.setenv("VAEPACK_MIRROR", str(tmp_path))
    monkeypatch.setenv("VAEPACK_HOME", str(tmp_path / "home"))
    return tmp_path, _photos(tmp_path / "train", 3, 0), _photos(tmp_path / "dev", 2, 1, (128, 160))


def _cfg(root: Path, train: Path, dev: Path, models=("tiny-a", "tiny-b@1.5"), steps=12, seed=0):
    from vaepack import modelability as M

    return M.ModelabilityConfig(models=list(models), data=train, heldout=dev, backend="torch", device="cpu",
                                train=M.FlowTrainConfig(steps=steps, batch=4, seed=seed, width=16, blocks=1,
                                                        time_dim=16, warmup=2),
                                samples=8, sample_steps=2)


# ----------------------------------------------------------------------------- the flow model
def test_latent_flow_is_resolution_agnostic_and_starts_at_zero_velocity():
    from vaepack.models.latent_flow import LatentFlow, LatentFlowConfig, parameter_count

    m = LatentFlow(LatentFlowConfig(channels=32))
    assert 0.5e6 <= parameter_count(m) <= 2e6  # the size at the default
    for shape in ((2, 32, 16, 16), (1, 32, 23, 37)):
        v = m(torch.randn(shape), torch.rand(shape[0]))
        assert v.shape == shape and torch.count_nonzero(v) == 0  # zero-initialized head
    with pytest.raises(ValueError, match="groups"):
        LatentFlowConfig(width=30, groups=8)
    with pytest.raises(ValueError, match=r"\(B, 32, H, W\)"):
        m(torch.randn(1, 4, 8, 8), torch.rand(1))


def test_flow_loss_falls_on_a_tiny_run(one_thread):
    from vaepack import modelability as M

    # structured "latents": a smooth field plus a channel correlation, so there is something to learn
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.randn(6, 1, 6, 6, generator=g), (24, 24), mode="bilinear", align_corners=False)
    lat = [torch.cat([b, 0.8 * b + 0.2 * torch.randn(1, 24, 24, generator=g), -b, b * b - 1]) for b in base]
    cfg = M.FlowTrainConfig(steps=150, batch=8, crop=8, lr=2e-3, width=16, blocks=2, time_dim=16, warmup=10)
    model, losses = M.train_flow(lat, cfg)
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert first > 1.0 and last < 0.8 * first, (first, last)
    crops = M.grid_crops(lat, 8)
    untrained = M.heldout_loss(M.new_flow(cfg, 4), crops, seed=1)
    trained = M.heldout_loss(model, crops, seed=1)
    assert trained["overall"] < 0.8 * untrained["overall"]
    # the untrained net predicts v = 0: its loss is E|eps - x0|^2 = 1 + E x0^2 in every bucket
    ex2 = float(crops.pow(2).mean())
    assert untrained["overall"] == pytest.approx(1 + ex2, rel=0.1)
    assert len(trained["buckets"]) == 4 and trained["overall"] == pytest.approx(sum(trained["buckets"]) / 4)


# ----------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_matches_the_scipy_oracle():
    linalg = pytest.importorskip("scipy.linalg")
    from vaepack import modelability as M

    g = torch.Generator().manual_seed(0)
    for d in (3, 16):
        a = torch.randn(400, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
        b = torch.randn(300, d, generator=g, dtype=torch.float64) * 2 + 0.5
        mu1, s1 = M.gaussian_fit(a)
        mu2, s2 = M.gaussian_fit(b)
        covmean = linalg.sqrtm(s1.numpy() @ s2.numpy())
        want = float(((mu1 - mu2) ** 2).sum()) + float(s1.trace() + s2.trace()) - 2 * float(covmean.real.trace())
        assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-7, abs=1e-9)
        assert M.frechet_between(a, a) == pytest.approx(0.0, abs=1e-7)
    # N(0, I) vs N(m, s^2 I) in d dims: d m^2 + d (1 - s)^2
    assert M.frechet_distance(torch.zeros(4), torch.eye(4), torch.full((4,), 0.5), 4 * torch.eye(4)) == \
        pytest.approx(4 * 0.25 + 4 * 1.0)


def test_tokens_and_patches_layout():
    from vaepack import modelability as M

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert M.tokens(x).shape == (32, 3) and torch.equal(M.tokens(x)[1], x[0, :, 0, 1])
    p = M.patches2x2(x)
    assert p.shape == (8, 12)
    assert sorted(p[0].tolist()) == sorted(x[0, :, :2, :2].flatten().tolist())


# ----------------------------------------------------------------------------- the benchmark
def test_modelability_is_reproducible_with_a_fixed_seed(tiny):
    from vaepack import modelability as M

    root, train, dev = tiny
    a = M.run_modelability(_cfg(root, train, dev))
    b = M.run_modelability(_cfg(root, train, dev))
    for ra, rb in zip(a["models"], b["models"], strict=True):
        ra.pop("seconds"), rb.pop("seconds")
        assert ra == rb
    r1, r2 = a["models"]
    assert (r1["spec"], r2["spec"]) == ("tiny-a", "tiny-b@1.5")
    # like with like: the 1.5x remap writes 1.5x the latent pixels of the first held-out photo (128x160)
    assert r1["example"]["latent_shape"] == [4, 16, 20] and r2["example"]["latent_shape"] == [4, 24, 30]
    assert r2["pixels_per_latent"] == pytest.approx(8 / 1.5)
    assert r1["heldout_crops"] == 2 and r2["heldout_crops"] == 2 * 1 * 1  # 16x20 -> 1 crop, 24x30 -> 1 crop
    for r in (r1, r2):
        assert len(r["norm"]["mean"]) == 4 and all(s > 0 for s in r["norm"]["std"])
        vals = [r["heldout_loss"], *r["heldout_loss_buckets"], r["fd_tokens"], r["fd_patches"]]
        assert all(math.isfinite(v) and v >= 0 for v in vals)
    # another seed gives other numbers (the seed reaches the run)
    c = M.run_modelability(_cfg(root, train, dev, models=("tiny-a",), seed=1))
    assert c["models"][0]["heldout_loss"] != r1["heldout_loss"]


def test_training_statistics_normalize_the_latents(tiny):
    from vaepack import modelability as M

    root, train, dev = tiny
    from vaepack.train.common import load_images

    vae = M.load_encoder("tiny-a", "torch", "cpu")
    lat, ran = M.encode_images(vae, load_images(train))
    assert ran == {"backend": "torch", "dtype": "fp32"}
    mean, std = M.channel_stats(lat)
    n = torch.cat([z.flatten(1) for z in M.normalize(lat, mean, std)], 1)
    assert torch.allclose(n.mean(1), torch.zeros(4), atol=1e-4) and torch.allclose(n.std(1), torch.ones(4), atol=1e-3)


def test_cli_json_and_table(tiny, run_cli):
    root, train, dev = tiny
    args = ("modelability", "--models", "tiny-a", "--data", train, "--heldout", dev, "--steps", 3, "--batch", 2,
            "--samples", 4, "--sample-steps", 1, "--backend", "torch", "--device", "cpu", "--threads", 1)
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["models"][0]["model"] == "tiny-a" and res["config"]["train"]["steps"] == 3 and res["threads"] == 1
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "tiny-a" in out and "held-out loss" in out


@pytest.mark.parametrize("case", ["overlap_path", "overlap_content", "empty", "unknown", "bad_scale", "bad_spec"])
def test_bad_inputs_give_one_line_errors(tiny, run_cli, clean_error, case, tmp_path):
    root, train, dev = tiny
    models, heldout, data, needles = "tiny-a", dev, train, ()
    if case == "overlap_path":
        heldout, needles = train, ("in both --data and --heldout",)
    elif case == "overlap_content":
        heldout = tmp_path / "dev2"
        heldout.mkdir()
        shutil.copy(train / "img1.png", heldout / "copy.png")
        needles = ("copy.png", "same content", "img1.png")
    elif case == "empty":
        data = tmp_path / "nothing"
        data.mkdir()
        needles = ("nothing", "no images")
    elif case == "unknown":
        models, needles = "tiny-a,nope", ("nope",)
    elif case == "bad_scale":
        models, needles = "tiny-a@-1", ("tiny-a@-1", "positive")
    else:
        models, needles = "tiny-a@", ("bad model spec",)
    code, out, err = run_cli("modelability", "--models", models, "--data", data, "--heldout", heldout, "--steps", 1,
                             "--backend", "torch")
    assert code != 0 and out == ""
    clean_error(err, *needles)


def test_spec_parsing():
    from vaepack.modelability import parse_spec

    assert parse_spec("default@1.5").label == "default@1.5" and parse_spec("taef2").scale == 1.0
    for bad in ("", "@2", "x@y", "x@0", "x@nan"):
        with pytest.raises(UsageError):
            parse_spec(bad)


def test_threads_build_the_encoder_runner_once_at_fp32(tiny):
    pytest.importorskip("openvino")
    from vaepack import modelability as M
    from vaepack.train.common import load_images

    root, train, _dev = tiny
    imgs = load_images(train)[:1]
    vae = M.load_encoder("tiny-a", "auto", "cpu", threads=1)
    assert vae.runtime("encoder") == {"backend": "openvino", "dtype": "fp32"}  # fp32 pinned, not auto's bf16
    import openvino.properties as props

    assert vae.parts["encoder"].runner.compiled.get_property(props.inference_num_threads) == 1
    got, ran = M.encode_images(vae, imgs)
    want, _ = M.encode_images(M.load_encoder("tiny-a", "torch", "cpu"), imgs)
    assert ran == {"backend": "openvino", "dtype": "fp32"} and torch.allclose(got[0], want[0], atol=1e-3)
