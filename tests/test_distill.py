"""Tiny end-to-end distillation runs (random-init teachers, generated images: nothing from shared/)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from vaepack.errors import ImageError, UsageError, VaepackError
from vaepack.models import student, tae
from vaepack.train import distill
from vaepack.train.common import export_safetensors
from vaepack.train.config import DistillConfig, DistillDecoderConfig
from vaepack.train.warmstart import prune_tae_decoder, tae_from_teacher

TINY = dict(width=8, blocks_per_stage=1)


def _images(folder, n=3, size=(72, 56)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        yy, xx = np.mgrid[: size[1], : size[0]] / max(size)
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(3 * (xx + yy))], -1) * 0.4 + 0.5
        img = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def _teacher(seed=0):
    torch.manual_seed(seed)
    return tae.build("encoder", tae.TAEConfig(kind="f8", latent_channels=4, width=8)).eval()


def _encoder_run(teacher, data, run_dir, progress=None, **kw):
    """``run_distill`` with its config built from keywords (DistillConfig fields)."""
    return distill.run_distill(teacher, DistillConfig(data_dir=data, out_dir=run_dir, **kw), progress=progress)


def _decoder_run(teacher_encoder, teacher_decoder, data, run_dir, progress=None, **kw):
    """``run_distill_decoder`` with its config built from keywords (DistillDecoderConfig fields)."""
    return distill.run_distill_decoder(teacher_encoder, teacher_decoder,
                                       DistillDecoderConfig(data_dir=data, out_dir=run_dir, **kw), progress=progress)


def _run(data, run_dir, **kw):
    args = dict(model_config=TINY, schedule=[(32, 30)], batch=4, lr=3e-3, warmup=5, ckpt_every=10, threads=1,
                bf16=False, seed=0, teacher_id="test-teacher")
    args.update(kw)
    return _encoder_run(_teacher(), data, run_dir, width=8, **args)


def test_distill_lowers_loss_and_exports_loadable_student(tmp_path):
    data = _images(tmp_path / "data")
    losses = []
    out = _run(data, tmp_path / "run", progress=lambda p: p["phase"] == "train" and losses.append(p["step_loss"]))
    assert out.suffix == ".safetensors" and out.exists()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    cfg = student.StudentConfig(**json.loads(md["config"]))
    assert cfg.fused and md["teacher"] == "test-teacher" and md["steps"] == "30"
    m = student.build("encoder", cfg)
    m.load_state_dict({k: v.float() for k, v in load_file(str(out)).items()})
    assert m(torch.rand(1, 3, 64, 48)).shape == (1, 4, 8, 6)
    assert (tmp_path / "run" / "train.log").read_text().count("finished at step 30") == 1


def test_resume_continues_from_checkpoint(tmp_path):
    data = _images(tmp_path / "data")
    first = _run(data, tmp_path / "run", max_minutes=0)  # stops (and checkpoints) after one step
    assert first.name == "checkpoint.pt"
    assert torch.load(first, weights_only=False)["state"]["step"] == 1
    out = _run(data, tmp_path / "run")
    assert out.suffix == ".safetensors"
    c = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert c["state"]["step"] == 30 and c["state"]["finished"]
    assert "resumed from" in (tmp_path / "run" / "train.log").read_text()


def test_resume_with_other_config_is_refused(tmp_path):
    data = _images(tmp_path / "data")
    _run(data, tmp_path / "run", max_minutes=0)
    with pytest.raises(VaepackError, match="different model config"):
        _run(data, tmp_path / "run", model_config=dict(width=8, blocks_per_stage=2))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="contains no images"):
        _run(tmp_path / "empty", tmp_path / "run")


def test_missing_folder(tmp_path):
    with pytest.raises(ImageError, match="is not a folder"):
        _run(tmp_path / "nope", tmp_path / "run")


def test_folder_without_images(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "notes.txt").write_text("hello")
    with pytest.raises(ImageError, match="contains no images"):
        _run(d, tmp_path / "run")


def test_only_unreadable_images(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="broken.png"):
        _run(d, tmp_path / "run")


def test_unreadable_image_is_skipped(tmp_path):
    data = _images(tmp_path / "data", n=2)
    (data / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    out = _run(data, tmp_path / "run", schedule=[(32, 3)])
    assert out.exists()
    assert "broken.jpg" in (tmp_path / "run" / "train.log").read_text()


def _bn_student():
    """A tiny BatchNorm student with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(0)
    m = student.build("encoder", student.StudentConfig(width=8, blocks_per_stage=1, stem_stride=2))
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m


