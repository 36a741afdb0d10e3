"""`vaepack convert` (issue 14): the bridges manifest section, load_bridge, the pixel and bridge paths,
the geometry they record, conversion provenance, and the CLI's errors.

Most tests run tiny random TAE models and a tiny random bridge from a temporary manifest (spaces
``tiny8``, f8, and ``tiny32``, f32); the pixel-path equality and the FLUX.2 -> Sana bridge wiring use
the real TAEF2/TAESana weights (``shared_weights``)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from vaepack import latents as L
from vaepack.errors import LatentFileError, ManifestError, UsageError, WeightsError
from vaepack.paths import manifest_path

TINY = {"kind": "f8", "latent_channels": 4, "width": 8, "blocks": [1, 1, 1, 1]}
TINY_BRIDGE = {"tap": "s0", "tap_channels": 8, "target_channels": 4, "width": 8, "blocks": [1, 1, 1, 1]}
# an rgb-tap bridge that also reads the source latent (through conv 3x3 + ReLU + conv 1x1): it runs on
# exported graphs (export/bridge.py)
RGB_BRIDGE = {"tap": "rgb", "tap_channels": 3, "target_channels": 4, "width": 8, "blocks": [1, 1, 1, 1],
              "latent_skip": 4, "skip_stages": 2, "skip_hidden": 3}


def _save(root: Path, name: str, sd: dict) -> dict:
    from safetensors.torch import save_file

    f = root / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    return {"name": name, "url": None, "size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}


def _part(root: Path, name: str, part: str, cfg: dict, seed: int) -> dict:
    from vaepack.loader import build_part
    from vaepack.manifest import PartSpec

    torch.manual_seed(seed)
    sd = build_part(PartSpec(part, "tae", cfg, ())).state_dict()
    return {"family": "tae", "config": cfg, "files": [_save(root, name, sd)]}


def _bridge_file(root: Path, name: str, cfg: dict, seed: int) -> dict:
    from vaepack.models.bridge import Bridge, BridgeConfig

    torch.manual_seed(seed)
    b = Bridge(BridgeConfig(**cfg))
    with torch.no_grad():  # default init fades through the layers: a gain makes outputs depend on inputs
        for p in b.parameters():
            p.mul_(3.0)
        if cfg.get("latent_skip"):  # zero-initialized for training; random here so the test sees it
            for c in b.skip.modules():
                if isinstance(c, torch.nn.Conv2d):
                    c.weight.normal_(0, 0.5)
    return _save(root, name, b.state_dict())


class Zoo:
    """The real manifest + tiny models and bridges in a temporary manifest, mirror and cache."""

    def __init__(self, root: Path, mp: pytest.MonkeyPatch):
        self.root = root
        data = yaml.safe_load(manifest_path().read_text())
        data["spaces"]["tiny8"] = {"channels": 4, "factor": 8}
        data["spaces"]["tiny32"] = {"channels": 4, "factor": 32}
        src = {"encoder": _part(root, "tiny-src-enc.safetensors", "encoder", TINY, 0),
               "decoder": _part(root, "tiny-src-dec.safetensors", "decoder", TINY, 1)}
        m = data["models"]
        m["tiny-src"] = {"description": "t", "license": "MIT", "space": "tiny8", "parts": src}
        m["tiny-src2"] = {"description": "t", "license": "MIT", "space": "tiny8", "parts": src}
        m["tiny-deconly"] = {"description": "t", "license": "MIT", "space": "tiny8",
                             "parts": {"decoder": src["decoder"]}}
        f32 = {"kind": "f32", "latent_channels": 4, "width": 8, "blocks": [1, 1, 1, 1]}
        m["tiny-dst"] = {"description": "t", "license": "MIT", "space": "tiny32",
                         "parts": {"encoder": _part(root, "tiny-dst-enc.safetensors", "encoder", f32, 2)}}
        data["bridges"] = {
            "tiny-bridge": {"description": "tiny random bridge", "license": "MIT", "source": "tiny-src",
                            "target": "tiny-dst", "family": "bridge", "config": TINY_BRIDGE,
                            "files": [_bridge_file(root, "tiny-bridge.safetensors", TINY_BRIDGE, 3)],
                            "provenance": {"command": "test"}},
            "tiny-rgb-bridge": {"description": "tiny random rgb bridge", "license": "MIT", "source": "tiny-src",
                                "target": "tiny-dst", "family": "bridge", "config": RGB_BRIDGE,
                                "files": [_bridge_file(root, "tiny-rgb-bridge.safetensors", RGB_BRIDGE, 5)]},
            # FLUX.2 -> Sana, random but with the real TAEF2 decoder as its prefix
            "rand-f2-sana": {"description": "random", "license": "MIT", "source": "taef2", "target": "taesana",
                             "config": {"tap": "s1", "tap_channels": 64, "width": 16, "blocks": [1, 1, 1, 1]},
                             "files": [_bridge_file(root, "rand-f2-sana.safetensors",
                                                    {"tap": "s1", "tap_channels": 64, "width": 16,
                                                     "blocks": [1, 1, 1, 1]}, 4)]},
        }
        self.data = data
        self.write()
        shared = os.environ.get("VAEPACK_MIRROR", "")
        mp.setenv("VAEPACK_MANIFEST", str(root / "manifest.yaml"))
        mp.setenv("VAEPACK_MIRROR", ",".join(p for p in (str(root), shared) if p))
        mp.setenv("VAEPACK_HOME", str(root / "home"))

    def write(self) -> None:
        (self.root / "manifest.yaml").write_text(yaml.safe_dump(self.data, sort_keys=False))


@pytest.fixture
def zoo(tmp_path, monkeypatch, one_thread):
    return Zoo(tmp_path, monkeypatch)


def _smooth(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, max(2, h // 8), max(2, w // 8), generator=g), (h, w), mode="bilinear",
                         align_corners=False)[0]


def _encode(model: str, h: int, w: int, scale: float = 1.0, seed: int = 0) -> L.LatentRecord:
    from vaepack.pipeline import encode_tensor
    from vaepack.runtime import load_vae

    vae = load_vae(model, parts=("encoder",), device="cpu", backend="torch")
    return encode_tensor(vae, _smooth(h, w, seed), scale, source=f"img{seed}.png", model_id=model)


def _write(zoo_root: Path, name: str, rec: L.LatentRecord) -> Path:
    p = zoo_root / name
    L.save_latent(p, rec)
    return p


# --------------------------------------------------------------------------- manifest
def test_manifest_parses_bridges(zoo):
    from vaepack.manifest import load_manifest

    man = load_manifest()
    b = man.bridges["tiny-bridge"]
    assert (b.source, b.target, b.source_space, b.target_space, b.family) == \
        ("tiny-src", "tiny-dst", "tiny8", "tiny32", "bridge")
    assert b.config["tap"] == "s0" and b.provenance == {"command": "test"} and len(b.files) == 1
    assert [x.id for x in man.bridges_for("tiny8", "tiny32")] == ["tiny-bridge", "tiny-rgb-bridge"]
    assert [x.id for x in man.bridges_for("flux2", "sana")] == ["rand-f2-sana"]
    assert man.bridges_for("tiny32", "tiny8") == [] and man.bridges_for("sd1", "sana") == []
    assert list(b.parts) == ["bridge"] and b.part("bridge").files == b.files


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.update(source="nope"), "unknown source model 'nope'"),
    (lambda d: d.update(target="nope"), "unknown target model 'nope'"),
    (lambda d: d.update(target="tiny-deconly"), "target model 'tiny-deconly' has no encoder"),
    (lambda d: d.update(source="tiny-dst"), "source model 'tiny-dst' has no decoder"),
    (lambda d: d.update(target="tiny-src2"), "both in the 'tiny8' space"),
    (lambda d: d.update(family="tae"), "unknown bridge family"),
    (lambda d: d.update(files=[]), "no weight files"),
])
def test_manifest_rejects_bad_bridges(zoo, change, needle):
    from vaepack.manifest import load_manifest

    change(zoo.data["bridges"]["tiny-bridge"])
    zoo.write()
    with pytest.raises(ManifestError, match=needle):
        load_manifest()


@pytest.mark.parametrize("bid", ["tiny-src", "default"])
def test_bridge_ids_do_not_collide_with_models_or_aliases(zoo, bid):
    from vaepack.manifest import load_manifest

    zoo.data["bridges"][bid] = zoo.data["bridges"].pop("tiny-bridge")
    zoo.write()
    with pytest.raises(ManifestError, match="already a model id or alias"):
        load_manifest()


# --------------------------------------------------------------------------- loading
def test_load_bridge_verifies_and_exposes_its_identity(zoo):
    from vaepack.bridges import load_bridge
    from vaepack.loader import load_part

    lb = load_bridge("tiny-bridge", device="cpu")
    entry = zoo.data["bridges"]["tiny-bridge"]
    assert lb.sha256 == entry["files"][0]["sha256"]
    assert lb.source_decoder_sha256 == load_part("tiny-src", "decoder")[2]
    assert lb.divisor == 8 and lb.entry.id == "tiny-bridge"
    assert not any(p.requires_grad for p in lb.parameters())
    z = torch.randn(1, 4, 12, 8)
    y = lb(z)
    assert y.shape == (1, 4, 3, 2)
    assert torch.equal(y, lb.projector(lb.tap(z)))


def test_load_bridge_refuses_tampered_and_mismatched_weights(zoo):
    from vaepack.bridges import load_bridge

    (zoo.root / "home" / "weights").mkdir(parents=True)
    cached = zoo.root / "home" / "weights" / "tiny-bridge.safetensors"
    data = bytearray((zoo.root / "tiny-bridge.safetensors").read_bytes())
    data[-1] ^= 1
    cached.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_bridge("tiny-bridge")
    cached.unlink()
    zoo.data["bridges"]["tiny-bridge"]["config"] = dict(TINY_BRIDGE, width=16)  # not the file's architecture
    zoo.write()
    with pytest.raises(WeightsError, match="do not match the manifest's architecture"):
        load_bridge("tiny-bridge")
    zoo.data["bridges"]["tiny-bridge"]["config"] = dict(TINY_BRIDGE, tap_channels=5)
    zoo.write()
    with pytest.raises(ManifestError, match="tap_channels 5"):
        load_bridge("tiny-bridge")


# --------------------------------------------------------------------------- bridge path geometry
@pytest.mark.parametrize("h, w", [(104, 56), (100, 50)])
def test_bridge_pads_odd_latents_and_records_it(zoo, h, w):
    """A 13x7 latent is replicate-padded to 16x8 (multiples of 32/8) -> a 4x2 target latent; the added
    cells become image padding, on top of the source's own."""
    from vaepack.bridges import load_bridge
    from vaepack.convert import convert_record

    rec = _encode("tiny-src", h, w)
    assert rec.latent.shape[-2:] == (13, 7)
    out = convert_record(rec, "in.latent.safetensors", "tiny-dst", via="bridge", backend="torch")
    assert out.latent.shape == (1, 4, math.ceil(13 / 4), math.ceil(7 / 4))
    l_, r, t, b = rec.padding
    assert out.padding == (l_, r + 1 * 8, t, b + 3 * 8)
    assert out.orig_size == rec.orig_size == (h, w) and out.scaled_size == (h, w) and out.scale == 1.0
    # the recorded geometry is what `decode` checks: padded image = latent * factor
    assert (4 * 32 - out.padding[2] - out.padding[3], 2 * 32 - out.padding[0] - out.padding[1]) == out.scaled_size
    lb = load_bridge("tiny-bridge")
    want = lb(F.pad(rec.latent, (0, 1, 0, 3), mode="replicate"))
    assert torch.allclose(out.latent, want, atol=1e-6)
    assert out.model == "tiny-dst" and out.space == "tiny32" and out.weights_sha256 == lb.sha256
    assert out.convention == L.convention(lb.target.space) and out.backend == "torch" and out.dtype == "fp32"
    pv = out.provenance
    assert pv["via"] == "bridge" and pv["bridge"] == "tiny-bridge" and pv["bridge_sha256"] == lb.sha256
    assert pv["source_decoder_sha256"] == lb.source_decoder_sha256 and pv["source_model"] == "tiny-src"
    assert pv["source_weights_sha256"] == rec.weights_sha256 and pv["target_model"] == "tiny-dst"
    assert pv["source_file"] == "in.latent.safetensors" and pv["source_space"] == "tiny8"


