"""The CLI on bad input: every case exits 1 (2 for usage errors) with one line on stderr naming the
file and the problem, no traceback, no partial output and no overwritten output without --force.
Plus the input-mode policy, size restoration, --json and roundtrip --compare. Real TAEF2 weights,
images of 64 px or less."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaepack.io import load_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _weights_for_cli(request):
    """Tests that run the CLI need the TAEF2 weights (skip/fail per conftest); the pure image-reading
    tests do not."""
    if "run_cli" in request.fixturenames:
        request.getfixturevalue("shared_weights")

M = ("-m", "taef2")


def smooth_array(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = Image.fromarray((rng.random((max(2, h // 8), max(2, w // 8), 3)) * 255).astype(np.uint8))
    return np.asarray(low.resize((w, h), Image.BICUBIC))


def save_png(path: Path, h: int = 48, w: int = 64, seed: int = 0) -> Path:
    Image.fromarray(smooth_array(h, w, seed)).save(path)
    return path


def files_in(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())  # hidden temp files included


@pytest.fixture
def good(tmp_path) -> Path:
    return save_png(tmp_path / "good.png")


# --------------------------------------------------------------------------- bad images
def _png_bytes(h=48, w=64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth_array(h, w)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(h=48, w=64, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth_array(h, w)).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


BAD_IMAGES = {
    "corrupt.png": (lambda: _png_bytes()[:60] + bytes(300) + _png_bytes()[360:], "corrupt"),
    "truncated.png": (lambda: _png_bytes()[: len(_png_bytes()) // 2], "truncated"),
    "truncated.jpg": (lambda: _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "truncated"),
    "empty.png": (lambda: b"", "empty"),
    "notes.png": (lambda: b"just some text\n", "not an image"),
    "notes.txt": (lambda: b"just some text\n", "not an image"),
    "bomb.png": (lambda: bomb_png(100_000, 100_000), "exceeds the limit"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_encode(name, tmp_path, run_cli, clean_error):
    make, problem = BAD_IMAGES[name]
    src = tmp_path / name
    src.write_bytes(make())
    out = tmp_path / "out"
    code, stdout, err = run_cli("encode", src, *M, "-o", out / "x.latent.safetensors")
    assert code == 1
    clean_error(err, str(src), problem)
    assert not out.exists() or files_in(out) == []
    assert stdout == ""


def test_missing_file(tmp_path, run_cli, clean_error):
    code, _, err = run_cli("encode", tmp_path / "nope.png", *M)
    assert code == 1
    clean_error(err, "nope.png", "no such file")


def test_image_smaller_than_one_latent_pixel(tmp_path, run_cli, clean_error):
    src = save_png(tmp_path / "tiny.png", 5, 5)
    code, _, err = run_cli("encode", src, *M)
    assert code == 1
    clean_error(err, str(src), "smaller than one latent pixel")
    assert files_in(tmp_path) == ["tiny.png"]


def test_max_pixels_refuses_before_decoding(good, run_cli, clean_error):
    code, _, err = run_cli("encode", good, *M, "--max-pixels", 1000)
    assert code == 1
    clean_error(err, str(good), "64x48", "exceeds the limit of 1000")


def test_bomb_is_refused_without_decoding(tmp_path, monkeypatch):
    """The header is checked before any pixel is decoded (a real decode would need 30 GB)."""
    from PIL import ImageFile

    from vaepack.errors import ImageError

    called = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: called.append(1))
    f = tmp_path / "bomb.png"
    f.write_bytes(bomb_png(100_000, 100_000))
    with pytest.raises(ImageError, match="exceeds"):
        load_image(f)
    assert not called


def test_usage_error_in_a_subprocess_has_no_traceback(run_cli_subprocess, clean_error):
    """typer vendors its own click: its usage errors must be caught too (exit 2, one line)."""
    code, out, err = run_cli_subprocess("encode", "x.png", "--bogus-option")
    assert code == 2 and out == ""
    clean_error(err, "no such option", "--bogus-option")


# --------------------------------------------------------------------------- directories
@pytest.fixture
def mixed_dir(tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    save_png(d / "a.png", seed=1)
    (d / "b.png").write_bytes(BAD_IMAGES["truncated.png"][0]())
    save_png(d / "c.png", seed=2)
    (d / "readme.txt").write_text("not an input: directories take image suffixes only")
    return d


def test_directory_stops_at_first_error(mixed_dir, tmp_path, run_cli, clean_error):
    out = tmp_path / "out"
    code, _, err = run_cli("encode", mixed_dir, *M, "-o", out, "--batch-size", 1)
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "b.png" in lines[0] and "Traceback" not in err
    assert files_in(out) == ["a.latent.safetensors"]  # c is never reached


def test_directory_keep_going(mixed_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    code, _, err = run_cli("encode", mixed_dir, *M, "-o", out, "--keep-going")
    assert code == 1 and "Traceback" not in err
    assert files_in(out) == ["a.latent.safetensors", "c.latent.safetensors"]
    assert "2 ok, 1 failed" in err and "b.png" in err.splitlines()[-1]


def test_directory_keep_going_json(mixed_dir, tmp_path, run_cli):
    code, out, _ = run_cli("encode", mixed_dir, *M, "-o", tmp_path / "out", "--keep-going", "--json")
    assert code == 1
    rep = json.loads(out)
    assert [Path(r["input"]).name for r in rep["ok"]] == ["a.png", "c.png"]
    assert [Path(r["input"]).name for r in rep["failed"]] == ["b.png"]
    assert rep["ok"][0]["latent_shape"] == [1, 32, 6, 8] and rep["model"] == "taef2"


# --------------------------------------------------------------------------- outputs
def test_existing_output_is_not_overwritten_without_force(good, tmp_path, run_cli, clean_error):
    dst = tmp_path / "x.latent.safetensors"
    dst.write_bytes(b"precious")
    code, _, err = run_cli("encode", good, *M, "-o", dst)
    assert code == 1
    clean_error(err, str(dst), "exists", "--force")
    assert dst.read_bytes() == b"precious"
    assert run_cli("encode", good, *M, "-o", dst, "--force")[0] == 0
    assert dst.read_bytes() != b"precious"
    assert files_in(tmp_path) == ["good.png", "x.latent.safetensors"]


def test_decode_existing_output_is_kept(good, tmp_path, run_cli, clean_error):
    lat = tmp_path / "x.latent.safetensors"
    assert run_cli("encode", good, *M, "-o", lat)[0] == 0
    png = tmp_path / "x.png"
    png.write_bytes(b"precious")
    code, _, err = run_cli("decode", lat, "-o", png)
    assert code == 1
    clean_error(err, str(png), "exists")
    assert png.read_bytes() == b"precious"


# --------------------------------------------------------------------------- input modes
def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., 0], a[..., 3] = 200, 255
    a[0, 0] = (10, 20, 30, 0)  # fully transparent
    a[0, 1] = (0, 0, 0, 255)  # opaque black
    f = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(f)
    x = load_image(f)
    assert x.shape == (3, 16, 16)
    assert x[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert x[:, 0, 1].tolist() == [0.0, 0.0, 0.0]
    assert abs(x[0, 5, 5].item() - 200 / 255) < 1e-6


def test_grayscale_replicated(tmp_path):
    f = tmp_path / "l.png"
    Image.fromarray(np.full((8, 12), 77, np.uint8), "L").save(f)
    x = load_image(f)
    assert x.shape == (3, 8, 12) and torch.allclose(x, torch.full_like(x, 77 / 255))


@pytest.mark.parametrize("transparent", [False, True])
def test_palette(tmp_path, transparent):
    im = Image.new("P", (8, 8), 1)
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    im.putpixel((1, 0), 2)
    f = tmp_path / "p.png"
    im.save(f, **({"transparency": 1} if transparent else {}))
    x = load_image(f)
    assert x[:, 0, 1].tolist() == [0.0, 0.0, 1.0]
    assert x[:, 0, 0].tolist() == ([1.0, 1.0, 1.0] if transparent else [0.0, 1.0, 0.0])


def test_grayscale_with_trns_colour_key_composited(tmp_path):
    f = tmp_path / "ltrns.png"
    a = np.full((8, 8), 77, np.uint8)
    a[0, 0] = 10
    Image.fromarray(a, "L").save(f, transparency=77)
    x = load_image(f)
    assert x[:, 4, 4].tolist() == [1.0, 1.0, 1.0] and abs(x[0, 0, 0].item() - 10 / 255) < 1e-6


def test_cmyk_jpeg(tmp_path):
    f = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(f, quality=100)
    assert Image.open(f).mode == "CMYK"
    x = load_image(f)
    assert x.shape == (3, 8, 16)
    assert x[0].mean() > 0.95 and x[1:].mean() < 0.05  # red


def test_16bit_png(tmp_path):
    f = tmp_path / "i16.png"
    a = np.zeros((8, 8), np.uint16)
    a[0, 0], a[0, 1], a[0, 2] = 65535, 32768, 200
    Image.fromarray(a).save(f)
    assert Image.open(f).mode.startswith("I")
    x = load_image(f)
    assert x.shape == (3, 8, 8)
    assert x[:, 0, 0].tolist() == [1.0] * 3
    assert abs(x[0, 0, 1].item() - 32768 / 65535) < 1e-6
    assert abs(x[0, 0, 2].item() - 200 / 65535) < 1e-7  # a dark 16-bit image stays dark


def test_exif_rotation(tmp_path):
    im = Image.fromarray(smooth_array(40, 64))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    f = tmp_path / "rot.jpg"
    im.save(f, exif=exif.tobytes())
    assert Image.open(f).size == (64, 40)
    assert load_image(f).shape == (3, 64, 40)


def test_broken_exif_is_not_fatal(tmp_path, run_cli):
    """Pillow raises struct.error in exif_transpose on some corrupt EXIF (here a SampleFormat tag
    holding text); the pixels are still usable: a warning, not a traceback."""
    from PIL import ImageOps

    im = Image.fromarray(smooth_array(48, 64))
    exif = im.getexif()
    exif[0x0112] = 6
    exif[0x010F] = "Cam"  # Make (ASCII) ...
    b = _jpeg_bytes_with_exif(im, exif)
    assert b.count(b"\x01\x0f\x00\x02") == 1
    b = b.replace(b"\x01\x0f\x00\x02", b"\x01\x53\x00\x02")  # ... retagged as SampleFormat
    f = tmp_path / "badexif.jpg"
    f.write_bytes(b)
    with pytest.raises(Exception):  # noqa: B017 - the Pillow behaviour this test guards against
        ImageOps.exif_transpose(Image.open(f))
    code, _, err = run_cli("encode", f, *M, "-o", tmp_path / "o.latent.safetensors", "--json")
    assert code == 0, err
    assert "Traceback" not in err and "warning:" in err and "EXIF" in err


def _jpeg_bytes_with_exif(im, exif) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_all_modes_encode_in_one_directory(tmp_path, run_cli):
    d = tmp_path / "modes"
    d.mkdir()
    base = smooth_array(40, 48)
    Image.fromarray(base).convert("RGBA").save(d / "rgba.png")
    Image.fromarray(base).convert("L").save(d / "gray.png")
    Image.fromarray(base).convert("P").save(d / "pal.png")
    Image.fromarray(base).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((base[..., 0].astype(np.uint16) * 257)).save(d / "i16.png")
    code, out, err = run_cli("encode", d, *M, "-o", tmp_path / "out", "--json")
    assert code == 0, err
    assert len(json.loads(out)["ok"]) == 5


# --------------------------------------------------------------------------- latent files
@pytest.fixture
def latent(good, tmp_path, run_cli) -> Path:
    f = tmp_path / "good.latent.safetensors"
    code, _, err = run_cli("encode", good, *M, "-o", f)
    assert code == 0, err
    return f


def _rewrite(src: Path, dst: Path, tensor=None, meta_update=None, key="latent"):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        t = f.get_tensor("latent")
    meta.update(meta_update or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file({key: (t if tensor is None else tensor(t)).contiguous()}, str(dst), metadata=meta)
    return dst


BAD_LATENTS = {
    "shape": (dict(tensor=lambda t: t[0, 0]), "shape"),
    "batch2": (dict(tensor=lambda t: torch.cat([t, t])), "shape"),
    "int": (dict(tensor=lambda t: t.to(torch.int32)), "float"),
    "nan": (dict(tensor=lambda t: t.index_fill(1, torch.tensor([3]), float("nan"))), "nan"),
    "inf": (dict(tensor=lambda t: t.index_fill(1, torch.tensor([3]), float("inf"))), "inf"),
    "channels": (dict(tensor=lambda t: t[:, :16]), "16 channels"),
    "meta_size": (dict(meta_update={"orig_size": "[48, \"x\"]"}), "orig_size"),
    "meta_json": (dict(meta_update={"padding": "[0, 0"}), "padding"),
    "meta_missing": (dict(meta_update={"orig_size": None}), "orig_size"),
    "meta_scale": (dict(meta_update={"scale": "-1"}), "scale"),
    "meta_conv": (dict(meta_update={"convention": "[1, 2]"}), "convention"),
    "meta_mismatch": (dict(meta_update={"scaled_size": "[96, 128]", "orig_size": "[96, 128]"}), "metadata"),
    "meta_disagree": (dict(meta_update={"scaled_size": "[96, 128]"}), "disagree"),
    "meta_zero": (dict(meta_update={"orig_size": "[0, 64]"}), "positive"),
    # Consistent, but decoding would resize to 53333x40000 (~25 GB): refused like an input bomb.
    "meta_huge": (dict(meta_update={"orig_size": "[40000, 53333]", "scale": "0.0012"}), "above the limit"),
    "no_tensor": (dict(key="something"), "no 'latent'"),
    "space": (dict(meta_update={"space": "sd3"}), "space"),
    "convention": (dict(meta_update={"convention": json.dumps({"name": "flux2", "norm": "none"})}), "convention"),
}


@pytest.mark.parametrize("case", list(BAD_LATENTS))
def test_bad_latent_decode(case, latent, tmp_path, run_cli, clean_error):
    kw, problem = BAD_LATENTS[case]
    bad = _rewrite(latent, tmp_path / f"{case}.latent.safetensors", **kw)
    out = tmp_path / "out"
    code, _, err = run_cli("decode", bad, "-o", out / "x.png")
    assert code == 1
    clean_error(err, str(bad), problem)
    assert not out.exists() or files_in(out) == []


def test_not_a_safetensors_file(tmp_path, run_cli, clean_error):
    f = tmp_path / "junk.latent.safetensors"
    f.write_bytes(b"\x00" * 100)
    code, _, err = run_cli("decode", f, *M)
    assert code == 1
    clean_error(err, str(f), "not a readable safetensors")


def test_other_space_refused_unless_forced(tmp_path, run_cli, clean_error):
    src = save_png(tmp_path / "s.png", 64, 64)
    lat = tmp_path / "s.latent.safetensors"
    assert run_cli("encode", src, "-m", "taesana", "-o", lat)[0] == 0  # sana space, 32 ch at H/32
    code, _, err = run_cli("decode", lat)  # taesana has no decoder
    assert code == 2
    clean_error(err, "taesana", "no decoder")
    code, _, err = run_cli("decode", lat, *M, "-o", tmp_path / "x.png")
    assert code == 1
    clean_error(err, str(lat), "'sana' space", "--force-space")
    assert not (tmp_path / "x.png").exists()
    code, _, err = run_cli("decode", lat, *M, "--force-space", "--native", "-o", tmp_path / "x.png")
    assert code == 0, err
    assert Image.open(tmp_path / "x.png").size == (16, 16)  # 2x2 latent through an f8 decoder


def test_bare_latent_needs_model(latent, tmp_path, run_cli, clean_error):
    bare = _rewrite(latent, tmp_path / "bare.latent.safetensors", meta_update={"format": "other"})
    code, _, err = run_cli("decode", bare)
    assert code == 1
    clean_error(err, str(bare), "no vaepack metadata", "--model")
    code, _, err = run_cli("decode", bare, *M, "-o", tmp_path / "bare.png")
    assert code == 0, err
    assert Image.open(tmp_path / "bare.png").size == (64, 48)  # native size: no remap info


# --------------------------------------------------------------------------- models and weights
@pytest.mark.parametrize("cmd", ["encode", "roundtrip"])
def test_unknown_model(cmd, good, run_cli, clean_error):
    code, _, err = run_cli(cmd, good, "-m", "taef22")
    assert code == 2
    clean_error(err, "unknown model 'taef22'", "did you mean", "taef2")


def test_unknown_decoder_model(latent, run_cli, clean_error):
    code, _, err = run_cli("decode", latent, "-m", "tae-f2")
    assert code == 2
    clean_error(err, "tae-f2", "did you mean")


def test_tampered_cached_weights_are_an_error(good, tmp_path, fresh_home, run_cli, clean_error):
    assert run_cli("weights", "pull", "taef2")[0] == 0
    enc = fresh_home / "weights" / "taef2_encoder.pth"
    b = bytearray(enc.read_bytes())
    b[-100] ^= 0x01
    enc.write_bytes(bytes(b))
    out = tmp_path / "o.latent.safetensors"
    code, _, err = run_cli("encode", good, *M, "-o", out)
    assert code == 1
    clean_error(err, str(enc), "sha256 mismatch")
    assert not out.exists()
    assert enc.read_bytes() == bytes(b)  # not silently replaced


def test_usage_errors_exit_2(good, run_cli):
    for args in (["encode", good, *M, "--scale", "0"], ["encode", good, *M, "--filter", "lanczos"],
                 ["encode", good, *M, "--format", "npy"], ["encode", good, *M, "--dtype", "fp8"],
                 ["encode", good, *M, "--tile-size", "4"], ["encode", good, *M, "--batch-size", "0"],
                 ["encode", good, *M, "--bogus-option"], ["encode"]):
        code, _, err = run_cli(*args)
        assert code == 2, (args, err)
        assert "Traceback" not in err and err.startswith("error:"), (args, err)


# --------------------------------------------------------------------------- sizes, json, compare
def test_decode_restores_size_of_a_scale_1_5_latent(tmp_path, run_cli):
    src = save_png(tmp_path / "odd.png", 45, 67, seed=3)
    lat = tmp_path / "odd.latent.safetensors"
    assert run_cli("encode", src, *M, "--scale", 1.5, "-o", lat)[0] == 0
    from vaepack.latents import load_latent

    rec = load_latent(lat)
    assert rec.scaled_size == (68, 100) and rec.latent.shape[-2:] == (9, 13)
    code, out, err = run_cli("decode", lat, "-o", tmp_path / "odd.recon.png", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["ok"][0]["size"] == [67, 45] and rep["failed"] == []
    assert Image.open(tmp_path / "odd.recon.png").size == (67, 45)
    code, _, _ = run_cli("decode", lat, "--native", "-o", tmp_path / "native.png")
    assert code == 0 and Image.open(tmp_path / "native.png").size == (104, 72)


def test_comfyui_format_round_trip(tmp_path, run_cli):
    src = save_png(tmp_path / "c.png", 45, 67, seed=4)
    lat = tmp_path / "c.latent"
    code, out, err = run_cli("encode", src, *M, "--format", "comfyui", "-o", lat, "--json")
    assert code == 0, err
    from safetensors.torch import load_file

    t = load_file(str(lat))
    assert t["latent_tensor"].shape == (1, 128, 3, 5)  # padded to 80x48 so the packed form exists
    code, _, err = run_cli("decode", lat, "-o", tmp_path / "c.recon.png")
    assert code == 0, err
    assert Image.open(tmp_path / "c.recon.png").size == (67, 45)


def test_encode_json_parses(good, tmp_path, run_cli):
    code, out, err = run_cli("encode", good, *M, "-o", tmp_path / "g.latent.safetensors", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["failed"] == [] and rep["model"] == "taef2" and rep["scale"] == 1.0
    assert rep["ok"][0]["orig_size"] == [48, 64] and rep["ok"][0]["latent_shape"] == [1, 32, 6, 8]


def test_roundtrip_compare_and_json(good, tmp_path, run_cli):
    cmp_ = tmp_path / "cmp.png"
    code, out, err = run_cli("roundtrip", good, *M, "--compare", cmp_, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["encoder"] == rep["decoder"] == "taef2"
    assert rep["ok"][0]["size"] == [64, 48] and rep["ok"][0]["psnr"] > 20
    assert rep["mean"]["psnr"] == rep["ok"][0]["psnr"]
    im = Image.open(cmp_)
    from vaepack.plots import compare_layout  # labeled: a caption band on top, small images enlarged k x

    k, band = compare_layout(48, 64)
    assert im.size == (128 * k, 48 * k + band)
    left = np.asarray(im)[band::k, : 64 * k : k].astype(int)
    assert np.abs(left - np.asarray(Image.open(good))).max() <= 1  # the original on the left


def test_roundtrip_keep_going_over_bad_file(mixed_dir, tmp_path, run_cli):
    code, out, err = run_cli("roundtrip", mixed_dir, *M, "--keep-going", "--json",
                             "--compare", tmp_path / "cmp")
    assert code == 1
    rep = json.loads(out)
    assert len(rep["ok"]) == 2 and len(rep["failed"]) == 1
    assert files_in(tmp_path / "cmp") == ["a.compare.png", "c.compare.png"]
