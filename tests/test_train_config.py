"""vaepack.train's configs and shared helpers (no model is loaded or trained here)."""

from __future__ import annotations

import pytest
import torch

from vaepack.errors import ImageError, UsageError
from vaepack.metrics import ms_ssim, ms_ssim_loss
from vaepack.train.common import Stop, check_resume, ema_decay_at, ema_update, training_images
from vaepack.train.config import (DistillConfig, DistillDecoderConfig, EpsTrainConfig, distill_config,
                                  parse_model_config, parse_schedule)


@pytest.fixture
def data(tmp_path):
    from PIL import Image

    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (32, 24), (10, 20, 30)).save(d / "a.png")
    Image.new("RGB", (32, 24), (40, 50, 60)).save(d / "sub" / "b.jpg")
    return d


def test_training_images_walk_subfolders(data, tmp_path):
    assert [p.relative_to(data).as_posix() for p in training_images(data)] == ["a.png", "sub/b.jpg"]
    with pytest.raises(ImageError, match="is not a folder"):
        training_images(tmp_path / "missing")


def test_parse_schedule_and_model_config():
    assert parse_schedule("128:10,256:0") == [(128, 10), (256, 0)]
    for bad in ("128-10", "12:10", "128:-1", ""):
        with pytest.raises(UsageError, match="bad schedule"):
            parse_schedule(bad)
    assert parse_model_config('{"blocks": [0, 2, 3, 3]}') == {"blocks": [0, 2, 3, 3]}
    for bad in ("[1]", "{", "3"):
        with pytest.raises(UsageError, match="JSON object"):
            parse_model_config(bad)


def test_distill_config_resolves_the_warm_start(data, tmp_path):
    kw = dict(data_dir=data, out_dir=tmp_path / "run")
    enc = distill_config("encoder", **kw)  # the CLI's default-on switch does not apply to a paper-000 student
    assert isinstance(enc, DistillConfig) and not enc.init_from_teacher and enc.batch == 64
    assert distill_config("encoder", family="tae", **kw).init_from_teacher
    assert not distill_config("encoder", family="tae", init=tmp_path / "w.safetensors", **kw).init_from_teacher
    dec = distill_config("decoder", pixel_weight=0.5, **kw)
    assert isinstance(dec, DistillDecoderConfig) and dec.init_from_teacher and dec.pixel_weight == 0.5
    assert dec.all_views == dec.views and DistillDecoderConfig(views_per_image=2, **kw).all_views == dec.views * 2
    with pytest.raises(UsageError, match="--part"):
        distill_config("both", **kw)
    with pytest.raises(UsageError, match="--family"):
        distill_config("decoder", family="tae", **kw)
    with pytest.raises(UsageError, match="init-from-teacher"):
        DistillConfig(family="student", init_from_teacher=True, **kw).validate()
    with pytest.raises(UsageError, match="batch"):
        DistillConfig(batch=0, **kw).validate()
    with pytest.raises(ImageError, match="is not a folder"):
        distill_config("encoder", data_dir=tmp_path / "missing", out_dir=tmp_path / "run")


def test_eps_train_config_validation(data, tmp_path):
    EpsTrainConfig("taef2", data, tmp_path / "run").validate()
    for bad, match in ((dict(steps=0), "--steps"), (dict(perceptual="vgg"), "perceptual"),
                       (dict(t_grid_frac=2), "t_grid_frac"), (dict(w_vel=0, w_perc=0, w_adv=0), "loss weights"),
                       (dict(export_dtype="int8"), "export dtype")):
        with pytest.raises(UsageError, match=match):
            EpsTrainConfig("taef2", data, tmp_path / "run", **bad).validate()


def test_check_resume(tmp_path):
    check_resume(tmp_path / "new", False)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    check_resume(tmp_path, True)
    with pytest.raises(UsageError, match="--resume"):
        check_resume(tmp_path, False)


def test_ms_ssim_loss_is_the_metric_with_gradients():
    """One image channel: the pooled-over-channels loss is 1 - the float64 reference metric."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 80, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    ref = 1 - sum(ms_ssim(y[i:i + 1], x[i:i + 1]) for i in range(2)) / 2
    yg = y.clone().requires_grad_(True)
    loss = ms_ssim_loss(yg, x)
    assert float(loss.detach()) == pytest.approx(ref, abs=1e-12)
    loss.backward()
    assert yg.grad is not None and torch.isfinite(yg.grad).all() and yg.grad.abs().sum() > 0


def test_ema_and_stop():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        ema.weight.zero_()
        model.weight.fill_(1.0)
    ema_update(ema, model, 0.75)
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.25))
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10 ** 6, 0.999) == 0.999
    with Stop(max_minutes=0) as stop:
        assert stop.timed_out() and not stop.interrupted
    with Stop() as stop:
        assert not stop.timed_out()
