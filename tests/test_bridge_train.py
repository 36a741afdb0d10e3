"""`vaepack train-bridge` (issue 14): the projector's construction, the attention-fidelity loss, and a
tiny end-to-end run on the real TAEF2 -> TAESana pair (shared weights): the loss goes down, the run
resumes, the export loads strictly as a manifest bridge and converts a latent."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors import safe_open

from vaepack.errors import UsageError
from vaepack.models import bridge as B
from vaepack.models import tae
from vaepack.train.bridge import attention_fidelity, export_bridge, run_train_bridge
from vaepack.train.config import BridgeTrainConfig


def _images(folder, n=3, size=(96, 96)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        yy, xx = np.mgrid[: size[1], : size[0]] / max(size)
        base = np.stack([np.sin(9 * xx + i), np.cos(7 * yy - i), np.sin(5 * (xx + yy))], -1) * 0.4 + 0.5
        img = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_rgb_bridge_starts_as_the_target_encoder():
    """With the rgb tap the warm-started projector is the target encoder itself (= the pixel path)."""
    torch.manual_seed(0)
    cfg = tae.TAEConfig(kind="f32", latent_channels=4, width=8)
    enc = tae.build("encoder", cfg).eval()
    b = B.Bridge(B.BridgeConfig(tap="rgb", tap_channels=3, target_channels=4, width=8)).eval()
    assert B.warm_start(b, enc.state_dict()) == len(enc.state_dict())
    x = torch.rand(2, 3, 64, 96)
    torch.testing.assert_close(b(x), enc(x))


@pytest.mark.parametrize("tap,divisor", [("latent", 8), ("s0", 8), ("s1", 4), ("s2", 2), ("pre_rgb", 1), ("rgb", 1)])
def test_every_tap_maps_to_the_target_grid(tap, divisor):
    torch.manual_seed(0)
    dcfg = tae.TAEConfig(kind="f8", latent_channels=4, width=8, blocks=(1, 1, 1, 1))
    dec = tae.build("decoder", dcfg).eval()
    t = B.Tap(dec, tae.roles("decoder", dcfg), tap)
    z = torch.randn(1, 4, 12, 8)  # a 96x64 px image
    f = t(z)
    assert f.shape[-2:] == (96 // divisor, 64 // divisor)
    ch = {"latent": 4, "rgb": 3}.get(tap, 8)
    b = B.Bridge(B.BridgeConfig(tap=tap, tap_channels=ch, target_channels=4, width=8, blocks=(1, 1, 1, 1)))
    assert b(f).shape == (1, 4, 3, 2)
    if tap == "rgb":
        assert f.min() >= 0 and f.max() <= 1  # the pixel path's decoder output is clamped too


def test_warm_start_copies_the_kept_layers_by_role():
    torch.manual_seed(0)
    full = tae.build("encoder", tae.TAEConfig(kind="f32", latent_channels=4, width=8)).state_dict()
    b = B.Bridge(B.BridgeConfig(tap="s0", tap_channels=8, target_channels=4, width=8, blocks=(1, 1, 1, 1)))
    B.warm_start(b, full)
    roles = tae.roles("encoder", tae.TAEConfig(kind="f32", latent_channels=4, width=8))
    sd = b.layers.state_dict()
    # layer 1 of the bridge (after the adapter conv) is the full encoder's s1.b0; the last is "out"
    assert B.entry_index(b.cfg) == roles.index("s1.b0")
    torch.testing.assert_close(sd["1.conv.0.weight"], full[f"{roles.index('s1.b0')}.conv.0.weight"])
    last = len(b.layers) - 1
    torch.testing.assert_close(sd[f"{last}.weight"], full[f"{roles.index('out')}.weight"])


def test_adapter_output_is_where_the_target_encoder_continues():
    """Feeding the bridge's kept layers the target encoder's own entry features reproduces the target
    encoder exactly: the adapter's training target (w_feat) is that prefix's output."""
    torch.manual_seed(0)
    ecfg = tae.TAEConfig(kind="f32", latent_channels=4, width=8)
    enc = tae.build("encoder", ecfg).eval()
    for tap, ch in (("s0", 8), ("s1", 8), ("s2", 8), ("pre_rgb", 8)):
        b = B.Bridge(B.BridgeConfig(tap=tap, tap_channels=ch, target_channels=4, width=8, adapter_blocks=1)).eval()
        B.warm_start(b, enc.state_dict())
        x = torch.rand(1, 3, 64, 96)
        k = B.entry_index(b.cfg)
        feats = enc[:k](x)
        torch.testing.assert_close(b.layers[1:](feats), enc(x))
        d = b.cfg.divisor
        assert b.adapt(torch.rand(1, ch, 64 // d, 96 // d)).shape == feats.shape


def test_latent_skip_starts_as_the_bridge_without_it_and_enters_at_one_eighth():
    """Zero-initialized: the untrained skip changes nothing (an rgb bridge still starts as the target
    encoder); it adds the latent where the projector's features are at 1/8 of the image."""
    torch.manual_seed(0)
    cfg = tae.TAEConfig(kind="f32", latent_channels=4, width=8)
    enc = tae.build("encoder", cfg).eval()
    b = B.Bridge(B.BridgeConfig(tap="rgb", tap_channels=3, target_channels=4, width=8, latent_skip=6)).eval()
    B.warm_start(b, enc.state_dict())
    x, z = torch.rand(2, 3, 64, 96), torch.randn(2, 6, 8, 12)
    torch.testing.assert_close(b(x, z), enc(x))
    roles = tae.roles("encoder", cfg)
    assert b.skip_at == {roles.index("s1.b0"): 0}
    with torch.no_grad():
        b.skip[0].weight.normal_()
    i = roles.index("s1.b0")
    h = b.layers[:i](x)
    assert h.shape[-2:] == z.shape[-2:]  # 1/8 of 64x96
    torch.testing.assert_close(b(x, z), b.layers[i:](h + b.skip[0](z)))
    # three stages: the latent also enters pooled 2x at s2.b0 and 4x at s3.b0
    b3 = B.Bridge(B.BridgeConfig(tap="rgb", tap_channels=3, target_channels=4, width=8, latent_skip=6,
                                 skip_stages=3)).eval()
    B.warm_start(b3, enc.state_dict())
    torch.testing.assert_close(b3(x, z), enc(x))
    assert b3.skip_at == {roles.index(f"s{k}.b0"): k - 1 for k in (1, 2, 3)}
    with torch.no_grad():
        for c in b3.skip:
            c.weight.normal_()
    j, k = roles.index("s2.b0"), roles.index("s3.b0")
    h = b3.layers[i:j](b3.layers[:i](x) + b3.skip[0](z))
    h = b3.layers[j:k](h + b3.skip[1](F.avg_pool2d(z, 2)))
    torch.testing.assert_close(b3(x, z), b3.layers[k:](h + b3.skip[2](F.avg_pool2d(z, 4))))
    with pytest.raises(ValueError, match="cells"):
        b(x, z[..., :4, :])
    for tap in ("latent", "s0"):  # they enter the projector after its 1/8 point
        with pytest.raises(ValueError, match="latent_skip"):
            B.BridgeConfig(tap=tap, tap_channels=4, latent_skip=4)


