"""eps-VAE diffusion decoder (paper 004): sampler schedule, determinism, shapes, tiny training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vaepack.errors import UsageError, VaepackError
from vaepack.models import eps_unet
from vaepack.models.eps_unet import EpsConfig, EpsDecoder, flow_scale
from vaepack.samplers import make_noise, position_noise, rho_log, sample, time_grid

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"
TINY = dict(width=8, mults=(1, 2), groups=4, blocks=1)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- schedule (Eq. 13)
def test_rho_log_endpoints_and_monotone():
    assert rho_log(0.0) == 1.0  # u = 0 -> t = 1 (pure noise)
    assert abs(rho_log(1.0)) == 0.0  # u = 1 -> t = 0 (data)
    us = [i / 100 for i in range(101)]
    ts = [rho_log(u) for u in us]
    assert all(a > b for a, b in zip(ts, ts[1:]))
    # closed form for m = 1, n = 100: log(100 - 99 u) / log(100)
    assert rho_log(0.5) == pytest.approx(math.log(50.5) / math.log(100))


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 17])
@pytest.mark.parametrize("schedule", ["reversed_log", "uniform"])
def test_time_grid(steps, schedule):
    g = time_grid(steps, schedule)
    assert len(g) == steps + 1 and g[0] == 1.0 and g[-1] == 0.0
    assert all(a > b for a, b in zip(g, g[1:]))
    if schedule == "reversed_log" and steps > 1:
        # denser steps near the noise end ("early in the inference process")
        assert g[0] - g[1] < g[-2] - g[-1]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_time_grid_rejects_bad_steps(bad):
    with pytest.raises(VaepackError):
        time_grid(bad)
    with pytest.raises(UsageError):
        time_grid(3, "cosine")


# ----------------------------------------------------------------------------- sampler
def _toy_fn(x, t, z):
    return 0.3 * x + z * t.view(-1, 1, 1, 1)


def test_nfe1_is_one_euler_step_from_t1():
    z = torch.randn(2, 3, 8, 8)
    noise = torch.randn(2, 3, 8, 8)
    out = sample(_toy_fn, z, 1, noise=noise)
    ref = noise - _toy_fn(noise, torch.ones(2), z)  # x_0 = x_1 + (0 - 1) v(x_1, 1)
    assert torch.equal(out, ref)


def test_sampler_seeded_bit_identical():
    z = torch.randn(1, 3, 8, 8)
    a = sample(_toy_fn, z, 3, shape=(1, 3, 8, 8), seed=7)
    b = sample(_toy_fn, z, 3, shape=(1, 3, 8, 8), seed=7)
    c = sample(_toy_fn, z, 3, shape=(1, 3, 8, 8), seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(sample(_toy_fn, z, 3, shape=(1, 3, 8, 8), generator=g), a)


def test_position_noise_is_tile_and_batch_consistent():
    full = position_noise((1, 3, 40, 48), seed=5)
    tile = position_noise((2, 3, 16, 24), seed=5, origin=(8, 16))
    assert torch.equal(tile[0], full[0, :, 8:24, 16:40]) and torch.equal(tile[0], tile[1])
    assert not torch.equal(full, position_noise((1, 3, 40, 48), seed=6))
    big = position_noise((1, 3, 256, 256), seed=0)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02
    # channels and neighbouring pixels are not copies of each other
    assert not torch.equal(big[0, 0], big[0, 1]) and not torch.equal(big[..., :-1], big[..., 1:])
    det = make_noise((1, 3, 40, 48), seed=5, deterministic=True)
    assert torch.equal(det, full)


# ----------------------------------------------------------------------------- the model
def test_family_contract():
    assert eps_unet.CONFIGS == {"decoder": EpsConfig}
    assert eps_unet.IMAGE_RANGE == "-1,1" and eps_unet.NATIVE_IS_DIFFUSION is True
    cfg = EpsConfig(**TINY)
    m = eps_unet.build("decoder", cfg)
    sd = {f"decoder.{k}": v for k, v in m.state_dict().items()}
    assert set(eps_unet.convert_state_dict("decoder", sd, cfg)) == set(m.state_dict())
    with pytest.raises(ValueError):
        EpsConfig(base="vgg")
    with pytest.raises(ValueError):
        EpsConfig(patch=3)
    assert EpsConfig.from_json(EpsConfig(mults=[1, 2], **{k: v for k, v in TINY.items() if k != "mults"}).to_json()) \
        == EpsConfig(**TINY)


def test_renormalised_input_has_unit_variance():
    cfg = EpsConfig(gamma=0.6, sigma_data=1.0)
    x0, eps = torch.randn(200000), torch.randn(200000)
    for t in (0.0, 0.2, 0.5, 0.9, 1.0):
        x_t = (1 - t) * cfg.gamma * x0 + t * eps
        s = float(flow_scale(torch.tensor(t), cfg))
        assert float((x_t / s).std()) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("hw", [(5, 7), (1, 1), (3, 9)])
@pytest.mark.parametrize("mults", [(1, 2), (1, 2, 2, 2)])
def test_shapes_odd_latents(hw, mults):
    cfg = EpsConfig(**{**TINY, "mults": mults}, latent_channels=4)
    d = EpsDecoder(cfg).eval()
    z = torch.randn(2, 4, *hw)
    with torch.no_grad():
        y = d(z)
        v = d.step(torch.randn(2, 3, hw[0] * 8, hw[1] * 8), torch.tensor([0.3, 0.9]), z)
    assert y.shape == (2, 3, hw[0] * 8, hw[1] * 8) and v.shape == y.shape
    assert torch.isfinite(y).all()


def test_decoder_deterministic_and_steps():
    torch.manual_seed(0)
    d = EpsDecoder(EpsConfig(**TINY, latent_channels=4)).eval()
    for p in d.unet.conv_out.parameters():  # make F non-zero so steps matter
        torch.nn.init.normal_(p, std=0.1)
    z = torch.randn(1, 4, 3, 5).repeat(2, 1, 1, 1)
    with torch.no_grad():
        a, b = d(z), d(z)
        assert torch.equal(a, b)
        assert torch.allclose(a[0], a[1], atol=1e-6)  # deterministic noise: same latent, same image
        d.steps = 1
        c = d(z)
        d.seed = 1
        e = d(z)
        d.deterministic_noise = False
        f1, f2 = d(z), d(z)
    assert not torch.equal(a, c) and not torch.equal(c, e) and torch.equal(f1, f2)
    with torch.no_grad():  # step() == step_cond(condition())
        x = torch.randn(2, 3, 24, 40)
        assert torch.equal(d.step(x, torch.tensor(0.5), z), d.step_cond(x, torch.full((2,), 0.5), d.condition(z)))


def test_untrained_nfe1_returns_base():
    """Zero-initialised F + preconditioning: the one-step output is the base reconstruction."""
    cfg = EpsConfig(**TINY, latent_channels=4, base="tae", base_width=16, base_midblock_gn=False)
    d = EpsDecoder(cfg).eval()
    z = torch.randn(1, 4, 4, 6)
    d.steps = 1
    with torch.no_grad():
        assert torch.allclose(d(z), d.base_image(z), atol=1e-6)


def test_vae_decode_with_remapped_latent():
    """The eps decoder plugs into VAE.decode unchanged ([-1, 1] -> [0, 1], clamped)."""
    from vaepack.manifest import get_model
    from vaepack.vae import VAE, Part

    d = EpsDecoder(EpsConfig(**TINY)).eval()
    vae = VAE(entry=get_model("taef2"), parts={"decoder": Part(d, eps_unet.IMAGE_RANGE, True, "")})
    z = torch.nn.functional.interpolate(torch.randn(1, 32, 6, 6), size=(5, 9), mode="bilinear")
    y = vae.decode(z)
    assert y.shape == (1, 3, 40, 72) and float(y.min()) >= 0 and float(y.max()) <= 1


# ----------------------------------------------------------------------------- tiny training
@pytest.mark.skipif(not (SHARED_WEIGHTS / "taef2_encoder.pth").is_file(), reason="needs the TAEF2 weights mirror")
def test_tiny_training_lowers_loss_and_round_trips(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from vaepack.loader import load_part_from_files
    from vaepack.manifest import FileSpec, PartSpec
    from vaepack.train import eps as T
    from vaepack.train.config import EpsTrainConfig

    def train(encoder_id, data, run, **kw):  # run_train_eps with its config built from keywords
        return T.run_train_eps(EpsTrainConfig(encoder_id, data, run, **kw))

    monkeypatch.setenv("VAEPACK_MIRROR", str(SHARED_WEIGHTS))
    monkeypatch.setenv("VAEPACK_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # smooth random images, 40x48 (latents 5x6)
        a = rng.random((5, 6, 3))
        im = Image.fromarray((a * 255).astype("uint8")).resize((48, 40), Image.BICUBIC)
        im.save(data / f"im{i}.png")
    run = tmp_path / "run"
    kw = dict(batch=2, crop=32, lr=2e-3, warmup=1, w_perc=0.5, w_adv=0.5, adv_start=5, seed=0,
              model_config=dict(**TINY), log_every=5)
    r0 = train("taef2", data, run, steps=1, **kw)
    cache = T.LatentCache(Path(run / "cache_taef2.safetensors"), "taef2", None, base=True)
    g = torch.Generator().manual_seed(123)
    x, z, b = cache.batch(4, 32, g, cache.usable(32))
    t = torch.tensor([0.2, 0.5, 0.7, 0.95])
    eps = torch.randn(x.shape, generator=g)

    def loss(path):
        m = T.load_eps_decoder(path)
        cfg = m.cfg
        x0 = cfg.data_scale * (x - b)
        x_t = (1 - t.view(-1, 1, 1, 1)) * cfg.gamma * x0 + t.view(-1, 1, 1, 1) * eps
        with torch.no_grad():
            v = m.step_cond(x_t, t, m.condition(z, base=b))
        return float(((v - (eps - cfg.gamma * x0)) ** 2).mean())

    before = loss(r0["export"]["path"])
    r1 = train("taef2", data, run, steps=40, ema=0.5, **kw)  # resumes at step 1
    assert r1["step"] == 40
    after = loss(r1["export"]["path"])
    assert after < before
    assert "adv" in (run / "train.log").read_text()

    # the export loads through the manifest loader path (family contract, strict shapes)
    from safetensors import safe_open

    with safe_open(r1["export"]["path"], framework="pt") as f:
        meta = f.metadata()
    assert meta["family"] == "eps" and meta["encoder"] == "taef2" and meta["train_steps"] == "40"
    import json

    spec = PartSpec(part="decoder", family="eps", config=json.loads(meta["config"]),
                    files=(FileSpec(name="x", url=None, size=None, sha256=None),))
    m = load_part_from_files(spec, [Path(r1["export"]["path"])], "test")
    ck = torch.load(run / T.CKPT_NAME, weights_only=True)
    for k, v in m.state_dict().items():
        assert torch.allclose(v, ck["ema"][k].half().float())
    with torch.no_grad():
        y = m(z[:1])
    assert y.shape == (1, 3, 32, 32) and torch.isfinite(y).all()

    # the dev-set evaluation helper: NFE results equal EpsDecoder.forward on the same latents
    ev = T.eval_nfe(r1["export"]["path"], "taef2", data, nfes=(1, 2), crop=32)
    assert ev["images"] == 3 and set(ev) == {"base", "1", "2", "images"}
    assert all(math.isfinite(ev[k]["psnr"]) for k in ("base", "1", "2"))

    # max_minutes=0 stops at once and still leaves a resumable checkpoint
    r2 = train("taef2", data, run, steps=100, max_minutes=0, export=False, **kw)
    assert r2["step"] == 40 and (run / T.CKPT_NAME).is_file()
    with pytest.raises(UsageError):
        train("taesana", data, run, steps=41, **kw)


def test_eval_nfe_rejects_unknown_schedule_before_loading(tmp_path):
    from vaepack.train.eps import eval_nfe

    # The weights path does not exist: the schedule is checked first, so the error names the schedule.
    with pytest.raises(UsageError, match="unknown schedule 'cosine'"):
        eval_nfe(tmp_path / "missing.safetensors", "taef2", tmp_path, schedule="cosine")
