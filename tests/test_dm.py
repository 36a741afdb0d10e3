"""Distribution matching (paper 003, DMVAE; issue 15, section 2): the DMD gradient against a hand
computation on toy Gaussians, a toy encoder pulled toward a reference, references and their errors,
the cached real flow, and the measurement helpers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from vaepack.errors import LatentFileError, UsageError
from vaepack.train import dm as D

import test_modelability

tiny = test_modelability.tiny  # the tiny-model zoo fixture


class GaussianFlow(nn.Module):
    """The exact velocity of rectified flow on per-channel Gaussian data N(mu, s^2) (vaepack convention
    x_t = (1 - t) x0 + t eps): v = E[eps | x_t] - E[x0 | x_t], with x_t ~ N((1 - t) mu, (1 - t)^2 s^2 + t^2).
    mu and log s are parameters, so as a fake flow it can fit the encoder's latents exactly."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu = nn.Parameter(torch.as_tensor(mu, dtype=torch.float32).clone())
        self.log_s = nn.Parameter(torch.as_tensor(s, dtype=torch.float32).log().clone())

    def forward(self, x, t):
        t = t.view(-1, 1, 1, 1)
        mu, s2 = self.mu.view(1, -1, 1, 1), (2 * self.log_s).exp().view(1, -1, 1, 1)
        var = (1 - t) ** 2 * s2 + t ** 2
        d = x - (1 - t) * mu
        e_eps = t / var * d
        e_x0 = mu + (1 - t) * s2 / var * d
        return e_eps - e_x0


def _posterior_mean(x_t, t, mu, s):
    """E[x0 | x_t] for x0 ~ N(mu, s^2), written directly (the hand computation)."""
    t = t.view(-1, 1, 1, 1)
    return mu + (1 - t) * s ** 2 * (x_t - (1 - t) * mu) / ((1 - t) ** 2 * s ** 2 + t ** 2)