def test_skip_hidden_reads_the_latent_through_a_3x3_conv_and_starts_at_zero():
    """skip_hidden N: the skip is conv 3x3 (latent -> N) + ReLU + a zero-initialized 1x1 conv: the
    untrained bridge is still the target encoder; trained, a latent cell reaches its 3x3 neighbours."""
    torch.manual_seed(0)
    cfg = tae.TAEConfig(kind="f32", latent_channels=4, width=8)
    enc = tae.build("encoder", cfg).eval()
    b = B.Bridge(B.BridgeConfig(tap="rgb", tap_channels=3, target_channels=4, width=8, latent_skip=6,
                                skip_hidden=5)).eval()
    B.warm_start(b, enc.state_dict())
    x, z = torch.rand(1, 3, 64, 64), torch.randn(1, 6, 8, 8)
    torch.testing.assert_close(b(x, z), enc(x))
    s = b.skip[0]
    assert [tuple(m.weight.shape) for m in (s[0], s[2])] == [(5, 6, 3, 3), (8, 5, 1, 1)]
    with torch.no_grad():
        s[2].weight.normal_()
        s[0].bias.fill_(1.0)  # keep the ReLU open, so the check sees the 3x3 reach
    z2 = z.clone()
    z2[..., 4, 4] += 1.0
    d = (s(z2) - s(z)).abs().sum(1)[0]
    assert (d[3:6, 3:6] > 0).all() and d[:3].sum() == 0 and d[:, 6:].sum() == 0
    with pytest.raises(ValueError, match="skip_hidden"):
        B.BridgeConfig(tap="rgb", tap_channels=3, skip_hidden=4)