def test_remapped_source_is_resampled_to_the_original_scale(zoo):
    """Encoded at 2x: the tap features are resampled by the exact ratio (here 1/2, the same as resizing
    to the original's cell count), and the output records scale 1 at the original size."""
    from vaepack.bridges import load_bridge
    from vaepack.convert import convert_record

    rec = _encode("tiny-src", 64, 32, scale=2.0)
    assert rec.scaled_size == (128, 64) and rec.latent.shape[-2:] == (16, 8)
    out = convert_record(rec, "x", "tiny-dst", via="bridge", backend="torch")
    assert out.scale == 1.0 and out.orig_size == out.scaled_size == (64, 32)
    assert out.latent.shape == (1, 4, 2, 1) and out.padding == (0, 0, 0, 0)
    lb = load_bridge("tiny-bridge")
    f = F.interpolate(lb.tap(rec.latent), size=(8, 4), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(out.latent, lb.projector(f), atol=1e-5)
    assert not torch.allclose(out.latent, lb(rec.latent[..., :8, :4]), atol=1e-3)  # really resampled


def test_remapped_odd_source_records_padding_to_whole_target_cells(zoo):
    from vaepack.convert import convert_record

    rec = _encode("tiny-src", 60, 44, scale=1.5)  # scaled 90x66, padded 96x72, latent 12x9
    assert rec.latent.shape[-2:] == (12, 9)
    out = convert_record(rec, "x", "tiny-dst", via="bridge", backend="torch")
    # ceil(60/8) x ceil(44/8) = 8x6 cells, padded to 8x8 -> a 2x2 latent = 64x64 px
    assert out.latent.shape == (1, 4, 2, 2)
    assert out.scale == 1.0 and out.orig_size == out.scaled_size == (60, 44) and out.padding == (0, 20, 0, 4)
    assert torch.isfinite(out.latent).all()


def test_remapped_resampling_keeps_pixel_alignment():
    """With an identity tap and projector, a latent whose cells hold their centre's original-image
    position (scaled coordinates / scale) must come out holding the centres of the output cells: the
    exact ratio orig/scaled, not a stretch to whole cells (here 60 px -> 7.5 cells of 8)."""
    from types import SimpleNamespace

    from vaepack.convert import BridgeRun, bridge_record
    from vaepack.manifest import Space

    space = Space("s8", 1, 8)
    lb = SimpleNamespace(divisor=8, sha256="x", cfg=SimpleNamespace(latent_skip=0),
                         source=SimpleNamespace(id="a", space=space), target=SimpleNamespace(id="b", space=space))
    stub = BridgeRun(lb, lambda z: z, lambda f, z: f, "torch", "fp32")
    rows = (torch.arange(12.0) + 0.5) * 8 / 1.5  # 12 cells of 8 scaled px (90 px image + padding) at scale 1.5
    z = rows.view(1, 1, 12, 1).expand(1, 1, 12, 9).contiguous()
    rec = L.LatentRecord(latent=z, model="a", space="s8", weights_sha256="", scale=1.5, filter="bilinear",
                         orig_size=(60, 44), scaled_size=(90, 66), padding=(0, 6, 0, 6), convention={}, dtype="fp32")
    out = bridge_record(stub, z, rec, "x")
    assert out.latent.shape == (1, 1, 8, 6) and out.padding == (0, 4, 0, 4) and out.scale == 1.0
    got = out.latent[0, 0, :, 2]
    want = (torch.arange(8.0) + 0.5) * 8
    # interior cells; torch's antialiased weights wobble a linear ramp by ~0.15 px, a stretch to whole cells
    # (cropping the scaled area to 11 cells, resizing them to 8) would be off by up to 4 px here
    assert torch.allclose(got[1:-1], want[1:-1], atol=0.3), got


# --------------------------------------------------------------------------- rgb bridges on exported graphs
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_rgb_bridge_on_graph_runtimes_equals_torch(zoo, backend, scale):
    """An rgb-tap bridge with a latent skip runs as the source decoder's runner + its projector's ONNX
    export; at fp32 it gives what the torch bridge gives (same geometry, same provenance), including a
    remapped source, where both the decoded image and the latent are resampled to the photo's scale."""
    pytest.importorskip("onnxruntime" if backend == "onnxruntime" else "openvino")
    pytest.importorskip("onnx")
    from vaepack.convert import convert_record

    rec = _encode("tiny-src", 60, 44, scale=scale)
    ref = convert_record(rec, "x", "tiny-dst", bridge="tiny-rgb-bridge", backend="torch")
    got = convert_record(rec, "x", "tiny-dst", bridge="tiny-rgb-bridge", backend=backend, dtype="fp32")
    assert got.backend == backend and got.dtype == "fp32+fp32" and ref.backend == "torch"
    assert got.latent.shape == ref.latent.shape and got.padding == ref.padding and got.scale == ref.scale
    assert torch.allclose(got.latent, ref.latent, atol=1e-4), (got.latent - ref.latent).abs().max()
    assert got.provenance == ref.provenance and got.provenance["bridge"] == "tiny-rgb-bridge"


def test_rgb_bridge_latent_skip_reads_the_latent(zoo):
    """By hand: projector(decoded image, latent); the remapped path resamples the latent like the
    image (8-px cells at the original scale). Without the skip the output differs."""
    from vaepack.bridges import load_bridge
    from vaepack.convert import convert_record

    lb = load_bridge("tiny-rgb-bridge")
    rec = _encode("tiny-src", 64, 32)
    out = convert_record(rec, "x", "tiny-dst", bridge="tiny-rgb-bridge", backend="torch")
    assert torch.allclose(out.latent, lb.projector(lb.tap(rec.latent), rec.latent), atol=1e-6)
    assert not torch.allclose(out.latent, lb.projector.layers(lb.tap(rec.latent)), atol=1e-3)
    with pytest.raises(ValueError, match="source latent"):
        lb.projector(lb.tap(rec.latent))
    rec2 = _encode("tiny-src", 64, 32, scale=2.0)
    out2 = convert_record(rec2, "x", "tiny-dst", bridge="tiny-rgb-bridge", backend="torch")
    f = F.interpolate(lb.tap(rec2.latent), size=(64, 32), mode="bilinear", antialias=True, align_corners=False)
    z = F.interpolate(rec2.latent, size=(8, 4), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(out2.latent, lb.projector(f, z), atol=1e-5)


def test_bridge_export_is_cached_verified_and_refused_for_deep_taps(zoo, vaepack_warnings):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from vaepack.bridges import load_bridge
    from vaepack.export.bridge import cached_bridge_export

    lb = load_bridge("tiny-rgb-bridge")
    path, sc = cached_bridge_export(lb)
    assert sc["bridge"] == "tiny-rgb-bridge" and sc["weights_sha256"] == lb.sha256
    assert [t["name"] for t in sc["inputs"]] == ["image", "latent"] and sc["parity"]["max_rel_err"] < 1e-4
    mtime = path.stat().st_mtime_ns
    assert cached_bridge_export(lb)[0] == path and path.stat().st_mtime_ns == mtime  # reused
    path.write_bytes(path.read_bytes() + b"x")  # tampered: exported again, with a warning
    path2, sc2 = cached_bridge_export(lb)
    assert any("unusable" in m for m in vaepack_warnings) and sc2["onnx_sha256"] != "" and path2 == path
    with pytest.raises(UsageError, match="only rgb-tap"):
        cached_bridge_export(load_bridge("tiny-bridge"))


def test_deep_tap_bridge_refuses_graph_backends(zoo, clean_error, tmp_path, run_cli):
    p = _write(tmp_path, "a.latent.safetensors", _encode("tiny-src", 64, 64))
    code, out, err = run_cli("convert", p, "--to", "tiny-dst", "--bridge", "tiny-bridge", "--backend", "openvino",
                             "-o", tmp_path / "o.safetensors")
    assert code != 0
    clean_error(err, "runs in torch")
    assert not (tmp_path / "o.safetensors").exists()


def test_pixel_path_decodes_to_the_original_size_first(zoo):
    from vaepack.convert import convert_record

    rec = _encode("tiny-src", 60, 44, scale=1.5)
    out = convert_record(rec, "x", "tiny-dst", via="pixel", backend="torch")
    assert out.scale == 1.0 and out.orig_size == out.scaled_size == (60, 44) and out.padding == (0, 20, 0, 4)
    assert out.latent.shape == (1, 4, 2, 2) and out.provenance["via"] == "pixel"
    assert out.provenance["target_encoder_sha256"] == out.weights_sha256
    assert "bridge" not in out.provenance


def test_pixel_path_runs_tiled_above_the_budget(zoo):
    """Large latents decode and re-encode tile by tile, exactly as `decode` then `encode` with the same
    tile options (random tiny models have a wide receptive field, so tiles visibly change the result)."""
    from vaepack.convert import convert_record
    from vaepack.pipeline import TileOptions, decode_record, encode_tensor
    from vaepack.runtime import load_vae

    rec = _encode("tiny-src", 200, 136)
    tiles = TileOptions(budget=64 * 64, tile=64, overlap=16)
    whole = convert_record(rec, "x", "tiny-dst", via="pixel", backend="torch", tiles=TileOptions(budget=0))
    tiled = convert_record(rec, "x", "tiny-dst", via="pixel", backend="torch", tiles=tiles)
    dec = load_vae("tiny-src", parts=("decoder",), device="cpu", backend="torch")
    enc = load_vae("tiny-dst", parts=("encoder",), device="cpu", backend="torch")
    want = encode_tensor(enc, decode_record(dec, rec, tiles=tiles), tiles=tiles)
    assert tiled.latent.shape == whole.latent.shape == want.latent.shape == (1, 4, 7, 5)
    assert torch.equal(tiled.latent, want.latent) and not torch.allclose(tiled.latent, whole.latent, atol=1e-4)
    assert tiled.padding == whole.padding == (0, 24, 0, 24) and tiled.backend == "torch"


def test_converted_metadata_round_trips(zoo, tmp_path):
    from vaepack.convert import convert_record

    out = convert_record(_encode("tiny-src", 40, 24), "src.latent.safetensors", "tiny-dst", backend="torch")
    p = _write(tmp_path, "out.latent.safetensors", out)
    back = L.load_latent(p)
    assert back.provenance == out.provenance and back.provenance["via"] == "bridge"
    for k in ("model", "space", "weights_sha256", "scale", "orig_size", "scaled_size", "padding", "convention",
              "dtype", "backend", "source"):
        assert getattr(back, k) == getattr(out, k), k
    assert torch.equal(back.latent, out.latent)
    # files without conversion provenance (encoded ones, older files) read back with none
    enc = _write(tmp_path, "enc.latent.safetensors", _encode("tiny-src", 40, 24))
    assert L.load_latent(enc).provenance == {}
    from safetensors.torch import load_file, save_file

    meta = out.metadata()
    meta["conversion"] = "[1, 2]"
    save_file({"latent": out.latent.contiguous()}, str(tmp_path / "bad.latent.safetensors"), metadata=meta)
    with pytest.raises(LatentFileError, match="'conversion' is malformed"):
        L.load_latent(tmp_path / "bad.latent.safetensors")
    assert load_file(str(p))["latent"].shape == out.latent.shape


# --------------------------------------------------------------------------- choosing the path
def test_auto_picks_the_bridge_and_pixel_is_available(zoo, tmp_path, run_cli):
    src = _write(tmp_path, "a.latent.safetensors", _encode("tiny-src", 56, 40))
    code, out, err = run_cli("convert", src, "--to", "tiny-dst", "-o", tmp_path / "b.latent.safetensors",
                             "--backend", "torch", "--json")
    assert code == 0, err
    row = json.loads(out)["ok"][0]
    assert row["via"] == "bridge" and row["bridge"] == "tiny-bridge" and row["target_model"] == "tiny-dst"
    assert row["source_model"] == "tiny-src" and row["latent_shape"] == [1, 4, 2, 2]
    assert row["input"] == str(src) and row["output"] == str(tmp_path / "b.latent.safetensors")
    assert L.load_latent(tmp_path / "b.latent.safetensors").provenance["bridge"] == "tiny-bridge"
    code, out, err = run_cli("convert", src, "--to", "tiny-dst", "-o", tmp_path / "c.latent.safetensors",
                             "--via", "pixel", "--backend", "torch", "--json")
    assert code == 0, err
    row = json.loads(out)["ok"][0]
    assert row["via"] == "pixel" and row["bridge"] is None
    # no overwrite without --force
    code, _, err = run_cli("convert", src, "--to", "tiny-dst", "-o", tmp_path / "c.latent.safetensors",
                           "--backend", "torch")
    assert code == 1 and "output exists" in err
    assert run_cli("convert", src, "--to", "tiny-dst", "-o", tmp_path / "c.latent.safetensors",
                   "--backend", "torch", "--force")[0] == 0
    assert L.load_latent(tmp_path / "c.latent.safetensors").provenance["via"] == "bridge"


def test_several_inputs_go_to_a_directory(zoo, tmp_path, run_cli):
    a = _write(tmp_path, "a.latent.safetensors", _encode("tiny-src", 40, 24, seed=1))
    b = _write(tmp_path, "b.latent.safetensors", _encode("tiny-src", 48, 40, seed=2))
    code, out, err = run_cli("convert", a, b, "--to", "tiny-dst", "-o", tmp_path / "out", "--backend", "torch",
                             "--json")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.latent.safetensors", "b.latent.safetensors"]
    assert json.loads(out)["to"] == "tiny-dst"


def test_via_bridge_without_a_bridge_for_the_pair_is_refused(zoo, tmp_path, run_cli, clean_error):
    src = _write(tmp_path, "a.latent.safetensors", _encode("tiny-src", 40, 24))
    out = tmp_path / "o.latent.safetensors"
    code, _, err = run_cli("convert", src, "--to", "taesana", "--via", "bridge", "-o", out)
    assert code == 2
    clean_error(err, "no bridge", "'tiny8'", "'sana'", "tiny-src -> taesana")
    assert not out.exists()
    code, _, err = run_cli("convert", src, "--to", "taesana", "--bridge", "tiny-bridge", "-o", out)
    assert code == 2
    clean_error(err, "tiny-bridge", "'tiny32'", "'sana'")
    code, _, err = run_cli("convert", src, "--to", "tiny-dst", "--bridge", "nope", "-o", out)
    assert code == 2
    clean_error(err, "unknown bridge 'nope'")
    assert not out.exists()


def test_same_space_and_missing_parts(zoo, tmp_path, run_cli, clean_error):
    from vaepack.convert import convert_record

    rec = _encode("tiny-src", 40, 24)
    with pytest.raises(UsageError, match="nothing to convert"):
        convert_record(rec, "x", "tiny-src")
    with pytest.raises(UsageError, match="no bridge applies"):
        convert_record(rec, "x", "tiny-src2", via="bridge")
    out = convert_record(rec, "x", "tiny-src2", backend="torch")  # another model of the space: re-encode
    assert out.provenance["via"] == "pixel" and out.model == "tiny-src2" and out.latent.shape == rec.latent.shape
    with pytest.raises(UsageError, match="'tiny-deconly' has no encoder"):
        convert_record(rec, "x", "tiny-deconly")
    rec.model = "tiny-dst"  # a space whose writer has no decoder: the pixel path cannot run it
    rec.space, rec.convention = "tiny32", L.convention(zoo_space("tiny32"))
    with pytest.raises(UsageError, match="'tiny-dst' has no decoder"):
        convert_record(rec, "x", "tiny-src2", via="pixel", backend="torch")
    with pytest.raises(UsageError, match="contradict"):
        convert_record(rec, "x", "tiny-dst", via="pixel", bridge="tiny-bridge")
    with pytest.raises(UsageError, match="unknown --via"):
        convert_record(rec, "x", "tiny-dst", via="latent")


def zoo_space(name: str):
    from vaepack.manifest import load_manifest

    return load_manifest().spaces[name]


# --------------------------------------------------------------------------- bad inputs
def _wrong(tmp_path: Path, name: str, rec: L.LatentRecord, **changes) -> Path:
    for k, v in changes.items():
        setattr(rec, k, v)
    return _write(tmp_path, name, rec)


def test_wrong_space_and_corrupt_latents_are_one_line_errors(zoo, tmp_path, run_cli, clean_error):
    base = _encode("tiny-src", 40, 24)
    sd1 = L.convention(zoo_space("sd1"))
    bad_space = _wrong(tmp_path, "sd1.latent.safetensors", _encode("tiny-src", 40, 24), space="sd1", model="taesd",
                       convention=sd1)
    conv = dict(base.convention, scale="0.5")
    bad_conv = _wrong(tmp_path, "conv.latent.safetensors", _encode("tiny-src", 40, 24), convention=conv)
    bad_ch = _wrong(tmp_path, "ch.latent.safetensors", _encode("tiny-src", 40, 24),
                    latent=torch.randn(1, 5, 5, 3))
    corrupt = tmp_path / "corrupt.latent.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file" * 10)
    cases = [(bad_space, ["--bridge", "tiny-bridge"], ["'sd1' space", "tiny-bridge"]),
             (bad_conv, ["--via", "bridge"], ["convention differs", "scale"]),
             (bad_ch, ["--via", "bridge"], ["5 channels"]),
             (corrupt, [], ["not a readable safetensors"])]
    for src, opts, needles in cases:
        out = tmp_path / "o.latent.safetensors"
        code, _, err = run_cli("convert", src, "--to", "tiny-dst", "-o", out, "--backend", "torch", *opts)
        assert code == 1, (src, err)
        clean_error(err, src.name, *needles)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_keep_going_skips_bad_files(zoo, tmp_path, run_cli):
    good = _write(tmp_path, "good.latent.safetensors", _encode("tiny-src", 40, 24))
    corrupt = tmp_path / "bad.latent.safetensors"
    corrupt.write_bytes(b"junk")
    code, out, err = run_cli("convert", corrupt, good, "--to", "tiny-dst", "-o", tmp_path / "out", "--backend",
                             "torch", "--keep-going", "--json")
    assert code == 1
    res = json.loads(out)
    assert [r["input"] for r in res["ok"]] == [str(good)] and res["failed"][0]["input"] == str(corrupt)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.latent.safetensors"]


def test_bare_latents_need_model(zoo, tmp_path, run_cli, clean_error):
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"latent": torch.randn(1, 4, 5, 3)}, str(bare))
    out = tmp_path / "o.latent.safetensors"
    code, _, err = run_cli("convert", bare, "--to", "tiny-dst", "-o", out, "--backend", "torch")
    assert code == 1
    clean_error(err, "no vaepack metadata", "--model")
    code, stdout, err = run_cli("convert", bare, "--to", "tiny-dst", "-o", out, "--model", "tiny-src",
                                "--backend", "torch", "--json")
    assert code == 0, err
    rec = L.load_latent(out)
    # the native decoded size is the image: 40x24, padded to 64x32 for the 2x1 target latent
    assert rec.orig_size == (40, 24) and rec.padding == (0, 8, 0, 24) and rec.latent.shape == (1, 4, 2, 1)