def test_fuse_bn_matches_unfused():
    m = _bn_student()
    m.eval()
    f = student.fuse_bn(m)
    x = torch.rand(2, 3, 32, 40)
    assert f.cfg.fused and not any(isinstance(x_, torch.nn.BatchNorm2d) for x_ in f.modules())
    torch.testing.assert_close(f(x), m(x), atol=1e-5, rtol=1e-4)


def test_decoder_distillation_and_pruned_init(tmp_path):
    data = _images(tmp_path / "data", n=2)
    torch.manual_seed(1)
    tdec = tae.build("decoder", tae.TAEConfig(kind="f8", latent_channels=4, width=16, midblock_gn=True)).eval()
    cfg = tae.TAEConfig(kind="f8", latent_channels=4, width=8, midblock_gn=True)
    tae.build("decoder", cfg).load_state_dict(prune_tae_decoder(tdec.state_dict(), cfg))
    out = _decoder_run(_teacher(), tdec, data, tmp_path / "run", width=8, schedule=[(32, 4)], batch=2,
                       warmup=2, threads=1, bf16=False)
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    m = tae.build("decoder", tae.TAEConfig(**json.loads(md["config"])))
    m.load_state_dict({k: v.float() for k, v in load_file(str(out)).items()})
    assert m(torch.randn(1, 4, 4, 5)).shape == (1, 3, 32, 40)


def test_cli_bad_schedule(tmp_path, run_cli, clean_error):
    data = _images(tmp_path / "data", n=1)
    code, _, err = run_cli("distill", "--data", data, "--out", tmp_path / "r", "--schedule", "128-10")
    assert code == 2
    clean_error(err, "bad schedule")
    assert not hasattr(distill, "main")  # one command line: `vaepack distill`, no `python -m vaepack.distill`


# ------------------------------------------------------------------------- warm starts (init=)
class _Captured(Exception):
    pass


@pytest.fixture
def capture_student(monkeypatch):
    """Stop a run at the start of training and return the model it would train (after init=)."""
    got = {}

    def fake_train(**kw):
        got["student"] = kw["student"]
        raise _Captured

    def run(fn, *args, **kw):
        with monkeypatch.context() as mp, pytest.raises(_Captured):
            mp.setattr(distill, "_train", fake_train)
            fn(*args, **kw)
        return got.pop("student")

    return run


def _load_student(path):
    with safe_open(str(path), "pt") as f:
        cfg = student.StudentConfig(**json.loads(f.metadata()["config"]))
    m = student.build("encoder", cfg)
    m.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return m.eval()


def test_unfuse_bn_reproduces_the_fused_student():
    m = _bn_student()
    fused = student.fuse_bn(m.eval())
    calib = torch.rand(4, 3, 32, 40)
    with torch.no_grad():
        ref = fused(calib)
        u = student.unfuse_bn(fused, calib)
        assert u.cfg.norm == "batch" and not u.cfg.fused
        assert any(isinstance(x, torch.nn.BatchNorm2d) for x in u.modules())
        torch.testing.assert_close(u.eval()(calib), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(u.train()(calib), ref, atol=1e-4, rtol=0)  # batch statistics = calib's
        x = torch.rand(2, 3, 24, 16)  # eval mode: the fused function on any input
        torch.testing.assert_close(u.eval()(x), fused(x), atol=1e-4, rtol=0)


def test_init_warm_starts_an_encoder_from_an_exported_student(tmp_path, capture_student):
    data = _images(tmp_path / "data", n=3, size=(144, 136))  # BatchNorm calibration uses 128 px crops
    first = _run(data, tmp_path / "run1", schedule=[(32, 5)])
    assert first.suffix == ".safetensors"
    exported = _load_student(first)
    m = capture_student(_run, data, tmp_path / "run2", init=first)  # norm batch (default): unfolded
    assert m.cfg.norm == "batch" and not m.cfg.fused
    x = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), exported(x), atol=1e-4, rtol=0)

    with pytest.raises(UsageError, match="do not fit") as e:
        _run(data, tmp_path / "run3", init=first, model_config=dict(TINY, width=16))
    assert str(first) in str(e.value)
    assert not (tmp_path / "run3" / "checkpoint.pt").exists()


