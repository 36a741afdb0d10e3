"""Pipeline on the real TAEF2 weights: size restoration under remapping and padding, tiling against
untiled runs on a dev photo, latent files (vaepack and ComfyUI), batching and precisions."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from vaepack import latents as L
from vaepack import pipeline as P
from vaepack.errors import LatentFileError, UsageError
from vaepack.metrics import psnr
from vaepack.paths import manifest_path

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae(shared_weights):
    from vaepack.vae import load_vae

    return load_vae("taef2", device="cpu")


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random image (what a VAE reconstructs well), (3, h, w) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


@pytest.fixture(scope="module")
def photo(dev_photo):
    from vaepack.io import load_image

    x = load_image(dev_photo)
    return x[:, 128:128 + 192, 128:128 + 256].contiguous()  # 256x192 crop of a real photo


# --------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("scale", [0.5, 1.0, 1.5, 2.0])
def test_odd_size_round_trip_restores_original_size(vae, scale):
    x = smooth_image(45, 67)
    rec = P.encode_tensor(vae, x, scale=scale)
    sh, sw = round(45 * scale), round(67 * scale)
    assert rec.orig_size == (45, 67) and rec.scaled_size == (sh, sw)
    assert rec.latent.shape == (1, 32, -(-sh // 8), -(-sw // 8))
    y = P.decode_record(vae, rec)
    assert y.shape == (3, 45, 67)
    assert 0 <= y.min() and y.max() <= 1
    assert psnr(y, x) > (15 if scale < 1 else 22)  # the right image, not just the right size
    assert psnr(y, x.flip(-1)) < psnr(y, x) - 3


def test_padding_recorded_and_cropped(vae):
    x = smooth_image(45, 67, seed=1)
    rec = P.encode_tensor(vae, x)
    assert rec.padding == (0, 5, 0, 3)  # 67 -> 72, 45 -> 48, right/bottom
    assert rec.latent.shape[-2:] == (6, 9)
    native = P.decode_record(vae, rec, native=True)
    assert native.shape == (3, 48, 72)
    y = P.decode_record(vae, rec)
    assert torch.equal(y, native[:, :45, :67])  # scale 1: the crop is all there is


def test_pad_multiple_makes_an_even_latent(vae):
    rec = P.encode_tensor(vae, smooth_image(45, 67), pad_multiple=16)
    assert rec.padding == (0, 13, 0, 3) and rec.latent.shape[-2:] == (6, 10)
    assert P.decode_record(vae, rec).shape == (3, 45, 67)


def test_image_smaller_than_a_latent_pixel_is_refused(vae):
    from vaepack.errors import ImageError

    with pytest.raises(ImageError, match="smaller than one latent pixel"):
        P.encode_tensor(vae, torch.rand(3, 5, 5), source="tiny.png")
    assert P.encode_tensor(vae, torch.rand(3, 5, 5), scale=2.0).latent.shape[-2:] == (2, 2)


def test_metadata_inconsistent_with_latent_is_refused(vae):
    rec = P.encode_tensor(vae, smooth_image(45, 67))
    rec.scaled_size = (80, 80)
    with pytest.raises(LatentFileError, match="metadata"):
        P.decode_record(vae, rec)


# --------------------------------------------------------------------------- tiling
def test_tiled_matches_untiled_on_a_dev_photo(vae, photo):
    tiles = P.TileOptions(budget=128 * 128, tile=128, overlap=32)
    assert tiles.active(photo.shape[-2] * photo.shape[-1])
    calls = []
    head = vae.parts["encoder"].split[0]
    hook = head.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[-2:])))
    try:
        rec_t = P.encode_tensor(vae, photo, tiles=tiles)
    finally:
        hook.remove()
    assert len(calls) > 1 and max(calls) <= (128, 128)  # really tiled
    rec_u = P.encode_tensor(vae, photo, tiles=P.TileOptions(budget=0))
    y_t = P.decode_record(vae, rec_t, tiles=tiles)
    y_u = P.decode_record(vae, rec_u, tiles=P.TileOptions(budget=0))
    assert y_t.shape == y_u.shape == photo.shape
    assert psnr(y_t, y_u) > 40
    assert psnr(y_u, photo) > 25


def test_tiled_matches_untiled_for_the_default_model(photo):
    """The default's encoder starts with a space-to-depth conv (no full-resolution stage): tiles still line up."""
    from vaepack.vae import load_vae

    v = load_vae("default", device="cpu", backend="torch")
    tiles = P.TileOptions(budget=128 * 128, tile=128, overlap=32)
    y_t = P.decode_record(v, P.encode_tensor(v, photo, scale=1.5, tiles=tiles), tiles=tiles)
    y_u = P.decode_record(v, P.encode_tensor(v, photo, scale=1.5), tiles=P.TileOptions(budget=0))
    assert psnr(y_t, y_u) > 40 and psnr(y_u, photo) > 25