# --------------------------------------------------------------------------- weights commands
def test_weights_list_pull_verify_cover_bridges(zoo, run_cli):
    code, out, err = run_cli("weights", "list", "--json")
    assert code == 0, err
    res = json.loads(out)
    rows = {r["id"]: r for r in res["bridges"]}
    assert rows["tiny-bridge"]["kind"] == "bridge" and rows["tiny-bridge"]["status"] == "not cached"
    assert rows["tiny-bridge"]["source"] == "tiny-src" and rows["tiny-bridge"]["target_space"] == "tiny32"
    assert all(r["kind"] == "model" for r in res["models"]) and "tiny-bridge" not in {r["id"] for r in res["models"]}
    code, out, _ = run_cli("weights", "list")
    assert code == 0 and "bridges" in out and "tiny-bridge" in out
    code, out, err = run_cli("weights", "pull", "tiny-bridge", "--json")
    assert code == 0, err
    assert json.loads(out)["kind"] == "bridge"
    code, out, _ = run_cli("weights", "verify", "--json")
    assert code == 0
    assert {"model": "tiny-bridge", "kind": "bridge", "file": "tiny-bridge.safetensors", "status": "ok"} in \
        json.loads(out)["files"]
    cached = zoo.root / "home" / "weights" / "tiny-bridge.safetensors"
    data = bytearray(cached.read_bytes())
    data[-1] ^= 1
    cached.write_bytes(bytes(data))
    code, out, _ = run_cli("weights", "verify", "tiny-bridge", "--json")
    assert code == 1 and json.loads(out)["files"][0]["status"] == "bad"
    code, out, _ = run_cli("weights", "path", "tiny-bridge")
    assert code == 0 and out.strip() == str(cached)


