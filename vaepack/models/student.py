"""Compact distilled encoder ("student"), after paper 000 section III-B.

Paper 000 (shared/papers/000_*.txt, III-B): a 1x1 conv projects the image to ``width`` channels, then
three stages of four residual blocks (3x3 conv, normalization, identity skip), each stage followed
by a stride-2 3x3 conv that doubles the channels, and a final 1x1 conv to the latent channels. The
student regresses the teacher's latent directly (III-C), so its output is the latent as is.

Knobs beyond the paper (all default to the paper's choice) exist because of measured CPU cost:
- ``stem_stride=2`` replaces the full-resolution 1x1 stem with a lossless 2x2 space-to-depth
  ("patchify") stem, so the first stage runs at H/2; the total stride stays 8 because the last
  stage then has no downsampling conv. With the paper's layout every block costs the same FLOPs
  (channels double while pixels quarter), and full-resolution blocks at 16-32 channels are
  memory-bound on CPUs; moving them to H/2 buys 4x fewer pixels for the same channel count.
- ``stage_blocks`` lets stages have different depths (paper: 4, 4, 4).
- ``norm`` is "batch" (paper), "group" or "none". BatchNorm costs nothing at inference: ``fuse_bn``
  folds it into the preceding conv, and a folded model is described by ``fused=True``, which builds
  the same network with biased convs and no norm layers (the form shipped weights are stored in).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

_ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


@dataclass(frozen=True)
class StudentConfig:
    width: int = 32  # channels of the first stage (paper: 16, 32 or 64; Table II)
    latent_channels: int = 32
    blocks_per_stage: int = 4
    stage_blocks: tuple[int, ...] | None = None  # overrides blocks_per_stage per stage (3 entries)
    norm: str = "batch"  # "batch" | "group" | "none"
    groups: int = 8  # GroupNorm groups (norm="group")
    act: str = "relu"  # "relu" | "silu" | "gelu"
    stem_stride: int = 1  # 1: paper's full-resolution 1x1 stem; 2: 2x2 space-to-depth stem
    fused: bool = False  # BatchNorm already folded into the convs (see fuse_bn)

    def __post_init__(self):
        if self.stage_blocks is not None:
            object.__setattr__(self, "stage_blocks", tuple(int(b) for b in self.stage_blocks))
            if len(self.stage_blocks) != 3:
                raise ValueError(f"stage_blocks needs 3 entries, got {self.stage_blocks!r}")
        if self.norm not in ("batch", "group", "none"):
            raise ValueError(f"student norm must be 'batch', 'group' or 'none', got {self.norm!r}")
        if self.act not in _ACTS:
            raise ValueError(f"student act must be one of {sorted(_ACTS)}, got {self.act!r}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"student stem_stride must be 1 or 2, got {self.stem_stride!r}")
        if self.width < 1 or self.latent_channels < 1:
            raise ValueError("student width and latent_channels must be positive")

    @property
    def blocks(self) -> tuple[int, int, int]:
        return self.stage_blocks or (self.blocks_per_stage,) * 3  # type: ignore[return-value]

    @property
    def factor(self) -> int:
        return 8

    @property
    def stage_widths(self) -> tuple[int, int, int]:
        return (self.width, 2 * self.width, 4 * self.width)

    @property
    def out_width(self) -> int:
        # The paper's stride-1 stem ends with a third downsampling conv that doubles once more.
        return 8 * self.width if self.stem_stride == 1 else 4 * self.width


def _norm(cfg: StudentConfig, c: int) -> nn.Module:
    if cfg.fused or cfg.norm == "none":
        return nn.Identity()
    if cfg.norm == "batch":
        return nn.BatchNorm2d(c)
    return nn.GroupNorm(min(cfg.groups, c), c)


class ResBlock(nn.Module):
    """conv3x3 - norm - act - conv3x3 - norm, identity skip, act (III-B: conv, norm, identity skip)."""

    def __init__(self, cfg: StudentConfig, c: int):
        super().__init__()
        bias = cfg.fused or cfg.norm != "batch"  # a bias before BatchNorm is redundant
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=bias)
        self.norm1 = _norm(cfg, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=bias)
        self.norm2 = _norm(cfg, c)
        self.act = _ACTS[cfg.act]()

    def forward(self, x):
        y = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(y)) + x)


class StudentEncoder(nn.Module):
    """Images in [0, 1], (B, 3, H, W) -> latent (B, latent_channels, H/8, W/8); H, W multiples of 8."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.stage_widths
        if cfg.stem_stride == 1:
            self.stem = nn.Conv2d(3, w[0], 1)
        else:
            # Space-to-depth keeps every pixel (4x3 channels at H/2), unlike a strided conv.
            self.stem = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, w[0], 1))
        n_down = 3 if cfg.stem_stride == 1 else 2
        stages = []
        for i, (c, n) in enumerate(zip(w, cfg.blocks)):
            layers: list[nn.Module] = [ResBlock(cfg, c) for _ in range(n)]
            if i < n_down:
                c_next = w[i + 1] if i + 1 < 3 else 2 * c
                layers.append(nn.Conv2d(c, c_next, 3, stride=2, padding=1))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(cfg.out_width, cfg.latent_channels, 1)

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


