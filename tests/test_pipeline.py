"""Pipeline on the real TAEF2 weights: size restoration under remapping and padding, tiling against
untiled runs on a dev photo, latent files (vaepack and ComfyUI), batching and precisions."""

from __future__ import annotations

import json
import sys

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
    from vaepack.runtime import load_vae

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
    from vaepack.runtime import load_vae

    v = load_vae("default", device="cpu", backend="torch")
    tiles = P.TileOptions(budget=128 * 128, tile=128, overlap=32)
    y_t = P.decode_record(v, P.encode_tensor(v, photo, scale=1.5, tiles=tiles), tiles=tiles)
    y_u = P.decode_record(v, P.encode_tensor(v, photo, scale=1.5), tiles=P.TileOptions(budget=0))
    assert psnr(y_t, y_u) > 40 and psnr(y_u, photo) > 25


def test_tiled_runs_bypass_a_runner(shared_weights, photo):
    """A runtime backend (OpenVINO, ONNX Runtime) takes whole images; a tiled run uses the torch split
    instead (a tiled whole-network runner would see GroupNorm statistics per tile)."""
    from vaepack.runtime import load_vae

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
    from vaepack.runtime import load_vae

    x = smooth_image(64, 64, seed=4)
    z32 = load_vae("taef2", parts=("encoder",), device="cpu").encode(x[None])
    z16 = load_vae("taef2", parts=("encoder",), device="cpu", dtype="bf16").encode(x[None])
    assert z16.dtype == torch.float32 and z16.shape == z32.shape
    assert not torch.equal(z16, z32)  # bf16 really ran
    rel = (z16 - z32).norm() / z32.norm()
    assert rel < 0.05


def test_fp16_refused_for_unsafe_model_before_loading(tmp_path, monkeypatch):
    """The dtype check runs first: the entry points to a file that does not exist anywhere."""
    from vaepack.runtime import load_vae

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


# --------------------------------------------------------------------------- tile by tile (memory)
@pytest.mark.parametrize("scale", [0.5, 1.5])
@pytest.mark.parametrize("filter", P.FILTERS)
def test_tile_remap_matches_the_whole_image_resize(photo, scale, filter):
    """A tiled encode reads each tile from the uint8 image (tiling.Remap) with torch's own resize
    weights per axis, so its tiles are the whole-image remap + padding up to float rounding."""
    from vaepack import tiling as T

    x8 = (photo * 255).round().to(torch.uint8)[:, :101, :157]  # odd sizes: padded at the right and bottom
    xp, _, size, pad = P.prepare(x8, 8, scale, filter)
    src = T.Remap(x8, size, filter, pad)
    assert tuple(src.shape) == tuple(xp.shape)
    h, w = xp.shape[-2:]
    for y0, y1, x0, x1 in [(0, h, 0, w), (0, 40, 8, 64), (h - 24, h, w - 40, w)]:
        torch.testing.assert_close(src.region(y0, y1, x0, x1), xp[..., y0:y1, x0:x1], atol=1e-6, rtol=0)


def test_rows_resized_as_they_arrive_match_the_whole_resize():
    """Decoded rows are resized back as they finish (tiling.Resize), equal to resizing the whole image."""
    from vaepack import tiling as T

    img = torch.rand(1, 3, 75, 113, generator=torch.Generator().manual_seed(0))
    for dst, filt in [((50, 75), "bilinear"), ((50, 75), "bicubic"), ((150, 226), "bilinear")]:
        canvas = T.Canvas(1, 3, *dst)
        sink = T.Resize(canvas, (75, 113), dst, filt, chunk=8)
        for top in range(0, 75, 13):
            sink.write(top, img[..., top:top + 13, :])
        torch.testing.assert_close(canvas.tensor, P.resize(img, dst, filt).clamp(0, 1), atol=1e-6, rtol=0)


