"""Typed configs of the training runs, and the option parsing/validation `vaepack distill` and
`vaepack train-eps` need before any model loads.

- ``DistillConfig``: encoder distillation (``vaepack.train.distill.run_distill``), paper 000 defaults:
  Huber(beta 0.15) to the teacher latent, Adam lr 7.5e-4, a 128 px stage then a 256 px stage (IV-B).
- ``DistillDecoderConfig``: a small TAE decoder distilled in the teacher's latent space
  (``run_distill_decoder``).
- ``EpsTrainConfig``: the eps-VAE diffusion decoder (``vaepack.train.eps.run_train_eps``), paper 004
  defaults. Not to be confused with ``vaepack.models.eps_unet.EpsConfig``, the decoder's
  architecture, which ``EpsTrainConfig.model_config`` may hold.

``validate()`` checks the options and the training folder (an ImageError naming it) without loading
anything; the run functions call it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaepack.errors import UsageError

if TYPE_CHECKING:  # annotations only: importing the architectures is not needed to build a config
    from vaepack.models.eps_unet import EpsConfig
    from vaepack.models.tae import TAEConfig

DEFAULT_SCHEDULE: tuple[tuple[int, int], ...] = ((128, 10000), (256, 10000))  # paper 000, IV-B
LR = 7.5e-4  # paper 000, IV-B
SCHEDULE_HINT = "write CROP:STEPS[,CROP:STEPS...] with crop sizes multiples of 8, e.g. 128:10000,256:10000"
FAMILIES = ("student", "tae")  # encoder student families: paper 000 (III-B), or a (pruned) TAE encoder
PARTS = ("encoder", "decoder")
PERCEPTUAL = ("auto", "lpips", "msssim_l1")
EXPORT_DTYPES = ("fp16", "bf16", "fp32")


# ---------------------------------------------------------------------------- option parsing
def parse_schedule(text: str) -> list[tuple[int, int]]:
    """``"128:10000,256:10000"`` -> ``[(128, 10000), (256, 10000)]`` (crop px, steps per stage)."""
    try:
        out = [(int(a), int(b)) for a, b in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise UsageError(f"bad schedule {text!r}", hint=SCHEDULE_HINT) from None
    return check_schedule(out, text)


def check_schedule(schedule, shown=None) -> list[tuple[int, int]]:
    """The schedule as a list of (crop, steps) ints: crops multiples of 8 (the latent grid), steps >= 0."""
    try:
        out = [(int(c), int(n)) for c, n in schedule]
    except (TypeError, ValueError):
        raise UsageError(f"bad schedule {shown if shown is not None else schedule!r}", hint=SCHEDULE_HINT) from None
    if not out or any(c < 8 or c % 8 or n < 0 for c, n in out):
        raise UsageError(f"bad schedule {shown if shown is not None else out!r}", hint=SCHEDULE_HINT)
    return out


def parse_model_config(text: str) -> dict:
    """The ``--config`` JSON object: more StudentConfig / TAEConfig / EpsConfig fields."""
    try:
        out = json.loads(text)
    except ValueError:
        out = None
    if not isinstance(out, dict):
        raise UsageError(f"--config must be a JSON object, got {text!r}")
    return out


# ---------------------------------------------------------------------------- distillation
@dataclass
class DistillOptions:
    """What encoder and decoder distillation share (the trainer ``vaepack.train.distill._train``)."""

    data_dir: Path  # training images (searched recursively); never the evaluation set
    out_dir: Path  # run folder: checkpoint.pt, teacher_cache.pt, train.log, the export; rerun = resume
    width: int = 32  # student width (channels after the stem)
    model_config: dict = field(default_factory=dict)  # more StudentConfig / TAEConfig fields
    init: Path | None = None  # warm start from a vaepack .safetensors of the same architecture
    init_from_teacher: bool = False
    teacher_config: TAEConfig | None = None  # the teacher's TAEConfig (warm starts from the teacher)
    teacher_id: str = "unknown"  # recorded in the checkpoint and the export's metadata
    schedule: tuple[tuple[int, int], ...] | list = DEFAULT_SCHEDULE  # (crop px, steps) stages
    batch: int = 64
    lr: float = LR
    warmup: int = 200  # linear LR warm-up steps, then cosine decay to lr * lr_final
    lr_final: float = 0.05
    lr_kind: str = "cosine"  # or "constant"
    # A view is (scale, flip[, reup[, reup_prob]]), see vaepack.train.pool.views_of; the default is
    # the paper-000 1.5x "bilinear pre" content at the teacher cost of a 1x view, 60% of the time.
    views: tuple[tuple, ...] = ((1.0, "random", 1.5, 0.6),)
    view_max_side: int | None = 384  # a random window of at most this side per view (teacher cost)
    views_per_image: int = 1  # teacher-cached random windows per image
    border: int = 1  # latent pixels at crop edges that are not image edges, left out of the loss
    ckpt_every: int = 200
    max_minutes: float | None = None  # stop this session cleanly after N minutes
    budget_minutes: float | None = None  # total wall clock over all resumed sessions (LR follows it)
    seed: int = 0
    device: str | None = None  # None/"auto": CUDA when available, else the CPU
    bf16: bool = True  # bf16 autocast (fp16 on CUDA) + channels_last on the CPU
    threads: int | None = None
    ema_decay: float = 0.999
    cache: Path | None = None  # another run's teacher_cache.pt made with the same data, views and seed
    export_name: str | None = None
    command: str | None = None  # recorded in the export; None = this process's command line

    def __post_init__(self):
        self.data_dir, self.out_dir = Path(self.data_dir), Path(self.out_dir)
        self.init = Path(self.init) if self.init is not None else None
        self.cache = Path(self.cache) if self.cache is not None else None
        self.model_config = dict(self.model_config or {})

    @property
    def all_views(self) -> tuple[tuple, ...]:
        """The views of each image, repeated ``views_per_image`` times (each draws its own window)."""
        return tuple(self.views) * max(1, self.views_per_image)

    def validate(self) -> None:
        """Options first, then the training folder (an ImageError naming it); loads nothing."""
        from vaepack.train.common import training_images

        check_schedule(self.schedule)
        if self.batch < 1:
            raise UsageError("batch must be at least 1")
        if self.lr_kind not in ("cosine", "constant"):
            raise UsageError(f"lr_kind must be 'cosine' or 'constant', got {self.lr_kind!r}")
        training_images(self.data_dir)


@dataclass
class DistillConfig(DistillOptions):
    """Encoder distillation: ``family`` "student" is the paper-000 student (III-B); "tae" is a TAE
    encoder, usually a depth-pruned copy of a TAE teacher (``model_config`` e.g. ``{"blocks": [0, 2,
    3, 3], "stem": "s2d"}``) warm-started from it with ``init_from_teacher`` (needs ``teacher_config``)."""

    family: str = "student"
    latent_channels: int | None = None  # None: the teacher's, measured on a 16 px input
    # Distribution matching (paper 003, vaepack.train.dm): + dm_weight * DMD loss toward dm_reference
    # (gaussian | model:ID[@SCALE] | a folder of latent files); 0 = off.
    dm_weight: float = 0.0
    dm_reference: str = "model:taef2"
    dm_real_steps: int = 2000

    def validate(self) -> None:
        if not (self.dm_weight >= 0 and self.dm_real_steps >= 1):
            raise UsageError("--dm-weight must be >= 0 and --dm-real-steps >= 1")
        if self.family not in FAMILIES:
            raise UsageError(f"encoder family must be 'student' or 'tae', got {self.family!r}")
        if self.init_from_teacher and (self.family != "tae" or self.init):
            raise UsageError("--init-from-teacher warm-starts a 'tae' student from a TAE teacher (and excludes --init)")
        super().validate()


@dataclass
class DistillDecoderConfig(DistillOptions):
    """Decoder distillation: a TAE-family decoder at ``width`` regresses the teacher decoder's image
    (L1) + ``pixel_weight`` * L1 to the ground truth, from the teacher encoder's latents.
    ``init_from_teacher`` starts from the teacher decoder (pruned channels, or fewer blocks)."""

    batch: int = 16
    init_from_teacher: bool = True
    pixel_weight: float = 1.0
    # The decoder half of a joint continuation (DMVAE trains encoder and decoder together, paper 003):
    # a frozen encoder of the teacher's space (a vaepack .safetensors, e.g. a distilled or DM-continued
    # student) supplies the latents of this share of each batch, so the decoder learns the latents that
    # encoder actually writes (the rest keeps the teacher's, so generated FLUX.2 latents still decode).
    latent_encoder: Path | None = None
    latent_encoder_frac: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        self.latent_encoder = Path(self.latent_encoder) if self.latent_encoder is not None else None

    def validate(self) -> None:
        if not 0 < self.latent_encoder_frac <= 1:
            raise UsageError(f"--latent-encoder-frac must be in (0, 1], got {self.latent_encoder_frac}")
        if self.latent_encoder is not None and not self.latent_encoder.is_file():
            raise UsageError("the --latent-encoder weights do not exist", path=str(self.latent_encoder),
                             hint="pass a vaepack encoder .safetensors (a `vaepack distill` export)")
        super().validate()


def distill_config(part: str, *, family: str = "student", pixel_weight: float = 1.0,
                   init_from_teacher: bool = True, **options: Any) -> DistillConfig | DistillDecoderConfig:
    """The validated config of `vaepack distill --part PART` (``options``: the shared fields).

    ``init_from_teacher`` is the CLI's default-on switch: it applies to TAE students only (decoders and
    ``--family tae`` encoders) and never together with ``init``.
    """
    if part not in PARTS:
        raise UsageError(f"--part must be encoder or decoder, got '{part}'")
    if family not in FAMILIES or (family != "student" and part == "decoder"):
        raise UsageError(f"--family must be student or tae (encoders only), got '{family}'")
    warm = init_from_teacher and options.get("init") is None and (part == "decoder" or family == "tae")
    if part == "encoder":
        cfg: DistillConfig | DistillDecoderConfig = DistillConfig(family=family, init_from_teacher=warm, **options)
    else:
        cfg = DistillDecoderConfig(pixel_weight=pixel_weight, init_from_teacher=warm, **options)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------- eps decoder
@dataclass
class EpsTrainConfig:
    """An eps decoder run (paper 004) for the frozen encoder ``encoder_id``; see vaepack.train.eps.

    Loss weights: ``w_vel`` velocity MSE (Eq. 9), ``w_perc`` perceptual on x0_hat (Eq. 10), ``w_adv``
    adversarial trajectory matching (Eq. 11-12) with lazy R1 ``r1`` every ``r1_every`` steps; 0
    disables a term. ``t_grid_frac``: share of t drawn on the sampler's grid for NFE in
    ``t_grid_steps`` (0 = the paper's logit-normal only).
    """

    encoder_id: str
    data_dir: Path
    out_dir: Path
    steps: int = 2000
    batch: int = 8
    crop: int = 128
    lr: float = 5e-4
    ema: float = 0.999  # EMA decay of the exported weights (paper C.2)
    resume: bool = True
    max_minutes: float | None = None
    seed: int = 0
    device: str | None = None  # None/"auto": CUDA when available, else the CPU
    model_config: EpsConfig | dict | None = None  # the architecture, or overrides of default_config
    w_vel: float = 1.0
    w_perc: float = 0.5  # paper C.2: lambda_LPIPS = 0.5
    w_adv: float = 0.5  # paper C.2: lambda_adv = 0.5
    r1: float = 1.0
    r1_every: int = 4
    adv_start: int = 0
    perceptual: str = "auto"  # auto, lpips or msssim_l1
    warmup: int = 100
    betas: tuple[float, float] = (0.9, 0.999)
    disc_lr: float | None = None
    log_every: int = 10
    save_every_minutes: float = 5.0
    export: bool = True
    export_dtype: str = "fp16"
    cache_path: Path | None = None  # latent/reconstruction cache; None: <out_dir>/cache_<encoder>.safetensors
    bf16: bool = True
    t_grid_frac: float = 0.5
    t_grid_steps: tuple[int, ...] = (1, 2, 3, 5, 10)
    command: str | None = None  # recorded in the checkpoint and export; None = this process's command line

    def __post_init__(self):
        self.data_dir, self.out_dir = Path(self.data_dir), Path(self.out_dir)
        self.cache_path = Path(self.cache_path) if self.cache_path is not None else None

    def validate(self) -> None:
        """Options first, then the training folder (an ImageError naming it); loads nothing."""
        from vaepack.train.common import training_images

        if self.steps < 1 or self.batch < 1:
            raise UsageError("--steps and --batch must be >= 1")
        if self.perceptual not in PERCEPTUAL:
            raise UsageError(f"unknown --perceptual '{self.perceptual}' (auto, lpips, msssim_l1)")
        if not 0 <= self.t_grid_frac <= 1:
            raise UsageError(f"t_grid_frac must be in [0, 1], got {self.t_grid_frac}")
        if min(self.w_vel, self.w_perc, self.w_adv, self.r1) < 0 or self.w_vel + self.w_perc + self.w_adv == 0:
            raise UsageError("loss weights must be >= 0 and not all 0")
        if self.export_dtype not in EXPORT_DTYPES:
            raise UsageError(f"unknown export dtype '{self.export_dtype}' ({', '.join(EXPORT_DTYPES)})")
        training_images(self.data_dir)


# ---------------------------------------------------------------------------- bridge (paper 001)
BRIDGE_TAPS = ("latent", "s0", "s1", "s2", "pre_rgb", "rgb")  # vaepack.models.bridge.TAP_DIVISOR


@dataclass
class BridgeTrainConfig:
    """A Bridge run (vaepack.train.bridge.run_train_bridge): the frozen ``source`` decoder cut at ``tap``
    + a projector trained to give ``target``'s encoder latent of the same photo.

    Loss: ``w_mse`` ||P(D_s(z)) - E_t(x)||^2 + ``w_l1`` |.| (the latent reconstruction objective) +
    ``w_attn`` x attention fidelity (KL between the row-softmax token affinities of target and
    prediction at temperature ``attn_tau``; vaepack's reading of the paper's abstract-level term).
    Training pairs are ``crops_per_image`` random ``crop`` px crops of each photo (random mirror; each
    photo first shrunk by a random factor in [``min_scale``, 1] when that is < 1; turned by a random
    multiple of 90 degrees with ``rot90``), encoded once by both
    frozen encoders and cached (``cache_path``). ``pairs_backend``: the runtime (vaepack.runtime.load_vae,
    e.g. auto = OpenVINO bf16 here) that encodes the source latents and, for the rgb tap, decodes them;
    the targets are always the target encoder in torch fp32. ``latent_skip``: the projector also reads
    the source latent at that many of its stages (1/8, 1/16, 1/32; models.bridge.BridgeConfig)."""

    data_dir: Path
    out_dir: Path
    source: str = "taef2"
    target: str = "taesana"
    tap: str = "s0"
    blocks: tuple[int, ...] | None = None  # projector depth per f32-encoder stage (None: TAESana's)
    adapter_blocks: int = 0  # TAE blocks in the adapter (tap features -> the target encoder's features)
    warm_start: bool = True  # the projector's f32-encoder layers start as the target encoder's
    steps: int = 3000
    batch: int = 8
    crop: int = 256
    crops_per_image: int = 8
    min_scale: float = 1.0
    rot90: bool = False  # each training crop also turned by a random multiple of 90 degrees
    pairs_backend: str = "torch"
    latent_skip: int = 0
    skip_hidden: int = 0  # > 0: each latent skip is conv 3x3 (-> this many channels) + ReLU + conv 1x1
    lr: float = 3e-4
    ema: float = 0.999
    w_mse: float = 1.0
    w_l1: float = 0.1
    w_attn: float = 0.0
    attn_tau: float = 0.1
    w_feat: float = 0.0  # adapter output vs the target encoder's features at the entry point (MSE / variance)
    train: str = "all"  # all: the whole projector learns; skip: only the latent-skip convs (the rest stays the warm start)
    freeze: int = 0  # the projector's first N layers stay the warm start (before the latent skip enters; no backward there)
    # L2-SP (Li et al. 2018): + l2sp x the squared distance of the warm-started layers from the warm start,
    # a soft version of ``freeze`` against memorizing the cached crops (0: off)
    l2sp: float = 0.0
    attn_max_tokens: int = 32  # affinities on at most 32x32 tokens (average-pooled above)
    resume: bool = False
    max_minutes: float | None = None
    seed: int = 0
    threads: int | None = None
    device: str | None = None
    bf16: bool = True  # autocast the frozen tap and the projector (bf16 on the CPU); loss and weights fp32
    cache_tap_gb: float = 6.0  # keep the frozen tap's output of every pair in memory up to this size (0: never)
    cache_path: Path | None = None  # None: <out_dir>/pairs.pt
    log_every: int = 50
    save_every_minutes: float = 5.0
    command: str | None = None

    def __post_init__(self):
        self.data_dir, self.out_dir = Path(self.data_dir), Path(self.out_dir)
        self.cache_path = Path(self.cache_path) if self.cache_path is not None else None
        if self.blocks is not None:
            self.blocks = tuple(int(b) for b in self.blocks)

    def validate(self) -> None:
        from vaepack.train.common import training_images

        if self.tap not in BRIDGE_TAPS:
            raise UsageError(f"unknown --tap '{self.tap}' (choose {', '.join(BRIDGE_TAPS)})")
        if self.steps < 1 or self.batch < 1 or self.crops_per_image < 1:
            raise UsageError("--steps, --batch and --crops-per-image must be >= 1")
        if self.crop < 32 or self.crop % 32:
            raise UsageError(f"--crop must be a multiple of 32 (the target's factor), got {self.crop}")
        if not 0 < self.min_scale <= 1:
            raise UsageError(f"--min-scale must be in (0, 1], got {self.min_scale}")
        if self.l2sp < 0 or (self.l2sp > 0 and not self.warm_start):
            raise UsageError(f"--l2sp {self.l2sp}: needs a value >= 0 and the warm start (it pulls toward it)",
                             hint="drop --no-warm-start, or --l2sp")
        if self.pairs_backend != "torch" and self.tap not in ("rgb", "latent"):
            raise UsageError(f"--pairs-backend {self.pairs_backend} gives latents and decoded images only; the "
                             f"'{self.tap}' tap's features come from torch", hint="use --pairs-backend torch")
        if self.pairs_backend != "torch" and self.tap == "rgb" and self.cache_tap_gb <= 0:
            raise UsageError(f"--pairs-backend {self.pairs_backend} decodes the crops once into the tap cache, which "
                             "is off (cache_tap_gb 0)", hint="use --pairs-backend torch")
        if self.train not in ("all", "skip"):
            raise UsageError(f"--train must be all or skip, got {self.train!r}")
        if self.train == "skip" and (not self.latent_skip or self.tap != "rgb" or not self.warm_start):
            raise UsageError("--train skip learns only the latent-skip convs of a warm-started rgb bridge",
                             hint="add --tap rgb --latent-skip N")
        if self.freeze < 0 or (self.freeze and not self.warm_start):
            raise UsageError(f"--freeze keeps the first N layers of a warm-started projector, got {self.freeze}",
                             hint="drop --no-warm-start, or use --freeze 0")
        if not 0 <= self.latent_skip <= 3:
            raise UsageError(f"--latent-skip is a number of projector stages, 0 to 3, got {self.latent_skip}")
        if self.skip_hidden < 0 or (self.skip_hidden and not self.latent_skip):
            raise UsageError(f"--skip-hidden must be >= 0 and needs --latent-skip, got {self.skip_hidden}")
        if self.latent_skip and self.tap in ("latent", "s0"):
            raise UsageError(f"--latent-skip adds the latent at the projector's 1/8 point, which the '{self.tap}' tap "
                             "enters after", hint="use a tap at 1/4 of the image or finer (s1, s2, pre_rgb, rgb)")
        if self.adapter_blocks < 0 or (self.tap == "rgb" and self.adapter_blocks):
            raise UsageError("--adapter-blocks must be >= 0 (and 0 with --tap rgb, which has no adapter)")
        if min(self.w_mse, self.w_l1, self.w_attn, self.w_feat) < 0 or self.w_mse + self.w_l1 == 0:
            raise UsageError("loss weights must be >= 0 and --w-mse + --w-l1 > 0")
        if self.attn_tau <= 0:
            raise UsageError("--attn-tau must be > 0")
        if self.blocks is not None and (len(self.blocks) != 4 or min(self.blocks) < 0):
            raise UsageError("--blocks must be 4 counts >= 0")
        training_images(self.data_dir)


# ---------------------------------------------------------------------------- DA-VAE (paper 002)
# Eq. 3-4 grouped-mean alignment; distribution matching of the detail groups to the base channels'
# distribution (paper 003's DMD loss, vaepack.train.dm: issue 15 compares the two on equal budgets), as a
# marginal (dm) or beside the base latent (dm-joint, vaepack.train.da.dm_sample); none.
DA_ALIGN = ("proj", "dm", "dm-joint", "none")


@dataclass
class DATrainConfig:
    """A DA-VAE run (vaepack.train.da.run_train_da): the frozen TAEF2 encoder on the half-size image
    gives z; the detail encoder (TAEF2's trunk + a stride-2 stage) and the decoder (TAEF2's, with
    zero-initialized detail injections and a full-resolution stage) train on

        w_l1 |x_hat - x| + w_msssim (1 - MS-SSIM) + align_weight ||Proj(z_d) - z||^2 (mean),

    the paper's Eq. 5-6 with MS-SSIM standing in for LPIPS (no LPIPS weights here) and no adversarial
    or KL term (the base channels are deterministic TAEF2 latents; z_d is deterministic too).
    lambda_align 0.5 is the paper's ImageNet setting (Sec. 4, Table 4); SD3.5's is 1.0 with L1 weight 2
    (Table S1)."""

    data_dir: Path
    out_dir: Path
    base: str = "taef2"  # the frozen base model (FLUX.2 space)
    detail_channels: int = 32
    align: str = "proj"
    align_weight: float = 0.5
    dm_real_steps: int = 2000  # align dm/dm-joint: steps of the frozen real flow on the base latents of the photos
    down_filter: str = "bicubic"
    detail_trunk: str = "s2d"  # vaepack.models.da.TRUNKS: s2d (from the default encoder) or taef2
    detail_blocks: int = 1
    head_blocks: int = 1
    # Where the detail path starts at zero: "inject" (the decoder's injections, da.DADecoder) or
    # "latent" (z_d itself, da.zero_at_latent). Both make step 0 reproduce "base only" exactly.
    zero_init: str = "inject"
    # Continue from a shipped DA model (manifest id, e.g. "da") instead of TAEF2 + zero-initialized
    # detail paths: a regularizer (align dm) applied to a trained model on a short schedule. Its
    # architecture must equal this run's.
    init: str | None = None
    steps: int = 3000
    stop_at: int | None = None  # stop at this step with the schedule of ``steps`` (equal-step ablations)
    batch: int = 8
    crop: int = 256  # full-resolution crop (the base sees crop / 2)
    lr: float = 2e-4  # the warm-started layers (TAEF2's decoder, the detail trunk)
    # The new layers (detail stage, detail stem, zero-initialized injections, full-resolution head) take
    # lr * new_lr_mult: zero-initialized weights must grow from nothing, and Adam's step is ~lr per
    # update (at lr 3e-4 the injections were still ~0.01 after 250 steps, and the decoder ignored z_d).
    new_lr_mult: float = 5.0
    ema: float = 0.999
    w_l1: float = 1.0
    w_msssim: float = 0.2
    resume: bool = False
    max_minutes: float | None = None
    seed: int = 0
    threads: int | None = None
    device: str | None = None
    bf16: bool = True  # autocast forward passes (bf16 on the CPU); loss and weights fp32
    log_every: int = 20
    save_every_minutes: float = 5.0
    command: str | None = None

    def __post_init__(self):
        self.data_dir, self.out_dir = Path(self.data_dir), Path(self.out_dir)

    def validate(self) -> None:
        from vaepack.train.common import training_images

        if self.align not in DA_ALIGN:
            raise UsageError(f"unknown --align '{self.align}' (choose {', '.join(DA_ALIGN)})")
        if self.detail_channels < 32 or self.detail_channels % 32:
            raise UsageError(f"--detail-channels must be a multiple of 32 (TAEF2's channels, Eq. 4), "
                             f"got {self.detail_channels}")
        if self.steps < 1 or self.batch < 1:
            raise UsageError("--steps and --batch must be >= 1")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise UsageError(f"--stop-at must be between 1 and --steps ({self.steps}), got {self.stop_at}")
        if self.lr <= 0 or self.new_lr_mult <= 0:
            raise UsageError("--lr and --new-lr-mult must be > 0")
        if self.crop < 64 or self.crop % 16:
            raise UsageError(f"--crop must be a multiple of 16 and >= 64, got {self.crop}")
        if min(self.w_l1, self.w_msssim, self.align_weight) < 0 or self.w_l1 + self.w_msssim == 0:
            raise UsageError("loss weights must be >= 0 and --w-l1 + --w-msssim > 0")
        if self.down_filter not in ("bicubic", "bilinear"):
            raise UsageError(f"--down-filter must be bicubic or bilinear, got {self.down_filter!r}")
        if self.detail_trunk not in ("s2d", "taef2"):
            raise UsageError(f"--detail-trunk must be s2d or taef2, got {self.detail_trunk!r}")
        if self.zero_init not in ("inject", "latent"):
            raise UsageError(f"--zero-init must be inject or latent, got {self.zero_init!r}")
        if self.init and self.zero_init != "inject":
            raise UsageError("--zero-init places the zeros of a fresh run; --init starts from trained weights",
                             hint="drop one of them")
        training_images(self.data_dir)


# ---------------------------------------------------------------------------- int8 QAT (issue 17 part 3)
QAT_LOSSES = ("mse", "l1", "image")


@dataclass
class QATTrainConfig:
    """Quantization-aware fine-tuning of one part of a manifest model (vaepack.train.qat.run_train_qat):
    the part computes with the int8 arithmetic of the QDQ export (fake quantization, straight-through
    gradients) and learns to reproduce the shipped fp32 part's outputs on crops of the training photos.

    Inputs are what the part sees in use: ``crop`` px crops remapped by ``scale`` (the pipeline's
    bilinear resize; the default model runs at 1.5x) for an encoder, the fp32 encoder's latents of
    those for a decoder. Loss on the part's raw outputs: ``mse`` (divided by the fp32 outputs' mean
    square: a relative error, as int8 noise is) or ``l1``; or, for an encoder, ``image``: L1 between
    the model's frozen fp32 decoder applied to the int8 latents and to the fp32 latents (what the
    auto policy measures is the round trip, not the latent). The activation ranges come from
    ``calibration`` (a calibration JSON; default: the part's shipped or cached one, or a new one from
    ``data_dir``) and stay fixed: they ship with the weights."""

    model: str
    part: str
    data_dir: Path
    out_dir: Path
    calibration: Path | None = None
    scale: float = 1.5
    crop: int = 128
    batch: int = 8
    steps: int = 400
    lr: float = 1e-5  # a fine-tune of converged weights: large steps undo the fp32 model
    loss: str = "mse"
    resume: bool = False
    max_minutes: float | None = None
    seed: int = 0
    threads: int | None = None
    device: str | None = None
    log_every: int = 20
    save_every_minutes: float = 5.0
    command: str | None = None

    def __post_init__(self):
        self.data_dir, self.out_dir = Path(self.data_dir), Path(self.out_dir)
        self.calibration = Path(self.calibration) if self.calibration is not None else None

    def validate(self) -> None:
        from vaepack.train.common import training_images

        if self.part not in PARTS:
            raise UsageError(f"--part must be encoder or decoder, got '{self.part}'")
        if self.loss not in QAT_LOSSES:
            raise UsageError(f"unknown --loss '{self.loss}' (choose {', '.join(QAT_LOSSES)})")
        if self.loss == "image" and self.part != "encoder":
            raise UsageError("--loss image is for an encoder (it decodes the latents with the model's fp32 decoder)")
        if self.steps < 1 or self.batch < 1:
            raise UsageError("--steps and --batch must be >= 1")
        if self.lr <= 0 or not (self.scale > 0):
            raise UsageError("--lr and --scale must be > 0")
        if self.crop < 16 or self.crop % 8:
            raise UsageError(f"--crop must be a multiple of 8 and >= 16, got {self.crop}")
        if self.calibration is not None and not self.calibration.is_file():
            raise UsageError("calibration file not found", path=str(self.calibration))
        training_images(self.data_dir)