def test_training_crops_with_scale_jitter(tmp_path):
    """min_scale < 1: each crop comes from the photo shrunk by a random factor (never below the crop);
    fixed by the seed; the cache key says so."""
    from vaepack.train.bridge import pairs_key, training_crops

    data = _images(tmp_path / "d", n=2, size=(160, 128))
    cfg = BridgeTrainConfig(data, tmp_path / "r", crop=64, crops_per_image=6, min_scale=0.5)
    a, b = training_crops(cfg), training_crops(cfg)
    assert a.shape == (12, 3, 64, 64) and a.dtype == torch.uint8 and torch.equal(a, b)
    plain = training_crops(BridgeTrainConfig(data, tmp_path / "r", crop=64, crops_per_image=6))
    assert not torch.equal(a, plain)
    shas = {"source_encoder": "s", "target_encoder": "t"}
    assert pairs_key(cfg, shas) != pairs_key(BridgeTrainConfig(data, tmp_path / "r", crop=64, crops_per_image=6), shas)
    with pytest.raises(UsageError, match="min-scale"):
        BridgeTrainConfig(data, tmp_path / "r", min_scale=0).validate()


def test_training_crops_turned_by_rot90_keep_the_plain_crops_otherwise(tmp_path):
    """--rot90: each crop is one of the plain run's crops turned by k x 90 degrees (k drawn after the
    mirror, so without the option the crops and their cache stay as before); the cache key says so."""
    from vaepack.train.bridge import pairs_key, training_crops

    data = _images(tmp_path / "d", n=2, size=(160, 128))
    opts = dict(crop=64, crops_per_image=6, min_scale=0.5)
    plain_cfg = BridgeTrainConfig(data, tmp_path / "r", **opts)
    turned = training_crops(BridgeTrainConfig(data, tmp_path / "r", rot90=True, **opts))
    plain = training_crops(plain_cfg)
    assert turned.shape == plain.shape and not torch.equal(turned, plain)
    # the first crop draws the same scale, position and mirror either way; only the turn is added
    assert any(torch.equal(turned[0], torch.rot90(plain[0], k, (-2, -1))) for k in range(4))
    shas = {"source_encoder": "s", "target_encoder": "t"}
    assert pairs_key(BridgeTrainConfig(data, tmp_path / "r", rot90=True, **opts), shas) != pairs_key(plain_cfg, shas)
    assert "rot90" not in pairs_key(plain_cfg, shas)  # caches made before the option stay valid


def test_attention_fidelity_is_zero_for_equal_affinities_and_positive_otherwise():
    torch.manual_seed(0)
    t = torch.randn(2, 8, 6, 5)
    assert attention_fidelity(t, t).abs() < 1e-6
    assert attention_fidelity(3 * t, t).abs() < 1e-6  # token scale does not matter (cosine affinities)
    assert attention_fidelity(torch.randn_like(t), t) > 0.1
    big = torch.randn(1, 4, 70, 40)  # pooled to at most 32 tokens per side
    assert torch.isfinite(attention_fidelity(big, big + 0.1 * torch.randn_like(big)))