def test_views_per_image_doubles_the_teacher_cache(tmp_path):
    data = _images(tmp_path / "data", n=3)
    for vpi, n in ((1, 3), (2, 6)):
        _run(data, tmp_path / f"run{vpi}", schedule=[(32, 1)], views_per_image=vpi)
        assert f"teacher cache: {n} views of 3 images" in (tmp_path / f"run{vpi}" / "train.log").read_text()


def test_decoder_init_loads_strictly(tmp_path, capture_student):
    data = _images(tmp_path / "data", n=2)
    torch.manual_seed(2)
    cfg = tae.TAEConfig(kind="f8", latent_channels=4, width=8, midblock_gn=True)
    src = tae.build("decoder", cfg)
    path = export_safetensors(src, tmp_path / "dec.safetensors", {"config": json.dumps({})}, fp16=False)
    tdec = tae.build("decoder", tae.TAEConfig(kind="f8", latent_channels=4, width=16, midblock_gn=True)).eval()
    kw = dict(schedule=[(32, 2)], batch=2, warmup=1, threads=1, bf16=False)
    m = capture_student(_decoder_run, _teacher(), tdec, data, tmp_path / "run", width=8, init=path, **kw)
    for k, v in src.state_dict().items():  # init wins over the default warm start from the teacher
        torch.testing.assert_close(m.state_dict()[k], v)

    with pytest.raises(UsageError, match="do not fit") as e:
        _decoder_run(_teacher(), tdec, data, tmp_path / "run2", width=16, init=path, **kw)
    assert str(path) in str(e.value)
    with pytest.raises(VaepackError, match="init weights not found"):
        _decoder_run(_teacher(), tdec, data, tmp_path / "run3", width=8, init=tmp_path / "nope.safetensors", **kw)


# ------------------------------------------------------------- depth-pruned TAE students (tae_from_teacher)
def _tae_teacher(part, seed=3, width=16, lc=4):
    torch.manual_seed(seed)
    cfg = tae.TAEConfig(kind="f8", latent_channels=lc, width=width, midblock_gn=True)
    m = tae.build(part, cfg).eval()
    for p in m.parameters():  # non-trivial biases, so the composed stem bias is checked too
        p.data.add_(torch.randn_like(p) * 0.05)
    return m, cfg


def test_pruned_tae_config_is_validated():
    with pytest.raises(ValueError, match="blocks"):
        tae.TAEConfig(blocks=(1, 2, 3))
    with pytest.raises(ValueError, match="s2d"):
        tae.TAEConfig(stem="s2d")  # keeps the full-resolution block
    assert tae.TAEConfig(blocks=[0, 2, 3, 3], stem="s2d").blocks == (0, 2, 3, 3)  # YAML list -> tuple


def test_s2d_stem_is_the_exact_composition_of_the_teacher_stem():
    t, tcfg = _tae_teacher("encoder")
    cfg = tae.TAEConfig(kind="f8", latent_channels=4, width=16, midblock_gn=True, blocks=(0, 1, 3, 3), stem="s2d")
    m = tae.build("encoder", cfg).eval()
    m.load_state_dict(tae_from_teacher(t.state_dict(), "encoder", cfg, tcfg))
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        ref = t[2](t[0](x))  # the teacher's stem conv then its stride-2 conv, without the dropped block
        got = m[1](m[0](x))
        torch.testing.assert_close(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got, ref, atol=1e-3)  # only borders differ (zero padding of the teacher's conv0)
        # kept layers are the teacher's: the H/2 stage's first block and everything from H/4 on
        torch.testing.assert_close(m[2](got), t[3](got))
        z = m[2](got)
        torch.testing.assert_close(m[3:](z), t[6:](z))