CONFIGS = {"encoder": StudentConfig}


def build(part: str, cfg: StudentConfig) -> nn.Module:
    if part != "encoder":
        raise ValueError(f"the student family has only an encoder, not a {part!r}")
    return StudentEncoder(cfg)


def convert_state_dict(part: str, sd: dict[str, torch.Tensor], cfg: StudentConfig) -> dict[str, torch.Tensor]:
    """vaepack writes this family's weights itself, in its own layout: nothing to convert.

    BatchNorm's ``num_batches_tracked`` counters are training bookkeeping that exports may omit;
    an unfused BatchNorm student gets them back as zeros so strict loading still checks the rest.
    """
    out = dict(sd)
    if cfg.norm == "batch" and not cfg.fused:
        for k in [k for k in sd if k.endswith(".running_mean")]:
            out.setdefault(k[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return out


@torch.no_grad()
def fuse_bn(model: StudentEncoder) -> StudentEncoder:
    """Fold every BatchNorm into its conv (eval statistics), returning a ``fused=True`` copy.

    conv then BN is w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta, so the
    folded network computes the same function at inference with two fewer ops per conv.
    """
    cfg = model.cfg
    if cfg.fused or cfg.norm != "batch":
        return model
    fused = StudentEncoder(replace(cfg, fused=True))
    src = dict(model.named_modules())
    sd = {k: v for k, v in model.state_dict().items() if "norm" not in k}
    for name, mod in src.items():
        if not isinstance(mod, ResBlock):
            continue
        for conv_name, bn_name in (("conv1", "norm1"), ("conv2", "norm2")):
            conv, bn = getattr(mod, conv_name), getattr(mod, bn_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            sd[f"{name}.{conv_name}.weight"] = conv.weight * scale[:, None, None, None]
            sd[f"{name}.{conv_name}.bias"] = (b - bn.running_mean) * scale + bn.bias
    fused.load_state_dict(sd)
    return fused.eval()


@torch.no_grad()
def unfuse_bn(fused: StudentEncoder, calib: torch.Tensor) -> StudentEncoder:
    """Inverse of ``fuse_bn`` for further training: a BatchNorm student equal to ``fused`` on ``calib``.

    Folding forgets the BatchNorm statistics, so they are re-estimated on a calibration batch: each
    conv keeps its folded weight (no bias) and its BatchNorm gets running mean/var = that conv's
    output statistics on ``calib``, gamma = the std and beta = the mean plus the folded bias. In train
    mode on ``calib`` and in eval mode everywhere the network then computes what ``fused`` computes,
    so training resumes from the shipped function instead of from a perturbed one.
    """
    cfg = replace(fused.cfg, fused=False, norm="batch")
    out = StudentEncoder(cfg)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, mod in fused.named_modules():
        if isinstance(mod, ResBlock):
            for conv_name in ("conv1", "conv2"):
                conv = getattr(mod, conv_name)

                def hook(m, inp, y, key=f"{name}.{conv_name}"):
                    y = (y - m.bias[None, :, None, None]).float()  # the conv's output before the folded bias
                    stats[key] = (y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False))

                hooks.append(conv.register_forward_hook(hook))
    try:
        fused.eval()(calib)
    finally:
        for h in hooks:
            h.remove()
    sd = out.state_dict()
    src = fused.state_dict()
    for k in sd:
        if k in src and src[k].shape == sd[k].shape:
            sd[k] = src[k].clone()
    for key, (mean, var) in stats.items():
        block, conv_name = key.rsplit(".", 1)
        bn = f"{block}.norm{conv_name[-1]}"
        eps = out.get_submodule(bn).eps
        sd[f"{bn}.running_mean"] = mean
        sd[f"{bn}.running_var"] = var
        sd[f"{bn}.weight"] = torch.sqrt(var + eps)
        sd[f"{bn}.bias"] = mean + src[f"{key}.bias"]
    out.load_state_dict(sd)
    return out