def test_config_validation(tmp_path):
    data = _images(tmp_path / "d", n=1)
    for kw, msg in [({"tap": "s9"}, "tap"), ({"crop": 100}, "multiple of 32"), ({"steps": 0}, "steps"),
                    ({"w_mse": 0, "w_l1": 0}, "w-mse"), ({"blocks": (1, 2)}, "blocks"),
                    ({"tap": "s2", "pairs_backend": "openvino"}, "pairs-backend"),
                    ({"tap": "s0", "latent_skip": 1}, "latent-skip"),
                    ({"tap": "rgb", "pairs_backend": "openvino", "cache_tap_gb": 0}, "tap cache"), ({"tap": "rgb", "latent_skip": 4}, "0 to 3"),
                    ({"tap": "rgb", "skip_hidden": 8}, "--skip-hidden")]:
        with pytest.raises(UsageError, match=msg):
            BridgeTrainConfig(data, tmp_path / "r", **kw).validate()


def _cfg(data, out, **kw):
    args = dict(tap="s0", blocks=(1, 1, 1, 1), steps=40, batch=4, crop=64, crops_per_image=3, lr=1e-3,
                log_every=10, threads=1, seed=0, device="cpu", command="test")
    args.update(kw)
    return BridgeTrainConfig(data, out, **args)