def test_depth_pruned_decoder_keeps_the_first_blocks_per_stage():
    t, tcfg = _tae_teacher("decoder")
    cfg = tae.TAEConfig(kind="f8", latent_channels=4, width=16, midblock_gn=True, blocks=(3, 2, 1, 1))
    m = tae.build("decoder", cfg).eval()
    m.load_state_dict(tae_from_teacher(t.state_dict(), "decoder", cfg, tcfg))
    keep = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 16, 17, 18, 19]  # teacher indices (drops s1.b2, s2.b1, s2.b2)
    ref = torch.nn.Sequential(*[t[i] for i in keep])
    z = torch.randn(1, 4, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(m(z), ref(z))
    with pytest.raises(UsageError, match="width"):
        tae_from_teacher(t.state_dict(), "decoder", tae.TAEConfig(latent_channels=4, width=8, blocks=(3, 2, 1, 1)), tcfg)


def test_pruned_tae_encoder_distills_and_exports(tmp_path):
    data = _images(tmp_path / "data", n=2)
    t, tcfg = _tae_teacher("encoder", width=8)
    losses = []
    out = _encoder_run(t, data, tmp_path / "run", width=8, family="tae", init_from_teacher=True,
                       teacher_config=tcfg, model_config={"blocks": [0, 1, 1, 1], "stem": "s2d"},
                       schedule=[(32, 20)], batch=4, lr=3e-3, warmup=2, threads=1, bf16=False,
                       progress=lambda p: p["phase"] == "train" and losses.append(p["step_loss"]))
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert md["vaepack_family"] == "tae" and md["vaepack_part"] == "encoder"
    cfg = tae.TAEConfig(**json.loads(md["config"]))
    assert cfg.stem == "s2d" and cfg.blocks == (0, 1, 1, 1)
    m = tae.build("encoder", cfg)
    m.load_state_dict({k: v.float() for k, v in load_file(str(out)).items()})
    assert m(torch.rand(1, 3, 64, 48)).shape == (1, 4, 8, 6)
    with pytest.raises(UsageError, match="init-from-teacher"):
        _encoder_run(t, data, tmp_path / "r2", family="student", init_from_teacher=True, teacher_config=tcfg)


def test_decoder_run_warm_starts_depth_pruned_from_the_teacher_config(tmp_path, capture_student):
    data = _images(tmp_path / "data", n=1)
    tdec, tcfg = _tae_teacher("decoder", width=8)
    tenc = tae.build("encoder", tae.TAEConfig(kind="f8", latent_channels=4, width=8)).eval()
    kw = dict(width=8, model_config={"blocks": [3, 2, 1, 1]}, schedule=[(32, 1)], threads=1, bf16=False)
    m = capture_student(_decoder_run, tenc, tdec, data, tmp_path / "r", teacher_config=tcfg, **kw)
    cfg = tae.TAEConfig(kind="f8", latent_channels=4, width=8, midblock_gn=True, blocks=(3, 2, 1, 1))
    ref = tae_from_teacher(tdec.state_dict(), "decoder", cfg, tcfg)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    with pytest.raises(UsageError, match="teacher_config"):  # depth pruning needs the teacher's stated architecture
        _decoder_run(tenc, tdec, data, tmp_path / "r2", **kw)


def test_distill_with_distribution_matching_resumes(tmp_path):
    """--dm-weight (paper 003): the real flow on the reference is trained once and cached in the run
    folder, the fake flow rides in the checkpoint, and another DM setting is refused on resume."""
    data = _images(tmp_path / "data", size=(128, 128))
    kw = dict(schedule=[(128, 6)], dm_weight=1.0, dm_reference="gaussian", dm_real_steps=5)
    first = _run(data, tmp_path / "run", max_minutes=0, **kw)
    c = torch.load(first, weights_only=False)
    assert c["meta"]["dm"] == {"weight": 1.0, "reference": "gaussian", "real_steps": 5} and "dm_fake" in c
    assert len(list((tmp_path / "run").glob("dm-real-*.safetensors"))) == 1
    out = _run(data, tmp_path / "run", **kw)
    assert out.suffix == ".safetensors"
    with pytest.raises(VaepackError, match="different model config"):
        _run(data, tmp_path / "run", **{**kw, "dm_weight": 2.0})
    with pytest.raises(UsageError, match="unknown DM reference"):
        _run(data, tmp_path / "run2", **{**kw, "dm_reference": "nonsense"})


def test_cli_dm_weight_is_for_encoders(tmp_path, run_cli, clean_error):
    data = _images(tmp_path / "data")
    code, _, err = run_cli("distill", "--part", "decoder", "--dm-weight", "1", "--data", data, "--out", tmp_path / "r")
    assert code != 0
    clean_error(err, "--dm-weight", "encoder")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------- decoder continuation on a paired encoder's latents
def test_decoder_learns_from_the_paired_encoder_latents(tmp_path, monkeypatch):
    data = _images(tmp_path / "data", n=2)
    enc_file = _run(data, tmp_path / "enc", schedule=[(32, 2)])  # a student encoder export of the teacher's space
    tdec = tae.build("decoder", tae.TAEConfig(kind="f8", latent_channels=4, width=8, midblock_gn=True)).eval()
    real = distill.load_exported
    seen = []

    def spy(path, part):
        m = real(path, part)
        m.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape[0], out.shape)))
        return m

    monkeypatch.setattr(distill, "load_exported", spy)
    kw = dict(width=8, schedule=[(32, 3)], batch=4, warmup=1, threads=1, bf16=False, latent_encoder=enc_file,
              latent_encoder_frac=0.5)
    out = _decoder_run(_teacher(), tdec, data, tmp_path / "run", **kw)
    assert [n for n, _ in seen] == [2, 2, 2]  # half of each batch of 4, every step
    assert all(s[1] == 4 for _, s in seen)
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    from vaepack.files import sha256_file

    assert md["latent_encoder_sha256"] == sha256_file(enc_file) and md["latent_encoder_frac"] == "0.5"
    # resuming the run with another share (or encoder) is a different run
    with pytest.raises(VaepackError, match="different model config"):
        _decoder_run(_teacher(), tdec, data, tmp_path / "run", **{**kw, "latent_encoder_frac": 1.0})