# --------------------------------------------------------------------------- real TAEF2 -> TAESana
@pytest.fixture
def photo(dev_photo, shared_weights):
    from vaepack.io import load_image

    return load_image(dev_photo)[:, 20:170, 30:120].contiguous()  # 150x90: both encoders pad


def test_pixel_path_equals_decode_then_encode_by_hand(zoo, photo):
    """TAEF2 latent -> TAESana: the raw TAEF2 decoder (clamped to [0, 1], crop of the padding), then the
    raw TAESana encoder on the reflect-padded image, equal the pixel path."""
    from vaepack.convert import convert_record
    from vaepack.loader import load_part

    rec = _encode_x("taef2", photo)
    assert rec.padding == (0, 6, 0, 2)  # 150x90 -> 152x96
    out = convert_record(rec, "p.latent.safetensors", "taesana", via="pixel", backend="torch", dtype="fp32")
    dec, _, dec_sha = load_part("taef2", "decoder")
    enc, _, enc_sha = load_part("taesana", "encoder")
    with torch.no_grad():
        y = dec(rec.latent).clamp(0, 1)[..., :150, :90]
        want = enc(F.pad(y, (0, 6, 0, 10), mode="reflect"))  # 150x90 -> 160x96
    assert out.latent.shape == want.shape == (1, 32, 5, 3)
    assert torch.allclose(out.latent, want, atol=1e-5), (out.latent - want).abs().max()
    assert out.padding == (0, 6, 0, 10) and out.orig_size == (150, 90) and out.scale == 1.0
    assert out.model == "taesana" and out.space == "sana" and out.weights_sha256 == enc_sha
    pv = out.provenance
    assert pv["via"] == "pixel" and pv["target_encoder_sha256"] == enc_sha and pv["source_decoder_sha256"] == dec_sha
    assert pv["source_weights_sha256"] == rec.weights_sha256 and pv["source_model"] == "taef2"