def test_dm_gradient_equals_the_hand_computation():
    real, fake = GaussianFlow([1.0, -0.5], [0.5, 2.0]), GaussianFlow([0.0, 0.0], [1.0, 1.0])
    m = D.DistributionMatcher(real, D.DMConfig(), fake=fake)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 4, 5, generator=g).requires_grad_(True)
    t = torch.tensor([0.1, 0.5, 0.9])
    eps = torch.randn(3, 2, 4, 5, generator=g)
    loss = m.loss(z, t, eps)
    loss.backward()

    zd = z.detach()
    x_t = (1 - t.view(-1, 1, 1, 1)) * zd + t.view(-1, 1, 1, 1) * eps
    mu_r, s_r = torch.tensor([1.0, -0.5]).view(1, 2, 1, 1), torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
    x_real = _posterior_mean(x_t, t, mu_r, s_r)
    x_fake = _posterior_mean(x_t, t, torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1))
    norm = (zd - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    grad = ((zd - x_real) - (zd - x_fake)) / norm
    assert float(grad.abs().max()) > 0.1  # a real test: the two flows disagree
    assert torch.allclose(z.grad * z.numel(), grad, atol=1e-5)
    assert float(loss.detach()) == pytest.approx(0.5 * float(grad.pow(2).mean()), rel=1e-5)
    # the matcher's normalization: the gradient reaches the raw z through (z - mean) / std
    m2 = D.DistributionMatcher(real, D.DMConfig(), fake=fake, mean=torch.tensor([3.0, -1.0]),
                               std=torch.tensor([2.0, 4.0]))
    zr = (zd * torch.tensor([2.0, 4.0]).view(1, 2, 1, 1) + torch.tensor([3.0, -1.0]).view(1, 2, 1, 1))
    zr.requires_grad_(True)
    assert float(m2.loss(zr, t, eps).detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    m2.loss(zr, t, eps).backward()
    assert torch.allclose(zr.grad * zr.numel() * torch.tensor([2.0, 4.0]).view(1, 2, 1, 1), grad, atol=1e-4)


def test_fake_initialized_from_real_gives_zero_loss_until_it_learns_the_latents():
    real = GaussianFlow([2.0], [1.0])
    m = D.DistributionMatcher(real, D.DMConfig(fake_updates=5, fake_lr=0.05))
    assert m.fake is not real and not any(p.requires_grad for p in real.parameters())
    z = torch.randn(8, 1, 4, 4)
    assert float(m.loss(z)) == 0.0
    for _ in range(20):
        m.fake_step(z)
    assert float(m.fake.mu.detach()) < 1.5  # the fake follows the latents (mean 0) ...
    assert float(m.loss(z)) > 1e-3  # ... so the two flows now disagree
    assert float(real.mu.detach()) == 2.0  # the real flow stays frozen


def test_matcher_state_round_trip_continues_exactly():
    """A resumed trainer's matcher (fake flow, its optimizer and the t/noise stream) goes on as the
    uninterrupted one would: same fake updates and the same DMD loss afterwards."""
    z = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    cfg = D.DMConfig(fake_updates=2, fake_lr=0.05, seed=3)
    a = D.DistributionMatcher(GaussianFlow([2.0], [1.0]), cfg)
    for _ in range(3):
        a.fake_step(z)
    state = copy.deepcopy(a.state_dict())  # as saved to disk: not tied to a's tensors
    b = D.DistributionMatcher(GaussianFlow([2.0], [1.0]), cfg)
    b.load_state_dict(state)
    for m in (a, b):
        m.fake_step(z)
    assert torch.equal(a.fake.mu, b.fake.mu) and torch.equal(a.fake.log_s, b.fake.log_s)
    assert float(a.loss(z)) == float(b.loss(z)) != 0.0
    c = D.DistributionMatcher(GaussianFlow([2.0], [1.0]), cfg)  # without the generator state (older checkpoints)
    c.load_state_dict({k: v for k, v in state.items() if k != "dm_gen"})
    c.fake_step(z)
    assert not torch.equal(c.fake.mu, a.fake.mu)  # the noise stream restarted: the step differs


def test_toy_encoder_mean_moves_toward_the_reference():
    torch.manual_seed(0)
    real = GaussianFlow([2.0, -1.0], [1.0, 1.0])  # the reference N((2, -1), I)
    m = D.DistributionMatcher(real, D.DMConfig(fake_updates=5, fake_lr=0.05, seed=1))
    a = nn.Parameter(torch.ones(1, 2, 1, 1))  # the toy encoder z = a x + b
    b = nn.Parameter(torch.zeros(1, 2, 1, 1))
    opt = torch.optim.Adam([a, b], lr=0.02)
    g = torch.Generator().manual_seed(2)
    for _ in range(300):
        z = a * torch.randn(16, 2, 4, 4, generator=g) + b
        m.fake_step(z)
        loss = m.loss(z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean = b.detach().flatten()
    assert abs(float(mean[0]) - 2.0) < 0.2 and abs(float(mean[1]) + 1.0) < 0.2, mean  # from (0, 0)
    assert torch.all((a.detach().abs() > 0.8) & (a.detach().abs() < 1.2)), a  # the spread (already matched) kept


# ----------------------------------------------------------------------------- references
def test_unknown_reference_is_a_one_line_error(tmp_path):
    with pytest.raises(UsageError) as e:
        D.reference_latents("nonsense", channels=4)
    assert "nonsense" in str(e.value) and "gaussian" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="channel count"):
        D.reference_latents("gaussian")
    with pytest.raises(UsageError, match="t_min"):
        D.DMConfig(t_min=0.0).check()


def _write_latent(path, c, seed=0):
    from vaepack import latents as L

    z = torch.randn(1, c, 6, 7, generator=torch.Generator().manual_seed(seed))
    L.save_latent(path, L.LatentRecord(latent=z, model="m", space="s", weights_sha256="", scale=1.0,
                                       filter="bilinear", orig_size=(48, 56), scaled_size=(48, 56),
                                       padding=(0, 0, 0, 0), convention={}, dtype="fp32"))


def test_latent_folder_reference_and_its_errors(tmp_path):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    with pytest.raises(LatentFileError, match="no latent files"):
        D.reference_latents(str(ref_dir), channels=4)
    _write_latent(ref_dir / "a.latent.safetensors", 4, 0)
    _write_latent(ref_dir / "b.latent.safetensors", 4, 1)
    ref = D.reference_latents(str(ref_dir), channels=4)
    assert ref.channels == 4 and len(ref.latents) == 2 and ref.latents[0].shape == (4, 6, 7)
    with pytest.raises(UsageError, match="has 4 latent channels but the encoder writes 8"):
        D.reference_latents(str(ref_dir), channels=8)
    _write_latent(ref_dir / "c.latent.safetensors", 3)
    with pytest.raises(LatentFileError) as e:
        D.reference_latents(str(ref_dir))
    assert "c.latent.safetensors" in str(e.value) and "3 channels" in str(e.value) and "\n" not in str(e.value)


def test_model_reference_encodes_the_training_photos(tiny):
    from vaepack import modelability as M
    from vaepack.train.common import load_images

    root, train, _dev = tiny
    ref = D.reference_latents("model:tiny-a@1.5", channels=4, data_dir=train, backend="torch", device="cpu")
    want, _ = M.encode_images(M.load_encoder("tiny-a", "torch", "cpu"), load_images(train), 1.5)
    assert len(ref.latents) == 3 and all(torch.equal(a, b) for a, b in zip(ref.latents, want))
    with pytest.raises(UsageError, match="4 latent channels but the encoder writes 32"):
        D.reference_latents("model:tiny-a", channels=32, data_dir=train, backend="torch", device="cpu")
    with pytest.raises(UsageError, match="nope"):
        D.reference_latents("model:nope", channels=4, data_dir=train)


def test_real_flow_is_cached_and_the_matcher_starts_at_zero(tmp_path, one_thread):
    cfg = D.DMConfig(reference="gaussian", gaussian_samples=4, gaussian_size=8,
                     real=D.FlowTrainConfig(steps=3, batch=2, crop=8, width=16, blocks=1, time_dim=16, warmup=1))
    m = D.build_matcher(cfg, channels=4, cache=tmp_path)
    files = list(tmp_path.glob("dm-real-*.safetensors"))
    assert len(files) == 1
    ref = D.reference_latents("gaussian", channels=4, gaussian_samples=4, gaussian_size=8)
    again = D.real_flow(ref, cfg.real, cache=tmp_path)
    assert again.cached and torch.equal(again.mean, torch.zeros(4)) and torch.equal(again.std, torch.ones(4))
    sd1, sd2 = m.real.state_dict(), again.model.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    other = D.real_flow(ref, D.FlowTrainConfig(steps=4, batch=2, crop=8, width=16, blocks=1, time_dim=16),
                        cache=tmp_path)
    assert not other.cached and len(list(tmp_path.glob("dm-real-*.safetensors"))) == 2  # another setting, another file
    z = torch.randn(2, 4, 8, 8)
    assert float(m.loss(z)) == 0.0  # fake == real at the start
    m.fake_step(z * 3 + 1)
    assert float(m.loss(z)) > 0.0 and math.isfinite(m.last["fake_loss"])


# ----------------------------------------------------------------------------- measurements
def test_std_ratio_and_sliced_wasserstein():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    assert D.channel_std_ratio(2 * x, x) == pytest.approx([2.0, 2.0, 2.0])
    assert D.channel_std_ratio(list(x), x) == pytest.approx([1.0, 1.0, 1.0])
    assert D.sliced_wasserstein(x, x) == pytest.approx(0.0, abs=1e-9)
    one = torch.randn(500, 1, generator=g)
    assert D.sliced_wasserstein(one + 0.7, one) == pytest.approx(0.7, rel=1e-6)  # 1-D: W2 of a shift
    far, near = D.sliced_wasserstein(x + 2.0, x), D.sliced_wasserstein(x + 0.2, x[:3])
    assert far > 5 * near > 0
    with pytest.raises(UsageError, match="channel"):
        D.sliced_wasserstein(x, torch.randn(10, 5))
