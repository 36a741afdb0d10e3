"""TAE family: real TAEF2/TAESana weights against the upstream golden outputs, the loader's shape
check against the manifest, and the diffusers AutoencoderTiny key layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from vaepack.errors import WeightsError
from vaepack.loader import load_part, load_part_from_files
from vaepack.manifest import PartSpec
from vaepack.models import tae
from vaepack.paths import manifest_path

GOLDEN = "taef2_{}_set14_img_010_center256.npy"
TOL = 1e-3
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def golden(shared):
    d = shared / "reference" / "golden"
    try:
        x, z, y = (np.load(d / GOLDEN.format(k)) for k in ("input", "latent", "decoded"))
    except OSError:
        pytest.skip(f"golden files missing in {d}")  # conftest's shared fixture decides skip vs fail
    return (torch.from_numpy(x).permute(2, 0, 1)[None].float(), torch.from_numpy(z)[None].float(),
            torch.from_numpy(y)[None].float())


@pytest.fixture(scope="module")
def taef2(shared_weights):
    enc, entry, enc_sha = load_part("taef2", "encoder")
    dec, _, dec_sha = load_part("taef2", "decoder")
    return enc, dec, entry, enc_sha, dec_sha


def test_taef2_loaded_through_manifest_is_sha_verified(taef2):
    _, _, entry, enc_sha, dec_sha = taef2
    assert enc_sha == entry.part("encoder").files[0].sha256
    assert dec_sha == entry.part("decoder").files[0].sha256
    assert enc_sha != dec_sha


def test_taef2_encoder_matches_golden(taef2, golden):
    enc = taef2[0]
    x, z, _ = golden
    with torch.no_grad():
        got = enc(x)
    assert got.shape == z.shape == (1, 32, 32, 32)
    assert (got - z).abs().max().item() <= TOL


def test_taef2_decoder_raw_matches_unclamped_golden(taef2, golden):
    dec = taef2[1]
    _, z, y = golden
    assert y.min() < 0 or y.max() > 1, "golden decoder output is expected to be unclamped"
    with torch.no_grad():
        got = dec(z)
    assert got.shape == y.shape == (1, 3, 256, 256)
    assert (got - y).abs().max().item() <= TOL


def test_taef2_vae_wrapper_matches_golden(golden, shared_weights):
    """The one encode/decode contract: TAE latents pass through unchanged; decode clamps to [0, 1]."""
    from vaepack.runtime import load_vae

    vae = load_vae("taef2", device="cpu")
    x, z, y = golden
    assert (vae.encode(x) - z).abs().max().item() <= TOL
    out = vae.decode(z)
    assert out.min() >= 0 and out.max() <= 1
    assert (out - y.clamp(0, 1)).abs().max().item() <= TOL


def test_taesana_encoder_gives_32_channels_at_h_over_32(shared_weights):
    enc, entry, _ = load_part("taesana", "encoder")
    assert entry.space.factor == 32
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        z = enc(x)
    assert z.shape == (1, 32, 2, 3)
    assert torch.isfinite(z).all() and z.abs().max() > 0


def test_manifest_config_disagreeing_with_weights_names_the_tensor(tmp_path, monkeypatch, shared_weights):
    data = yaml.safe_load(manifest_path().read_text())
    data["models"]["taef2"]["parts"]["encoder"]["config"]["latent_channels"] = 16
    man = tmp_path / "manifest.yaml"
    man.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("VAEPACK_MANIFEST", str(man))
    with pytest.raises(WeightsError) as ei:
        load_part("taef2", "encoder")
    msg = str(ei.value)
    assert "14.weight" in msg and "(32, 64, 3, 3)" in msg and "(16, 64, 3, 3)" in msg
    assert "taef2" in msg


def test_midblock_gn_flag_mismatch_is_reported(tmp_path, monkeypatch, shared_weights):
    """TAEF2 weights hold pooled-GN tensors; a config without midblock_gn must not load them."""
    data = yaml.safe_load(manifest_path().read_text())
    data["models"]["taef2"]["parts"]["decoder"]["config"]["midblock_gn"] = False
    man = tmp_path / "manifest.yaml"
    man.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("VAEPACK_MANIFEST", str(man))
    with pytest.raises(WeightsError, match=r"unexpected 3\.pool\.0\.weight"):
        load_part("taef2", "decoder")


# --------------------------------------------------------------------------- diffusers layout
def _perturbed(m: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():  # no zero-initialised layer may hide a wrong mapping
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def test_diffusers_autoencoder_tiny_layout(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    width, lat = 16, 4
    ref = _perturbed(diffusers.AutoencoderTiny(encoder_block_out_channels=(width,) * 4,
                                               decoder_block_out_channels=(width,) * 4,
                                               latent_channels=lat), 0)
    f = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(f))
    cfg = {"kind": "f8", "latent_channels": lat, "width": width}
    enc = load_part_from_files(PartSpec("encoder", "tae", cfg, ()), [f], "tiny")
    dec = load_part_from_files(PartSpec("decoder", "tae", cfg, ()), [f], "tiny")
    # Convert alone too: every key maps, nothing of the other part leaks in.
    sd = tae.convert_state_dict("decoder", dict(ref.state_dict()), tae.TAEConfig(**cfg))
    assert set(sd) == set(dec.state_dict())

    x01 = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z_ref = ref.encoder(x01 * 2 - 1)  # diffusers' encoder takes [-1, 1] (raw network output)
        z = enc(x01)
        assert z.shape == (1, lat, 5, 7)
        assert (z - z_ref).abs().max().item() <= 1e-4
        y_ref = ref.decoder(z_ref)  # diffusers' decoder returns [-1, 1]
        y = dec(z_ref)
        assert (y * 2 - 1 - y_ref).abs().max().item() <= 1e-4
