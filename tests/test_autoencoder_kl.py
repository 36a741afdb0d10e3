"""AutoencoderKL family against diffusers (test-only numerical oracle).

Tiny random diffusers models are saved in the diffusers layout, in the original/BFL layout (made by
the test-side converter below, written independently of vaepack's renames) and in the legacy
diffusers attention naming; each is loaded into vaepack's Encoder/Decoder with strict=True and the
outputs compared in fp32 on a non-square 48x64 input.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vaepack import latents as L
from vaepack.errors import LatentFileError
from vaepack.manifest import Space

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, AutoencoderKLFlux2  # noqa: E402

from vaepack.models import autoencoder_kl as kl  # noqa: E402

TOL = 1e-4
H, W = 48, 64

# name -> (diffusers class, diffusers kwargs, vaepack config)
CASES = {
    # SD-like: 4 latent channels, quant convs, two levels (factor 2).
    "sd_f2c4": (
        AutoencoderKL,
        dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4),
        kl.KLConfig(latent_channels=4, block_out=[32, 64], layers_per_block=1, norm_groups=8, quant_conv=True),
    ),
    # FLUX.1/SD3-like: 16 latent channels, no quant convs, four levels (factor 8), two ResNets per level.
    "flux1_f8c16": (
        AutoencoderKL,
        dict(block_out_channels=(16, 32, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=16,
             use_quant_conv=False, use_post_quant_conv=False),
        kl.KLConfig(latent_channels=16, block_out=(16, 32, 32, 32), layers_per_block=2, norm_groups=8,
                    quant_conv=False),
    ),
    # The config switch diffusers exposes (mid_block_add_attention=False).
    "no_mid_attn": (
        AutoencoderKL,
        dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
             mid_block_add_attention=False),
        kl.KLConfig(latent_channels=4, block_out=(16, 32), layers_per_block=1, norm_groups=8, quant_conv=True,
                    mid_attention=False),
    ),
    # FLUX.2-like: quant convs, BatchNorm statistics over 4 * 8 packed channels, factor 8.
    "flux2_f8c8": (
        AutoencoderKLFlux2,
        dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=8),
        kl.KLConfig(latent_channels=8, block_out=(16, 32, 32, 32), layers_per_block=1, norm_groups=8,
                    quant_conv=True, flux2_bn=True),
    ),
}

for _cls, _kw, _cfg in CASES.values():
    n = len(_kw["block_out_channels"])
    _kw["down_block_types"] = ("DownEncoderBlock2D",) * n
    _kw["up_block_types"] = ("UpDecoderBlock2D",) * n


def make_reference(name: str):
    cls, kwargs, _ = CASES[name]
    torch.manual_seed(0)
    vae = cls(**kwargs).eval()
    with torch.no_grad():
        # Perturb every parameter so that GroupNorm affines and biases are not the trivial 1/0.
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if isinstance(vae, AutoencoderKLFlux2):
            vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean))
            vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) * 2 + 0.1)
            vae.bn.num_batches_tracked.fill_(123)
    return vae


@pytest.fixture(scope="module")
def references():
    return {name: make_reference(name) for name in CASES}


# --------------------------------------------------------------------------- test-side layouts
def diffusers_to_original(dsd: dict, n_levels: int, bfl_flux2: bool = False) -> dict:
    """diffusers keys -> original LDM/BFL keys, by splitting each key into its path components.
    ``bfl_flux2``: FLUX.2's BFL layout nests quant convs in the parts and has no BN step counter."""
    attn_names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for key, v in dsd.items():
        p = key.split(".")
        if p[0] in ("encoder", "decoder"):
            part, sub = p[0], p[1]
            if sub in ("down_blocks", "up_blocks"):
                lvl = p[2] if sub == "down_blocks" else str(n_levels - 1 - int(p[2]))
                top = "down" if sub == "down_blocks" else "up"
                if p[3] == "resnets":
                    p = [part, top, lvl, "block", *p[4:]]
                else:  # downsamplers.0.conv.* / upsamplers.0.conv.*
                    p = [part, top, lvl, "downsample" if top == "down" else "upsample", *p[5:]]
            elif sub == "mid_block":
                if p[2] == "resnets":
                    p = [part, "mid", f"block_{int(p[3]) + 1}", *p[4:]]
                else:  # attentions.0.<name>[.0].<param>
                    name = attn_names[p[4]]
                    param = p[-1]
                    p = [part, "mid", "attn_1", name, param]
                    if name != "norm" and param == "weight":
                        v = v.reshape(v.shape[0], v.shape[1], 1, 1)
            elif sub == "conv_norm_out":
                p = [part, "norm_out", *p[2:]]
            p = ["nin_shortcut" if s == "conv_shortcut" else s for s in p]
        elif bfl_flux2 and p[0] == "quant_conv":
            p = ["encoder", *p]
        elif bfl_flux2 and p[0] == "post_quant_conv":
            p = ["decoder", *p]
        elif bfl_flux2 and key == "bn.num_batches_tracked":
            continue
        out[".".join(p)] = v
    return out


