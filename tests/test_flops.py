"""vaepack.flops: hand-computed MACs for single layers and the parameter counters."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from vaepack.flops import count_flops, count_macs, param_bytes, param_count


def test_conv_same_padding():
    conv = nn.Conv2d(3, 64, 3, padding=1)
    fc = count_flops(conv, (1, 3, 32, 32))
    assert fc.macs == 32 * 32 * 64 * 3 * 9
    assert fc.flops == 2 * fc.macs
    assert fc.by_type == {"Conv2d": fc.macs}


def test_conv_stride2_groups_and_batch():
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    assert count_macs(conv, (1, 16, 32, 32)) == 16 * 16 * 32 * 16 * 9
    fc = count_flops(conv, (4, 16, 32, 32))
    assert fc.macs == 4 * 16 * 16 * 32 * 16 * 9 and fc.macs_per_item == 16 * 16 * 32 * 16 * 9
    dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    assert count_macs(dw, (1, 16, 8, 8)) == 8 * 8 * 16 * 1 * 9


def test_conv_transpose_and_linear():
    ct = nn.ConvTranspose2d(8, 4, 2, stride=2)
    assert count_macs(ct, (1, 8, 5, 5)) == 5 * 5 * 8 * 4 * 4
    lin = nn.Linear(10, 7)
    assert count_macs(lin, (3, 10)) == 3 * 7 * 10


class _Attn(nn.Module):
    def forward(self, x):  # x: (B, L, E)
        return F.scaled_dot_product_attention(x, x, x) + (x @ x.transpose(1, 2)) @ x


def test_functional_matmuls_counted():
    fc = count_flops(_Attn(), (2, 16, 8))
    assert fc.by_type["attention"] == 2 * 16 * 16 * (8 + 8)
    assert fc.by_type["matmul"] == 2 * 16 * 8 * 16 + 2 * 16 * 16 * 8
    assert count_flops(_Attn(), (2, 16, 8), include_matmul=False).macs == 0


def test_bn_untouched_and_training_flag_restored():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    before = m[1].running_mean.clone()
    count_flops(m, (1, 3, 4, 4))
    assert m.training and torch.equal(m[1].running_mean, before)


def test_param_count_and_bytes():
    m = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64))
    n = 64 * 3 * 9 + 64 + 64 + 64
    assert param_count(m) == n
    assert param_bytes(m) == 4 * n
    assert param_bytes(m, include_buffers=True) == 4 * (n + 128)
    assert param_bytes(m.to(torch.bfloat16)) == 2 * n


def test_tae_encoder_counts():
    from vaepack.models import tae

    enc = tae.encoder(tae.TAEConfig(latent_channels=4))
    fc = count_flops(enc, (1, 3, 64, 64))
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert fc.macs > 0 and set(fc.by_type) == {"Conv2d"}
    assert param_count(enc) == sum(p.numel() for p in enc.parameters())
    assert len(convs) > 10


def test_kl_decoder_attention_counted():
    from vaepack.models import autoencoder_kl as K

    dec = K.build("decoder", K.KLConfig(block_out=(32, 32), norm_groups=8))
    fc = count_flops(dec, (1, 4, 8, 8))
    # Mid-block single-head attention over 8*8 tokens of width 32: L*S*(E+Ev) MACs.
    assert fc.by_type["attention"] == 64 * 64 * (32 + 32)
    assert fc.by_type["Conv2d"] > 0