def test_latent_encoder_errors(tmp_path, run_cli, clean_error):
    data = _images(tmp_path / "data", n=1)
    with pytest.raises(UsageError, match="latent-encoder-frac"):
        DistillDecoderConfig(data_dir=data, out_dir=tmp_path / "r", latent_encoder_frac=0).validate()
    with pytest.raises(UsageError, match="do not exist"):
        DistillDecoderConfig(data_dir=data, out_dir=tmp_path / "r", latent_encoder=tmp_path / "no.safetensors").validate()
    dec = tae.build("decoder", tae.TAEConfig(kind="f8", latent_channels=4, width=8, midblock_gn=True))
    f = export_safetensors(dec, tmp_path / "dec.safetensors",
                           {"vaepack_family": "tae", "vaepack_part": "decoder", "config": json.dumps(
                               {"kind": "f8", "latent_channels": 4, "width": 8, "midblock_gn": True})})
    from vaepack.train.warmstart import load_exported

    with pytest.raises(UsageError, match="a decoder, not an encoder"):
        load_exported(f, "encoder")
    assert load_exported(f, "decoder")(torch.randn(1, 4, 2, 2)).shape == (1, 3, 16, 16)
    code, _, err = run_cli("distill", "--latent-encoder", f, "--data", data, "--out", tmp_path / "r2")
    assert code != 0
    clean_error(err, "--latent-encoder", "decoder")
    assert not (tmp_path / "r2").exists()
