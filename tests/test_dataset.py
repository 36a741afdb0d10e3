"""`vaepack dataset`: sharded, resumable latent caching (vaepack/data/), local engine and reader.

Tiny generated images, the embedded default model, torch fp32 (exact and fast); the Ray engine's
tests are in test_dataset_ray.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vaepack.data import plan as P
from vaepack.data import shards as S
from vaepack.data.job import EncodeOptions, encode_dataset
from vaepack.data.reader import BucketBatchSampler, LatentShards, collate

GOOD = {"a.png": (96, 64), "b.png": (64, 96), "sub/c.png": (128, 128), "sub/d.png": (96, 64), "e.png": (80, 72),
        "sub/deeper/f.png": (64, 64), "g.png": (128, 96), "h.png": (100, 70)}  # name: (w, h)
BAD = ("trunc.jpg", "random.png", "empty.png", "tiny.png")
SHARD = 3  # 12 inputs -> 4 units


def make_photos(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, (w, h) in GOOD.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:h, 0:w]  # smooth content plus noise: photo-like enough for a VAE
        a = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], -1)
        a = np.clip(a + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(p)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "trunc.jpg", quality=90)
    data = (root / "trunc.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    (root / "random.png").write_bytes(rng.bytes(600))  # random bytes named .png
    (root / "empty.png").write_bytes(b"")  # zero bytes
    Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(root / "tiny.png")  # below one latent pixel
    return root


def opts(**kw) -> EncodeOptions:
    base = dict(backend="torch", dtype="fp32", device="cpu", shard_size=SHARD, batch_size=2, max_error_rate=1.0)
    return EncodeOptions(**{**base, **kw})


def latents(out: Path) -> dict[str, torch.Tensor]:
    """key -> latent (and key + '~flip' -> the mirrored one), read through the shards."""
    from safetensors.torch import load_file

    res = {}
    for r in S.read_index(out):
        t = load_file(str(out / r["shard"]))
        res[r["key"]] = t[f"latent.{r['index']}"]
        if f"latent_flip.{r['index']}" in t:
            res[r["key"] + "~flip"] = t[f"latent_flip.{r['index']}"]
    return res


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread: on the shared 2-core machine it is faster and leaves a core to the worker tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def encoded(photos, tmp_path_factory):
    """One uninterrupted run: (OUT, summary)."""
    out = tmp_path_factory.mktemp("ds") / "out"
    return out, encode_dataset(photos, out, opts())


# --------------------------------------------------------------------------- end to end
def test_bad_images_are_listed_and_the_run_goes_on(encoded):
    out, s = encoded
    assert s.encoded == len(GOOD) and s.skipped == 0 and s.units == 4 and s.shards == 4
    assert sorted(r["key"] for r in S.read_index(out)) == sorted(GOOD)
    errs = [json.loads(ln) for ln in (out / S.ERRORS_JSONL).read_text().splitlines()]
    assert sorted(e["key"] for e in errs) == sorted(BAD)
    assert sorted(f["key"] for f in s.failed) == sorted(BAD)
    assert all(f["input"] and f["error"] and f["error_type"] == "ImageError" for f in s.failed)
    assert s.errors == 4 and s.error_rate == pytest.approx(4 / 12) and s.too_many_errors is False  # max 1.0 here
    s2 = s.as_dict()
    assert {"encoded", "skipped", "failed", "shards", "images_per_s", "fingerprint"} <= set(s2)
    # layout: shards/NNN/shard-NNNNNN.* with a done marker and an errors file each
    for u in range(4):
        assert S.shard_path(out, u).is_file() and S.errors_path(out, u).is_file() and S.done_path(out, u).is_file()
    assert S.shard_path(out, 3).relative_to(out).as_posix() == "shards/000/shard-000003.safetensors"
    m = json.loads((out / "manifest.json").read_text())
    assert m["settings"]["model"] == "vaepack-f2-p64" and m["settings"]["backend"] == "torch"
    assert m["settings"]["precision"] == "fp32" and m["fingerprint"] == s.fingerprint
    assert {"weights_sha256", "convention", "scale", "filter", "buckets", "schema"} <= set(m["settings"])
    assert m["vaepack_version"] and m["schema"] == P.SCHEMA_VERSION
    v = S.verify_dataset(out)
    assert v["ok"], v["problems"]
    assert v["images"] == len(GOOD) and v["errors"] == 4


def test_latents_match_vaepack_encode(encoded, photos, tmp_path, run_cli):
    out, _ = encoded
    from vaepack.latents import load_latent

    code, _, err = run_cli("encode", photos / "sub/c.png", "-o", tmp_path / "c.latent.safetensors",
                           "--backend", "torch", "--dtype", "fp32")
    assert code == 0, err
    ref = load_latent(tmp_path / "c.latent.safetensors").latent[0]
    z = latents(out)["sub/c.png"]
    assert z.shape == ref.shape and torch.allclose(z, ref, atol=1e-5, rtol=0)
    row = next(r for r in S.read_index(out) if r["key"] == "sub/c.png")
    assert row["original_size"] == [128, 128] and row["crop_top_left"] == [0, 0] and row["latent_shape"] == [32, 16, 16]


def test_large_images_run_tiled_like_encode(photos, tmp_path):
    """Above the tile budget a latent comes from the same tiled path as `vaepack encode` (torch module)."""
    from vaepack.io import load_image
    from vaepack.pipeline import TileOptions, encode_tensor
    from vaepack.runtime import load_vae

    out = tmp_path / "out"
    s = encode_dataset(photos, out, opts(tile_budget=96 * 96, tile_size=64, tile_overlap=16))
    assert s.encoded == len(GOOD) and S.read_manifest(out)["settings"]["tiles"] == [9216, 64, 16]
    vae = load_vae("default", parts=("encoder",), device="cpu", dtype="fp32", backend="torch")
    ref = encode_tensor(vae, load_image(photos / "sub/c.png", uint8=True), tiles=TileOptions(9216, 64, 16))
    assert torch.equal(latents(out)["sub/c.png"], ref.latent[0])


def test_fault_after_one_unit_then_rerun_equals_uninterrupted(encoded, photos, tmp_path):
    out_ok, full = encoded
    out = tmp_path / "out"

    class Crash(Exception):
        pass

    def crash(_res):
        raise Crash

    with pytest.raises(Crash):
        encode_dataset(photos, out, opts(), on_result=crash)
    done = [u for u in range(4) if S.done_path(out, u).is_file()]
    assert done == [0] and not (out / S.INDEX_JSONL).exists()  # crashed after one unit, before the index
    s = encode_dataset(photos, out, opts())
    in_unit0 = sum(r["unit"] == 0 for r in S.read_index(out_ok))
    assert s.units_encoded == 3 and s.skipped == SHARD and s.encoded == full.encoded - in_unit0
    assert s.fingerprint == full.fingerprint
    assert (out / S.INDEX_JSONL).read_text() == (out_ok / S.INDEX_JSONL).read_text()
    assert (out / S.ERRORS_JSONL).read_text() == (out_ok / S.ERRORS_JSONL).read_text()
    a, b = latents(out_ok), latents(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical (torch fp32)
    again = encode_dataset(photos, out, opts())  # all done: nothing encoded
    assert again.encoded == 0 and again.units_encoded == 0 and again.skipped == 12 and again.images == len(GOOD)


def test_changed_scale_or_weights_is_refused_unless_forced(encoded, photos, tmp_path, monkeypatch):
    from vaepack.data import job as J

    out_ok, _ = encoded
    out = tmp_path / "out"
    shutil.copytree(out_ok, out)
    with pytest.raises(P.DatasetError, match=r"other settings \(differ in: scale\).*--force"):
        encode_dataset(photos, out, opts(scale=1.5))
    real = J.loaded_as
    monkeypatch.setattr(J, "loaded_as", lambda vae: (*real(vae)[:2], "0" * 64))  # the encoder's weights changed
    with pytest.raises(P.DatasetError, match=r"differ in: weights_sha256"):
        encode_dataset(photos, out, opts())
    monkeypatch.setattr(J, "loaded_as", real)
    s = encode_dataset(photos, out, opts(scale=1.5, force=True))  # --force: discard and encode again
    assert s.units_encoded == 4 and s.skipped == 0 and s.encoded == len(GOOD)
    assert S.read_manifest(out)["settings"]["scale"] == 1.5
    with pytest.raises(P.DatasetError, match="not empty and not a vaepack dataset"):
        encode_dataset(photos, photos, opts())  # a folder of other files is never written into


def test_append_adds_new_files_as_new_units(encoded, photos, tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    shutil.copytree(photos, src)
    out = tmp_path / "out"
    shutil.copytree(encoded[0], out)
    Image.fromarray(np.full((64, 80, 3), 128, np.uint8)).save(src / "0new.png")  # sorts first: still a new unit
    s = encode_dataset(src, out, opts())
    assert s.new_inputs == 1 and s.encoded == 0  # without --append the plan stays
    s = encode_dataset(src, out, opts(append=True))
    assert s.units == 5 and s.units_encoded == 1 and s.encoded == 1 and s.images == len(GOOD) + 1
    assert S.read_index(out)[-1]["key"] == "0new.png" and S.read_index(out)[-1]["unit"] == 4


def test_two_workers_give_the_same_latents(encoded, photos, tmp_path):
    out = tmp_path / "out"
    s = encode_dataset(photos, out, opts(workers=2))
    assert s.encoded == len(GOOD) and s.units_encoded == 4 and s.workers == 2
    a, b = latents(encoded[0]), latents(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_verify_finds_a_damaged_shard_and_info_counts(encoded, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(encoded[0], out)
    info = S.dataset_info(out)
    assert (info["units"], info["units_done"], info["images"], info["errors"], info["inputs"]) == (4, 4, 8, 4, 12)
    assert sum(info["shapes"].values()) == 8 and info["bytes"] > 0
    shard = S.shard_path(out, 1)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, other bytes: only the hash sees it
    shard.write_bytes(bytes(data))
    v = S.verify_dataset(out)
    assert not v["ok"] and v["problems"][0]["file"] == "shards/000/shard-000001.safetensors"
    assert "sha256" in v["problems"][0]["error"]
    S.done_path(out, 2).unlink()
    v = S.verify_dataset(out)
    assert v["missing_units"] == [2]


# --------------------------------------------------------------------------- buckets
def test_buckets_are_a_pure_function_of_size_and_spec():
    spec = P.BucketSpec()
    sizes = P.bucket_sizes(spec)
    assert all(w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 2048 and w * h <= 1024 * 1024
               for w, h in sizes)
    assert (1024, 1024) in sizes and (1216, 832) in sizes and (832, 1216) in sizes  # SDXL's usual buckets
    assert P.bucket_for(1000, 1000, spec) == (1024, 1024)
    assert P.bucket_for(1920, 1080, spec) == P.bucket_for(3840, 2160, spec) == P.bucket_for(960, 540, spec)
    w, h = P.bucket_for(1920, 1080, spec)
    assert P.bucket_for(1080, 1920, spec) == (h, w)  # transposed image, transposed bucket
    assert abs(np.log(w / h) - np.log(1920 / 1080)) < 0.1
    assert [P.bucket_for(640, 480, spec) for _ in range(3)] == [P.bucket_for(640, 480, P.BucketSpec())] * 3
    (rw, rh), (left, top) = P.cover_crop(1920, 1080, w, h)
    assert rw >= w and rh >= h and (left, top) == ((rw - w) // 2, (rh - h) // 2) and min(rw - w, rh - h) == 0
    assert P.parse_buckets("none") is None and P.parse_buckets(None) is None
    assert P.parse_buckets("max-area=65536,step=32,min=64") == P.BucketSpec(65536, 32, 64, 2048)
    for bad in ("max-area=x", "foo=1", "step=64,min=32", "min=512,max=256"):
        with pytest.raises(P.UsageError):
            P.parse_buckets(bad)


def test_buckets_flip_reader_and_sampler(photos, tmp_path):
    out = tmp_path / "out"
    s = encode_dataset(photos, out, opts(buckets="max-area=9216,step=32,min=64,max=160", flip=True))
    assert s.encoded == len(GOOD)
    rows = S.read_index(out)
    spec = P.parse_buckets("max-area=9216,step=32,min=64,max=160")
    for r in rows:
        oh, ow = r["original_size"]
        bw, bh = P.bucket_for(ow, oh, spec)
        assert r["target_size"] == [bh, bw] and r["latent_shape"] == [32, bh // 8, bw // 8] and r["flip"]
    z = latents(out)
    assert all(k + "~flip" in z and not torch.equal(z[k], z[k + "~flip"]) for k in GOOD)

    ds = LatentShards(out, expect_model="default", flip_prob=0.5, seed=1)
    assert len(ds) == len(GOOD) and {ds[i]["key"] for i in range(len(ds))} == set(GOOD)
    flips = [ds[i]["flipped"] for i in range(len(ds))]
    assert flips == [ds[i]["flipped"] for i in range(len(ds))] and any(flips)  # seeded per (seed, epoch, index)
    for i in range(len(ds)):
        it, r = ds[i], rows[i]
        want = z[r["key"] + ("~flip" if it["flipped"] else "")]
        assert torch.equal(it["latent"], want) and it["original_size"] == tuple(r["original_size"])
        top, left = r["crop_top_left"]
        if it["flipped"]:
            left = r["resized_size"][1] - r["target_size"][1] - left
        assert it["crop_top_left"] == (top, left)

    sampler = BucketBatchSampler(ds, batch_size=2, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    for b in batches:
        assert len({ds.shapes[i] for i in b}) == 1  # one shape per batch
        batch = collate([ds[i] for i in b])
        assert batch["latent"].shape[0] == len(b) and batch["target_size"].shape == (len(b), 2)
    sampler.set_epoch(1)
    assert list(sampler) != batches or len(batches) < 3
    ranks = [list(BucketBatchSampler(ds, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and {i for r in ranks for b in r for i in b} == set(range(len(ds)))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    assert sum(len(b["key"]) for b in loader) == len(ds)


def test_sampler_alone():
    shapes = [(4, 8, 8)] * 5 + [(4, 8, 16)] * 3 + [(4, 16, 8)]
    s = BucketBatchSampler(shapes, batch_size=2, seed=0, drop_last=True)
    assert all(len(b) == 2 and len({shapes[i] for i in b}) == 1 for b in s) and len(s) == 3
    a = list(BucketBatchSampler(shapes, 2, seed=5))
    assert a == list(BucketBatchSampler(shapes, 2, seed=5)) and a != list(BucketBatchSampler(shapes, 2, seed=6))
    r = [list(BucketBatchSampler(shapes, 2, seed=0, rank=k, world_size=3)) for k in range(3)]
    assert len({len(x) for x in r}) == 1


def test_reader_refuses_a_stale_cache(encoded, monkeypatch):
    out, s = encoded
    import vaepack.weights as W

    assert len(LatentShards(out, expect_model="default", expect_fingerprint=s.fingerprint)) == len(GOOD)
    with pytest.raises(P.DatasetError, match="fingerprint"):
        LatentShards(out, expect_fingerprint="0" * 64)
    with pytest.raises(P.DatasetError, match="without --flip"):
        LatentShards(out, flip_prob=0.5)
    monkeypatch.setattr(W, "weights_digest", lambda entry, part: "f" * 64)
    with pytest.raises(P.DatasetError, match="stale: encoded with other weights"):
        LatentShards(out, expect_model="default")
    with pytest.raises(P.DatasetError, match="not a vaepack dataset"):
        LatentShards(out / "shards")


# --------------------------------------------------------------------------- inputs
def test_inputs_from_a_list_a_glob_and_parquet(photos, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"# photos\n{photos / 'a.png'}\n\n{photos / 'sub/c.png'}\nmissing.png\n")
    items = P.collect_inputs(lst)
    assert [i.key for i in items] == sorted([str(photos / "a.png"), str(photos / "sub/c.png"), "missing.png"])
    assert next(i for i in items if i.key == "missing.png").size == -1
    g = P.collect_inputs(str(photos / "sub" / "*.png"))
    assert [i.key for i in g] == ["c.png", "d.png"]
    assert [i.key for i in P.collect_inputs(photos)] == sorted([*GOOD, *BAD])
    with pytest.raises(P.UsageError, match="no files match"):
        P.collect_inputs(str(photos / "*.nothing"))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(photos / "b.png"), str(photos / "e.png")]}), tmp_path / "l.parquet")
    assert [i.key for i in P.collect_inputs(tmp_path / "l.parquet")] == [str(photos / "b.png"), str(photos / "e.png")]


def test_a_listed_missing_file_is_an_error_not_a_crash(photos, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"{photos / 'a.png'}\n{tmp_path / 'gone.png'}\n")
    s = encode_dataset(lst, tmp_path / "out", opts(max_error_rate=0.05))
    assert s.encoded == 1 and [f["key"] for f in s.failed] == [str(tmp_path / "gone.png")]
    assert s.too_many_errors  # 1 of 2 failed: above 5%


# --------------------------------------------------------------------------- devices
def test_device_cuda_is_a_clean_error_without_a_gpu(photos, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from vaepack.errors import UsageError

    with pytest.raises(UsageError, match="cuda"):
        encode_dataset(photos, tmp_path / "out", opts(device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_encodes_like_cpu(encoded, photos, tmp_path):
    out = tmp_path / "out"
    s = encode_dataset(photos, out, opts(device="cuda"))
    assert s.encoded == len(GOOD)
    a, b = latents(encoded[0]), latents(out)
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a)


# --------------------------------------------------------------------------- CLI
def test_cli_encode_info_verify(photos, tmp_path, run_cli, clean_error):
    out = tmp_path / "out"
    args = ("dataset", "encode", photos, out, "--backend", "torch", "--dtype", "fp32", "--shard-size", "3")
    code, stdout, err = run_cli(*args, "--json", "--max-error-rate", "0.5")
    assert code == 0, err
    d = json.loads(stdout)
    assert d["encoded"] == len(GOOD) and d["skipped"] == 0 and d["shards"] == 4 and d["images_per_s"] > 0
    assert sorted(f["key"] for f in d["failed"]) == sorted(BAD) and all({"input", "error"} <= set(f) for f in d["failed"])
    assert len(d["fingerprint"]) == 64 and d["backend"] == "torch" and d["dtype"] == "fp32"
    code, stdout, err = run_cli(*args)  # resumes (nothing left) but 4 of 12 bad is above the default 5%
    assert code == 1 and "exceed --max-error-rate 0.05" in err and "skipped 12 already done" in err
    code, _, err = run_cli(*args, "--scale", "1.5")
    assert code == 1
    clean_error(err, str(out), "differ in: scale", "--force")
    code, stdout, err = run_cli("dataset", "info", out, "--json")
    assert code == 0 and json.loads(stdout)["images"] == len(GOOD)
    code, stdout, err = run_cli("dataset", "info", out)
    assert code == 0 and "4/4 done" in stdout
    code, stdout, err = run_cli("dataset", "verify", out, "--json")
    assert code == 0 and json.loads(stdout)["ok"]
    S.done_path(out, 0).unlink()
    code, stdout, err = run_cli("dataset", "verify", out)
    assert code == 1 and "NOT OK" in stdout and "not done yet" in err
    code, _, err = run_cli("dataset", "info", tmp_path)
    assert code == 1
    clean_error(err, "not a vaepack dataset")
    code, _, err = run_cli("dataset", "encode", photos, tmp_path / "o2", "--engine", "spark")
    assert code == 2
    clean_error(err, "--engine")


def test_hash_records_content_and_refuses_a_changed_file(tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):  # BMP: the file size depends on the image size only
        Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(src / f"{i}.bmp")
    out = tmp_path / "out"

    def crash(_res):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_dataset(src, out, opts(shard_size=1, hash=True), on_result=crash)
    size = (src / "1.bmp").stat().st_size
    Image.fromarray(np.full((64, 64, 3), 61, np.uint8)).save(src / "1.bmp")  # new content, same size
    assert (src / "1.bmp").stat().st_size == size
    s = encode_dataset(src, out, opts(shard_size=1, hash=True))
    assert [f["key"] for f in s.failed] == ["1.bmp"] and "sha256" in s.failed[0]["error"]
    assert len(S.read_index(out)[0]["sha256"]) == 64