def test_tiny_run_lowers_the_loss_resumes_exports_and_converts(tmp_path, shared_weights, monkeypatch):
    data = _images(tmp_path / "data")
    out = tmp_path / "run"
    losses = []
    res = run_train_bridge(_cfg(data, out, steps=20),
                           progress=lambda d: d["phase"] == "train" and losses.append(d["loss"]))
    assert res["step"] == 20 and res["pairs"] == 9 and (out / "pairs.pt").is_file()
    with pytest.raises(UsageError, match="resume"):
        run_train_bridge(_cfg(data, out, steps=40))
    res = run_train_bridge(_cfg(data, out, steps=40, resume=True),
                           progress=lambda d: d["phase"] == "train" and losses.append(d["loss"]))
    assert res["step"] == 40 and "resumed from" in (out / "train.log").read_text()
    assert len(losses) == 4 and losses[-1] < losses[0]
    with pytest.raises(UsageError, match="different bridge config"):
        run_train_bridge(_cfg(data, out, steps=50, resume=True, tap="latent"))

    f = out / "bridge.safetensors"
    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    conf = json.loads(meta["config"])
    assert conf["tap"] == "s0" and conf["source"] == "taef2" and meta["command"] == "test" and meta["steps"] == "40"
    assert meta["source_decoder_sha256"] and meta["target_encoder_sha256"]

    # the export is a manifest bridge: load it strictly through the registry and convert a latent
    from vaepack.paths import manifest_path

    manifest = yaml.safe_load(manifest_path().read_text())
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "trained.safetensors").write_bytes(f.read_bytes())
    manifest["bridges"] = {"trained": {
        "description": "tiny run", "license": "MIT", "source": "taef2", "target": "taesana", "family": "bridge",
        "config": {k: v for k, v in conf.items() if k not in ("source", "target")},
        "files": [{"name": "trained.safetensors", "size": f.stat().st_size,
                   "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}]}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    monkeypatch.setenv("VAEPACK_MANIFEST", str(tmp_path / "m.yaml"))
    monkeypatch.setenv("VAEPACK_MIRROR", f"{mirror},{shared_weights}")
    from vaepack.bridges import load_bridge

    lb = load_bridge("trained", device="cpu")
    z = torch.randn(1, 32, 8, 12)
    assert lb(z).shape == (1, 32, 2, 3)
    # the exported fp16 EMA is what the checkpoint holds
    c = torch.load(out / "checkpoint.pt", weights_only=False)
    torch.testing.assert_close(lb.projector.state_dict()["layers.0.weight"].float(),
                               c["ema"]["layers.0.weight"].half().float())
    again = export_bridge(out, command="test", out=tmp_path / "again.safetensors")
    from safetensors.torch import load_file

    a, b = load_file(str(again)), load_file(str(f))  # (the header's key order is not fixed: compare contents)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(again), framework="pt") as h:
        assert h.metadata() == meta


def test_rgb_latent_skip_run_on_runtime_pairs(tmp_path, shared_weights):
    """An rgb bridge with the latent skip, its pairs' latents and decoded images from OpenVINO: the
    loss falls, the skip learns (it starts at zero) and the export records the skip."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    data = _images(tmp_path / "data", n=2)
    out = tmp_path / "run"
    losses = []
    res = run_train_bridge(_cfg(data, out, tap="rgb", blocks=None, steps=30, latent_skip=2, pairs_backend="openvino",
                                min_scale=0.7), progress=lambda d: d["phase"] == "train" and losses.append(d["loss"]))
    assert res["step"] == 30 and res["latent_skip"] == 32 and losses[-1] < losses[0]
    c = torch.load(out / "checkpoint.pt", weights_only=False)
    assert c["model"]["skip.0.weight"].abs().max() > 0 and c["model"]["skip.1.weight"].abs().max() > 0
    assert (out / "pairs.tap-rgb.pt").is_file()
    with safe_open(str(out / "bridge.safetensors"), framework="pt") as h:
        conf = json.loads(h.metadata()["config"])
        assert conf["latent_skip"] == 32 and conf["skip_stages"] == 2
        assert "skip.1.weight" in h.keys()
    # the latent tap reads the runtime's latents as they are (its runtime has no decoder to run)
    res = run_train_bridge(_cfg(data, tmp_path / "lat", tap="latent", steps=5, pairs_backend="openvino"))
    assert res["step"] == 5 and res["tap"] == "latent"


def test_train_skip_learns_only_the_skip_convs(tmp_path, shared_weights):
    """--train skip: the projector stays TAESana's encoder (bit for bit), only the skip convs move."""
    from vaepack.loader import load_part

    data = _images(tmp_path / "data", n=2)
    out = tmp_path / "run"
    run_train_bridge(_cfg(data, out, tap="rgb", blocks=None, steps=8, latent_skip=1, train="skip"))
    c = torch.load(out / "checkpoint.pt", weights_only=False)
    enc = load_part("taesana", "encoder")[0].state_dict()
    for k, v in c["model"].items():
        if k.startswith("layers."):
            torch.testing.assert_close(v, enc[k[len("layers."):]].float(), rtol=0, atol=0)
    assert c["model"]["skip.0.weight"].abs().max() > 0
    for kw in ({"train": "skip", "tap": "rgb"}, {"train": "skip", "tap": "s2", "latent_skip": 1},
               {"train": "most"}):
        with pytest.raises(UsageError, match="--train"):
            BridgeTrainConfig(data, tmp_path / "r", **kw).validate()


def test_freeze_keeps_the_leading_layers_and_the_export_config_clean(tmp_path, shared_weights):
    """--freeze N: the projector's first N layers stay TAESana's (bit for bit), later ones learn; the
    option is part of the run (resuming with another value is refused), not of the exported config."""
    from vaepack.loader import load_part

    data = _images(tmp_path / "data", n=2)
    out = tmp_path / "run"
    res = run_train_bridge(_cfg(data, out, tap="rgb", blocks=None, steps=6, latent_skip=1, freeze=5))
    assert res["freeze"] == 5
    c = torch.load(out / "checkpoint.pt", weights_only=False)
    enc = load_part("taesana", "encoder")[0].state_dict()
    moved = {int(k.split(".")[1]) for k, v in c["model"].items() if k.startswith("layers.")
             and not torch.equal(v, enc[k[len("layers."):]].float())}
    assert moved and min(moved) >= 5  # layers 0-4 (stem, stage 0) frozen; the rest learned
    with safe_open(str(out / "bridge.safetensors"), framework="pt") as h:
        assert "freeze" not in json.loads(h.metadata()["config"])
    with pytest.raises(UsageError, match="different bridge config"):
        run_train_bridge(_cfg(data, out, tap="rgb", blocks=None, steps=8, latent_skip=1, resume=True))
    with pytest.raises(UsageError, match="--freeze 7: only the first 6"):  # the skip enters at layer 6
        run_train_bridge(_cfg(data, tmp_path / "r2", tap="rgb", blocks=None, steps=2, latent_skip=1, freeze=7))
    with pytest.raises(UsageError, match="--freeze"):
        BridgeTrainConfig(data, tmp_path / "r3", freeze=2, warm_start=False).validate()


def test_l2sp_keeps_the_projector_nearer_its_warm_start(tmp_path, shared_weights):
    """--l2sp W adds W x the squared distance of the warm-started layers from TAESana's weights: a large W
    ends nearer the warm start than the same run without it; part of the run, not of the export."""
    from vaepack.loader import load_part

    data = _images(tmp_path / "data", n=2)
    enc = load_part("taesana", "encoder")[0].state_dict()

    def distance(out):
        c = torch.load(out / "checkpoint.pt", weights_only=False)
        return sum(((v - enc[k[len("layers."):]].float()) ** 2).sum().item() for k, v in c["model"].items()
                   if k.startswith("layers."))

    free, held = tmp_path / "free", tmp_path / "held"
    run_train_bridge(_cfg(data, free, tap="rgb", blocks=None, steps=6, latent_skip=1))
    res = run_train_bridge(_cfg(data, held, tap="rgb", blocks=None, steps=6, latent_skip=1, l2sp=100.0))
    assert res["l2sp"] == 100.0
    assert 0 < distance(held) < 0.5 * distance(free)
    with safe_open(str(held / "bridge.safetensors"), framework="pt") as h:
        assert "l2sp" not in json.loads(h.metadata()["config"])
    with pytest.raises(UsageError, match="different bridge config"):
        run_train_bridge(_cfg(data, held, tap="rgb", blocks=None, steps=8, latent_skip=1, resume=True))
    with pytest.raises(UsageError, match="--l2sp"):
        BridgeTrainConfig(data, tmp_path / "r3", l2sp=1.0, warm_start=False).validate()
    with pytest.raises(UsageError, match="--l2sp"):
        BridgeTrainConfig(data, tmp_path / "r4", l2sp=-1.0).validate()


def test_shipped_bridge_is_closer_to_taesana_than_the_pixel_path(shared_weights, shared):
    """The manifest's FLUX.2 -> Sana bridge against an external oracle, TAESana's own encoder on the
    photo: on center 256 px crops of six dev photos its pooled relative MSE is below the pixel path's
    (benchmarks/results/bridge.md has the whole dev set)."""
    from vaepack.bridges import load_bridge
    from vaepack.io import list_images, load_image
    from vaepack.loader import load_part
    from vaepack.manifest import load_manifest
    from vaepack.metrics import latent_agreement

    man = load_manifest()
    found = man.bridges_for("flux2", "sana")
    assert found, "the manifest ships no FLUX.2 -> Sana bridge"
    lb = load_bridge(found[0].id, device="cpu")
    senc, _, _ = load_part("taef2", "encoder")
    sdec, _, _ = load_part("taef2", "decoder")
    tenc, _, _ = load_part("taesana", "encoder")
    pix, br, ref = [], [], []
    with torch.no_grad():
        for p in list_images(shared / "data" / "dev", require=True)[:6]:
            x = load_image(p)
            h, w = x.shape[-2:]
            x = x[None, :, (h - 256) // 2:(h - 256) // 2 + 256, (w - 256) // 2:(w - 256) // 2 + 256]
            z = senc(x)
            ref.append(tenc(x))
            pix.append(tenc(sdec(z).clamp(0, 1)))
            br.append(lb(z))
    assert latent_agreement(br, ref)["rel_mse"] < latent_agreement(pix, ref)["rel_mse"]
