"""The precision policy of ``--backend auto``, written once.

A precision (bf16, int8, ...) qualifies for a model when, over the dev set (18 photos, full images,
the model's usual ``--scale``), its round trip against the same photos run in fp32:

- keeps the **mean** PSNR within ``MEAN_DELTA_DB`` (0.1 dB) of fp32, and
- moves **no single photo** by more than ``PHOTO_DELTA_DB`` (0.25 dB), up or down.

The mean alone hides photos that get worse while others get better: the default encoder's int8
round trip is +0.10 dB on average but moves single photos by -0.30..+0.42 dB
(benchmarks/results/int8.md). The per-photo bound leaves room for the noise a bf16 round trip adds
to a single photo (benchmarks/results/precision_policy.md has the measured deltas and the commands).

The verdict per model is recorded in weights_manifest.yaml (``bf16_safe``, an int8 calibration's
``auto``), measured with ``vaepack roundtrip DEV --backend B --dtype P --json``; ``meets_auto_policy``
turns two such lists of per-photo PSNR into that verdict. Bottom layer: no imports beyond the standard
library and vaepack.errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from vaepack.errors import UsageError

MEAN_DELTA_DB = 0.1
PHOTO_DELTA_DB = 0.25

__all__ = ["MEAN_DELTA_DB", "PHOTO_DELTA_DB", "PolicyCheck", "psnr_deltas", "check_auto_policy",
           "meets_auto_policy"]


@dataclass(frozen=True)
class PolicyCheck:
    """The outcome of one policy check; deltas are candidate minus fp32, in dB, one per photo."""

    passed: bool
    reason: str
    mean_delta_db: float
    min_delta_db: float
    max_delta_db: float
    photos: int


def psnr_deltas(fp32_psnr: Sequence[float], candidate_psnr: Sequence[float]) -> list[float]:
    """Per-photo PSNR change (candidate - fp32, dB). Two infinite PSNRs (identical images in both
    runs) count as no change; an infinite PSNR on one side only as an infinite change."""
    if len(fp32_psnr) != len(candidate_psnr):
        raise UsageError(f"the policy compares the same photos: {len(fp32_psnr)} fp32 PSNRs vs "
                         f"{len(candidate_psnr)} candidate PSNRs")
    if not fp32_psnr:
        raise UsageError("the policy needs at least one photo")
    out = []
    for ref, cand in zip(fp32_psnr, candidate_psnr):
        ref, cand = float(ref), float(cand)
        if math.isnan(ref) or math.isnan(cand):
            raise UsageError("a PSNR is NaN; the round trip produced no image to compare")
        out.append(0.0 if math.isinf(ref) and math.isinf(cand) and ref == cand else cand - ref)
    return out


def check_auto_policy(fp32_psnr: Sequence[float], candidate_psnr: Sequence[float]) -> PolicyCheck:
    """Apply the policy to per-photo PSNRs of the same photos in the same order (see the module doc)."""
    d = psnr_deltas(fp32_psnr, candidate_psnr)
    mean = sum(d) / len(d)
    lo, hi = min(d), max(d)
    worst = max(d, key=abs)
    stats = f"mean {mean:+.3f} dB, photos {lo:+.3f}..{hi:+.3f} dB over {len(d)}"
    if abs(mean) > MEAN_DELTA_DB:
        ok, why = False, f"mean PSNR moves {mean:+.3f} dB (limit {MEAN_DELTA_DB} dB)"
    elif abs(worst) > PHOTO_DELTA_DB:
        ok, why = False, f"a photo moves {worst:+.3f} dB (limit {PHOTO_DELTA_DB} dB per photo)"
    else:
        ok, why = True, f"within {MEAN_DELTA_DB} dB on average and {PHOTO_DELTA_DB} dB per photo"
    return PolicyCheck(ok, f"{why}; {stats}", mean, lo, hi, len(d))


def meets_auto_policy(fp32_psnr: Sequence[float], candidate_psnr: Sequence[float]) -> tuple[bool, str]:
    """(qualifies, one-line reason with the measured deltas): may ``--backend auto`` pick the candidate?"""
    c = check_auto_policy(fp32_psnr, candidate_psnr)
    return c.passed, c.reason