def test_groupnorm_halves_run_in_strips_exactly(vae):
    """The halves that need whole-image GroupNorm statistics (TAEF2's encoder tail, decoder head) run
    in row strips with statistics gathered over all strips: the whole-tensor result, not an approximation."""
    from vaepack import tiling as T

    g = torch.Generator().manual_seed(0)
    _, tail = vae.parts["encoder"].split
    head, _ = vae.parts["decoder"].split
    feat, z = torch.randn(1, 64, 37, 29, generator=g), torch.randn(1, 32, 37, 29, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(T.run_strips(tail, feat.clone(), 6, owned=True), tail(feat), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(T.run_strips(head, z, 6), head(z), atol=1e-5, rtol=1e-5)


def test_uint8_images_encode_exactly_as_float(vae, dev_photo):
    from vaepack.io import image_float, load_image

    x8, x = load_image(dev_photo, uint8=True)[:, :96, :128], load_image(dev_photo)[:, :96, :128]
    assert x8.dtype == torch.uint8 and torch.equal(image_float(x8), x)
    for scale in (1.0, 1.5):  # untiled: the same latent as the float image gives
        assert torch.equal(P.encode_tensor(vae, x8, scale=scale).latent, P.encode_tensor(vae, x, scale=scale).latent)


def test_decode_image_is_the_saved_decode_record(vae, photo):
    """decode_image (8-bit, filled strip by strip) holds the pixels save_image(decode_record(...)) writes."""
    import numpy as np

    from vaepack.io import tensor_to_pil

    rec = P.encode_tensor(vae, photo, scale=1.5)
    for tiles in (P.TileOptions(budget=128 * 128, tile=128, overlap=32), P.TileOptions(budget=0)):
        im = P.decode_image(vae, rec, tiles=tiles)
        ref = tensor_to_pil(P.decode_record(vae, rec, tiles=tiles))
        assert im.size == ref.size == (256, 192) and np.array_equal(np.asarray(im.image), np.asarray(ref))


def test_tiled_runs_record_the_backend_that_ran(shared_weights, photo, tmp_path):
    """With a runner loaded (e.g. OpenVINO bf16), a tiled run uses the torch module at the VAE's dtype:
    the record, its latent file and decode_runtime say so; untiled runs name the runner. Files
    written before the ``backend`` key existed still load."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vaepack.runtime import load_vae

    v = load_vae("taef2", device="cpu", backend="torch")
    v.parts["encoder"].runner = lambda x: torch.zeros(x.shape[0], 32, x.shape[-2] // 8, x.shape[-1] // 8)
    v.parts["decoder"].runner = lambda z: torch.zeros(z.shape[0], 3, z.shape[-2] * 8, z.shape[-1] * 8)
    for part in ("encoder", "decoder"):
        v.parts[part].backend, v.parts[part].precision = "openvino", "bf16"
    tiles = P.TileOptions(budget=128 * 128, tile=128, overlap=32)
    rec = P.encode_tensor(v, photo, tiles=tiles)
    assert (rec.backend, rec.dtype) == ("torch", "fp32") and rec.latent.abs().sum() > 0
    assert P.decode_runtime(v, rec, tiles) == {"backend": "torch", "dtype": "fp32"}
    small = P.encode_tensor(v, photo[:, :64, :64], tiles=tiles)
    assert (small.backend, small.dtype) == ("openvino", "bf16")
    assert P.decode_runtime(v, small, tiles) == {"backend": "openvino", "dtype": "bf16"}
    f = tmp_path / "a.latent.safetensors"
    L.save_latent(f, rec)
    assert L.load_latent(f).backend == "torch"
    with safe_open(str(f), framework="pt") as sf:
        meta = dict(sf.metadata())
    del meta["backend"]
    save_file(load_file(str(f)), str(f), metadata=meta)
    old = L.load_latent(f)
    assert old.backend == "" and old.dtype == "fp32"


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS when forked (Linux keeps the
# pre-exec high-water mark), so under pytest both readings would be the parent's.
_MEMORY_PROBE = r"""
import json, re, sys
import torch
torch.set_num_threads(1)
from vaepack.cli.app import main

d, opts = sys.argv[1], ["-m", "tiny-tae", "--backend", "torch", "--tile-size", "256", "--tile-overlap", "32"]
peak = {}
for name in sys.argv[2:]:
    lat = f"{d}/{name}.latent.safetensors"
    assert main(["encode", f"{d}/{name}.png", "-o", lat, *opts]) == 0
    assert main(["decode", lat, "-o", f"{d}/{name}.recon.png", *opts[2:]]) == 0
    peak[name] = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps(peak))
"""


def _tiny_tae(root) -> dict[str, str]:
    """A manifest with a tiny random TAEF2-like model (GroupNorm midblocks, no full-resolution stage)
    and a mirror holding its weights: the environment a child process needs to run it."""
    import hashlib

    from safetensors.torch import save_file

    from vaepack.loader import build_part
    from vaepack.manifest import PartSpec

    data = yaml.safe_load(manifest_path().read_text())
    cfg = {"kind": "f8", "latent_channels": 4, "width": 8, "midblock_gn": True}
    parts = {"encoder": dict(cfg, blocks=[0, 1, 1, 1], stem="s2d"), "decoder": dict(cfg, blocks=[1, 1, 1, 0])}
    entry = {}
    for i, (part, c) in enumerate(parts.items()):
        torch.manual_seed(i)
        f = root / f"tiny-tae-{part}.safetensors"
        save_file({k: v.contiguous() for k, v in build_part(PartSpec(part, "tae", c, ()), "tiny-tae").state_dict().items()},
                  str(f))
        entry[part] = {"family": "tae", "config": c, "files": [{"name": f.name, "url": None, "size": f.stat().st_size,
                                                                 "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}]}
    data["models"]["tiny-tae"] = {"description": "test", "license": "MIT", "space": "sd1", "fp16_safe": True,
                                  "parts": entry}
    (root / "manifest.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return {"VAEPACK_MANIFEST": str(root / "manifest.yaml"), "VAEPACK_MIRROR": str(root),
            "VAEPACK_HOME": str(root / "home"), "VAEPACK_TILE_BUDGET": str(256 * 256)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status")
def test_tiled_memory_grows_with_the_tile_not_the_float_image(tmp_path):
    """encode + decode (CLI, in a child process) of a 2048x2048 image after a 512x512 one, both tiled
    (tiny tile budget, a tiny random TAE so it takes seconds): the peak RSS may grow by less than twice
    the big image as float32 (the old path held the float image and its remapped, padded and channels-last
    copies: 3.4x here, 3.56 GB at 8192x8192; now ~1.1x: the uint8 image, Pillow's decoded and
    output images, the latent and per-strip buffers)."""
    import os
    import subprocess

    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for name, n in (("small", 512), ("big", 2048)):
        low = torch.rand(1, 3, n // 16, n // 16, generator=g)
        x = torch.nn.functional.interpolate(low, size=(n, n), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        Image.fromarray(x.mul(255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / f"{name}.png")
    env = {**os.environ, **_tiny_tae(tmp_path)}
    p = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path), "small", "big"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    peak = json.loads(p.stdout.strip().splitlines()[-1])
    float_image = 3 * 2048 * 2048 * 4
    growth = peak["big"] - peak["small"]
    assert growth < 2 * float_image, f"peak RSS grew {growth / 2**20:.0f} MB (float image {float_image / 2**20:.0f} MB)"
    assert Image.open(tmp_path / "big.recon.png").size == (2048, 2048)