def test_tiled_runs_bypass_a_runner(shared_weights, photo):
    """A runtime backend (OpenVINO, ONNX Runtime) takes whole images; a tiled run uses the torch split
    instead (a tiled whole-network runner would see GroupNorm statistics per tile)."""
    from vaepack.vae import load_vae

    v = load_vae("taef2", device="cpu")
    calls = []
    for part in ("encoder", "decoder"):
        v.parts[part].runner = lambda t, part=part: calls.append(part) or torch.zeros(0)
    tiles = P.TileOptions(budget=128 * 128, tile=128, overlap=32)
    rec = P.encode_tensor(v, photo, tiles=tiles)
    y = P.decode_record(v, rec, tiles=tiles)
    assert calls == [] and psnr(y, photo) > 25
    x = smooth_image(32, 32)
    assert v.encode(x[None]).numel() == 0 and calls == ["encoder"]  # untiled: the runner


# --------------------------------------------------------------------------- latent files
def test_latent_file_round_trip(vae, tmp_path):
    x = smooth_image(45, 67, seed=2)
    rec = P.encode_tensor(vae, x, scale=1.5, filter="bicubic", source="in.png")
    f = tmp_path / "a.latent.safetensors"
    L.save_latent(f, rec)
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as sf:
        meta = sf.metadata()
        assert list(sf.keys()) == ["latent"]
    assert meta["format"] == "vaepack.latent" and meta["format_version"] == L.FORMAT_VERSION
    assert meta["vaepack_version"]
    assert meta["model"] == "taef2" and meta["space"] == "flux2"
    assert meta["weights_sha256"] == vae.entry.part("encoder").files[0].sha256
    assert float(meta["scale"]) == 1.5 and meta["filter"] == "bicubic"
    assert json.loads(meta["orig_size"]) == [45, 67] and json.loads(meta["scaled_size"]) == [68, 100]
    assert json.loads(meta["padding"]) == [0, 4, 0, 4]
    assert json.loads(meta["convention"]) == L.convention(vae.space)
    assert meta["dtype"] == "fp32"
    back = L.load_latent(f)
    assert torch.equal(back.latent, rec.latent)
    for k in ("model", "space", "weights_sha256", "scale", "filter", "orig_size", "scaled_size", "padding",
              "convention", "dtype", "source", "packed"):
        assert getattr(back, k) == getattr(rec, k), k
    assert torch.equal(P.decode_record(vae, back), P.decode_record(vae, rec))
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind


def test_comfyui_latent_write_read(vae, tmp_path):
    from safetensors.torch import load_file

    x = smooth_image(48, 64, seed=3)  # latent 6x8: even, so ComfyUI's packed FLUX.2 form applies
    rec = P.encode_tensor(vae, x)
    f = tmp_path / "a.latent"
    L.save_latent(f, rec, fmt="comfyui")
    t = load_file(str(f))
    assert set(t) == {"latent_tensor", "latent_format_version_0"}
    assert t["latent_format_version_0"].numel() == 0
    # ComfyUI keeps FLUX.2 latents normalized and 2x2-packed: (1, 128, h/2, w/2).
    assert t["latent_tensor"].shape == (1, 128, 3, 4) and t["latent_tensor"].dtype == torch.float32
    assert torch.equal(t["latent_tensor"], L.flux2_pack(rec.latent))
    back = L.load_latent(f)
    assert back.packed and back.orig_size == (48, 64)
    assert torch.allclose(P.decode_record(vae, back), P.decode_record(vae, rec), atol=1e-6)