def _encode_x(model: str, x: torch.Tensor) -> L.LatentRecord:
    from vaepack.pipeline import encode_tensor
    from vaepack.runtime import load_vae

    return encode_tensor(load_vae(model, parts=("encoder",), device="cpu", backend="torch"), x, source="p.png",
                         model_id=model)


def test_flux2_bridge_takes_packed_latents_and_auto_picks_it(zoo, photo, tmp_path, run_cli):
    from vaepack.bridges import load_bridge
    from vaepack.convert import convert_record

    x = photo[:, :144, :80]  # FLUX.2 packing needs an even latent: 18x10
    rec = _encode_x("taef2", x)
    out = convert_record(rec, "p", "taesana", backend="torch")
    lb = load_bridge("rand-f2-sana")
    assert out.provenance["bridge"] == "rand-f2-sana" and lb.divisor == 4
    assert out.latent.shape == (1, 32, 5, 3) and out.padding == (0, 16, 0, 16)
    assert out.provenance["source_decoder_sha256"] == lb.source_decoder_sha256
    packed = L.LatentRecord(**{**rec.__dict__, "latent": L.flux2_pack(rec.latent), "packed": True})
    p = _write(tmp_path, "packed.latent.safetensors", packed)
    code, stdout, err = run_cli("convert", p, "--to", "taesana", "-o", tmp_path / "o.latent.safetensors",
                                "--backend", "torch", "--json")
    assert code == 0, err
    assert json.loads(stdout)["ok"][0]["bridge"] == "rand-f2-sana"
    assert torch.allclose(L.load_latent(tmp_path / "o.latent.safetensors").latent, out.latent, atol=1e-6)