def diffusers_to_legacy(dsd: dict) -> dict:
    """Attention names of diffusers < 0.14 checkpoints (query/key/value/proj_attn)."""
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for key, v in dsd.items():
        for new, legacy in old.items():
            key = key.replace(new, legacy)
        out[key] = v
    return out


def layout(vae, name: str, which: str) -> dict:
    dsd = {k: v.clone() for k, v in vae.state_dict().items()}
    if which == "diffusers":
        return dsd
    if which == "legacy":
        return diffusers_to_legacy(dsd)
    n = len(CASES[name][1]["block_out_channels"])
    return diffusers_to_original(dsd, n, bfl_flux2=isinstance(vae, AutoencoderKLFlux2))


def load(part: str, sd: dict, cfg: kl.KLConfig):
    module = kl.build(part, cfg)
    module.load_state_dict(kl.convert_state_dict(part, sd, cfg), strict=True)
    return module.eval()


def images(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, H, W, generator=g) * 2 - 1


# --------------------------------------------------------------------------- numerical parity
@pytest.mark.parametrize("which", ["diffusers", "original", "legacy"])
@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_matches_diffusers(references, name, which):
    vae, cfg = references[name], CASES[name][2]
    sd = layout(vae, name, which)
    enc, dec = load("encoder", sd, cfg), load("decoder", sd, cfg)

    x = images()
    post = vae.encode(x).latent_dist
    mean, logvar = enc.moments(x)
    f = cfg.factor
    assert mean.shape == (2, cfg.latent_channels, H // f, W // f)
    assert (enc(x) - post.mean).abs().max() <= TOL
    assert (mean - post.mean).abs().max() <= TOL
    assert (logvar - post.logvar).abs().max() <= TOL

    z = torch.randn(2, cfg.latent_channels, H // f, W // f, generator=torch.Generator().manual_seed(2))
    y = dec(z)
    assert y.shape == (2, 3, H, W)
    assert (y - vae.decode(z).sample).abs().max() <= TOL


@pytest.mark.parametrize("which", ["diffusers", "original"])
def test_flux2_bn_stats_on_both_parts(references, which):
    vae, cfg = references["flux2_f8c8"], CASES["flux2_f8c8"][2]
    sd = layout(vae, "flux2_f8c8", which)
    for part in ("encoder", "decoder"):
        m = load(part, sd, cfg)
        assert torch.equal(m.bn.running_mean, vae.bn.running_mean)
        assert torch.equal(m.bn.running_var, vae.bn.running_var)
    # Without flux2_bn there is nowhere to put them: strict loading must refuse, not drop them.
    plain = dataclasses.replace(cfg, flux2_bn=False)
    with pytest.raises(RuntimeError, match="bn.running_mean"):
        load("encoder", sd, plain)


# --------------------------------------------------------------------------- FLUX.2 packing
def reference_pack(z: torch.Tensor) -> torch.Tensor:
    """The FLUX.2 pipeline's patchify, preferably diffusers' own; else element by element:
    packed[:, 4c + 2dy + dx, y, x] = z[:, c, 2y + dy, 2x + dx]."""
    try:
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    except Exception:  # the pipeline module needs transformers, which is not a dev dependency
        Flux2Pipeline = None
    if Flux2Pipeline is not None:
        return Flux2Pipeline._patchify_latents(z)
    b, c, h, w = z.shape
    out = torch.empty(b, 4 * c, h // 2, w // 2, dtype=z.dtype)
    for ci in range(c):
        for dy in range(2):
            for dx in range(2):
                out[:, 4 * ci + 2 * dy + dx] = z[:, ci, dy::2, dx::2]
    return out


def test_flux2_pack_order_and_inverse():
    z = torch.randn(2, 5, 6, 8)
    p = L.flux2_pack(z)
    assert p.shape == (2, 20, 3, 4)
    assert torch.equal(p, reference_pack(z))
    assert torch.equal(L.flux2_unpack(p), z)
    with pytest.raises(LatentFileError):
        L.flux2_pack(torch.zeros(1, 4, 5, 8))


@torch.no_grad()
def test_flux2_bn_normalization_matches_pipeline(references):
    vae, cfg = references["flux2_f8c8"], CASES["flux2_f8c8"][2]
    enc = load("encoder", layout(vae, "flux2_f8c8", "original"), cfg)
    x = images(seed=3, batch=1)

    # What Flux2Pipeline._encode_vae_image computes: mode -> patchify -> (x - mean) / sqrt(var + eps).
    m_ref = reference_pack(vae.encode(x).latent_dist.mode())
    mu_ref = vae.bn.running_mean.view(1, -1, 1, 1)
    sd_ref = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    want = (m_ref - mu_ref) / sd_ref

    assert L.FLUX2_BN_EPS == vae.config.batch_norm_eps
    # vaepack's one convention path (unpacked diffusion-space form), packed for the comparison.
    space = Space("flux2", cfg.latent_channels, 8, norm="flux2_bn")
    got = L.flux2_pack(L.mean_to_diffusion(enc(x), space, (enc.bn.running_mean, enc.bn.running_var)))
    assert got.shape == (1, 4 * cfg.latent_channels, H // 16, W // 16)
    back = L.diffusion_to_mean(L.flux2_unpack(got), space, (enc.bn.running_mean, enc.bn.running_var))
    assert torch.allclose(back, enc(x), atol=1e-4)
    # Dividing by the standard deviation scales the encoder's error by at most 1 / min(std).
    assert (got - want).abs().max() <= TOL / sd_ref.min()


# --------------------------------------------------------------------------- conversion rules
def test_convert_keeps_unknown_keys_and_drops_other_part(references):
    vae, cfg = references["sd_f2c4"], CASES["sd_f2c4"][2]
    sd = layout(vae, "sd_f2c4", "original")
    sd["loss.logvar"] = torch.zeros(())
    enc_sd = kl.convert_state_dict("encoder", sd, cfg)
    dec_sd = kl.convert_state_dict("decoder", sd, cfg)
    assert "loss.logvar" in enc_sd and "loss.logvar" in dec_sd
    assert "quant_conv.weight" in enc_sd and "post_quant_conv.weight" not in enc_sd
    assert "post_quant_conv.weight" in dec_sd and "quant_conv.weight" not in dec_sd
    assert not any(k.startswith(("encoder.", "decoder.", "down.")) for k in dec_sd)
    with pytest.raises(RuntimeError, match="loss.logvar"):
        kl.build("encoder", cfg).load_state_dict(enc_sd, strict=True)


def test_manifest_configs_match_full_size_diffusers_shapes():
    """The manifest's real configs (lists from YAML) against full-size diffusers models, on the meta
    device so that nothing is allocated."""
    sd_cfg = dict(latent_channels=4, block_out=[128, 256, 512, 512], layers_per_block=2, norm_groups=32,
                  quant_conv=True)
    flux2_cfg = dict(latent_channels=32, block_out=[128, 256, 512, 512], layers_per_block=2, norm_groups=32,
                     quant_conv=True, flux2_bn=True)
    four = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    with torch.device("meta"):
        pairs = [(AutoencoderKL(latent_channels=4, **four), sd_cfg), (AutoencoderKLFlux2(), flux2_cfg)]
        for vae, raw in pairs:
            cfg = kl.KLConfig(**raw)
            assert cfg.block_out == (128, 256, 512, 512) and cfg.factor == 8
            for part in ("encoder", "decoder"):
                ours = kl.build(part, cfg).state_dict()
                conv = kl.convert_state_dict(part, vae.state_dict(), cfg)
                assert set(conv) == set(ours)
                assert all(conv[k].shape == ours[k].shape for k in ours)