def test_comfyui_flux2_needs_an_even_latent(vae, tmp_path):
    rec = P.encode_tensor(vae, smooth_image(45, 67))  # latent 6x9: no 2x2-packed form
    with pytest.raises(LatentFileError, match="even latent size") as ei:
        L.save_latent(tmp_path / "o.latent", rec, fmt="comfyui")
    assert "o.latent" in str(ei.value) and "multiple of 16" in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_comfyui_form_of_scaled_spaces_is_the_raw_vae_latent():
    """ComfyUI applies scale/shift itself (process_in): its files hold the raw VAE mean."""
    from vaepack.manifest import load_manifest

    spaces = load_manifest().spaces
    z = torch.randn(1, 16, 4, 6)
    c, form = L.to_comfyui(z, spaces["sd3"])
    assert form == "raw" and torch.allclose(c, z / 1.5305 + 0.0609)
    back, packed = L.from_comfyui(c, spaces["sd3"], form)
    assert not packed and torch.allclose(back, z, atol=1e-6)


def test_bare_comfyui_latent_needs_a_model_and_is_converted(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "comfy.latent"
    m = torch.randn(1, 4, 5, 7)
    save_file({"latent_tensor": m, "latent_format_version_0": torch.tensor([])}, str(f))
    with pytest.raises(LatentFileError, match="no vaepack metadata"):
        L.load_latent(f)
    rec = L.load_latent(f, default_model="taesd")
    assert torch.allclose(rec.latent, 0.18215 * m) and rec.orig_size == (0, 0)
    # Without the marker ComfyUI divides by 0.18215 (its legacy files): so do we.
    save_file({"latent_tensor": m}, str(f))
    assert torch.allclose(L.load_latent(f, default_model="taesd").latent, m, atol=1e-6)


# --------------------------------------------------------------------------- batching, precision
def test_batch_equals_one_by_one(vae):
    xs = [smooth_image(40, 56, seed=s) for s in range(3)]
    batch = P.encode_batch(vae, xs, sources=["a", "b", "c"])
    for x, r, s in zip(xs, batch, "abc"):
        one = P.encode_tensor(vae, x, source=s)
        assert r.latent.shape == one.latent.shape == (1, 32, 5, 7)
        assert (r.latent - one.latent).abs().max().item() <= 1e-5
        assert r.source == s and r.orig_size == one.orig_size and r.padding == one.padding


def test_batch_of_mixed_sizes_falls_back(vae):
    xs = [smooth_image(40, 56), smooth_image(48, 48)]
    recs = P.encode_batch(vae, xs)
    assert [r.orig_size for r in recs] == [(40, 56), (48, 48)]


def test_bf16_encode_close_to_fp32(shared_weights):
    from vaepack.vae import load_vae

    x = smooth_image(64, 64, seed=4)
    z32 = load_vae("taef2", parts=("encoder",), device="cpu").encode(x[None])
    z16 = load_vae("taef2", parts=("encoder",), device="cpu", dtype="bf16").encode(x[None])
    assert z16.dtype == torch.float32 and z16.shape == z32.shape
    assert not torch.equal(z16, z32)  # bf16 really ran
    rel = (z16 - z32).norm() / z32.norm()
    assert rel < 0.05


def test_fp16_refused_for_unsafe_model_before_loading(tmp_path, monkeypatch):
    """The dtype check runs first: the entry points to a file that does not exist anywhere."""
    from vaepack.vae import load_vae

    data = yaml.safe_load(manifest_path().read_text())
    entry = json.loads(json.dumps(data["models"]["taef2"]))
    entry["fp16_safe"] = False
    for p in entry["parts"].values():
        p["files"] = [{"name": "does-not-exist.pth", "url": None, "size": 1, "sha256": "0" * 64}]
    data["models"]["unsafe"] = entry
    man = tmp_path / "m.yaml"
    man.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("VAEPACK_MANIFEST", str(man))
    with pytest.raises(UsageError, match="overflows in fp16") as ei:
        load_vae("unsafe", dtype="fp16")
    assert ei.value.exit_code == 2 and "bf16" in str(ei.value)
    with pytest.raises(UsageError, match="overflows in fp16"):
        load_vae("flux2-vae", dtype="fp16")
    with pytest.raises(UsageError, match="unknown dtype"):
        load_vae("taef2", dtype="fp8")
