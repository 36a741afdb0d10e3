"""The --backend auto precision policy (vaepack/policy.py): mean within MEAN_DELTA_DB, every photo
within PHOTO_DELTA_DB."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from vaepack.errors import UsageError
from vaepack.policy import MEAN_DELTA_DB, PHOTO_DELTA_DB, check_auto_policy, meets_auto_policy, psnr_deltas

FP32 = [30.0, 28.0, 32.0, 25.0]


def test_the_policy_is_the_documented_one():
    assert (MEAN_DELTA_DB, PHOTO_DELTA_DB) == (0.1, 0.25)


def test_identical_runs_qualify():
    ok, why = meets_auto_policy(FP32, FP32)
    assert ok and "+0.000" in why


def test_small_moves_both_ways_qualify():
    d = [0.9 * PHOTO_DELTA_DB, -0.9 * PHOTO_DELTA_DB, 0.05, -0.05]  # mean 0
    ok, _ = meets_auto_policy(FP32, [a + b for a, b in zip(FP32, d)])
    assert ok


def test_mean_shift_beyond_the_limit_fails():
    shift = MEAN_DELTA_DB + 0.02  # every photo inside the per-photo bound, the mean is not
    ok, why = meets_auto_policy(FP32, [v - shift for v in FP32])
    assert not ok and "mean" in why and f"{MEAN_DELTA_DB}" in why


def test_one_photo_beyond_the_limit_fails_even_with_a_good_mean():
    # int8-like: the mean barely moves, one photo moves too much (benchmarks/results/int8.md)
    d = [PHOTO_DELTA_DB + 0.05, -0.1, -0.1, -0.1]
    c = check_auto_policy(FP32, [a + b for a, b in zip(FP32, d)])
    assert not c.passed and "photo" in c.reason and f"{PHOTO_DELTA_DB}" in c.reason
    assert abs(c.mean_delta_db) <= MEAN_DELTA_DB
    assert c.max_delta_db == pytest.approx(PHOTO_DELTA_DB + 0.05) and c.min_delta_db == pytest.approx(-0.1)
    assert c.photos == 4


def test_infinite_psnr():
    assert psnr_deltas([math.inf, 30.0], [math.inf, 30.1]) == pytest.approx([0.0, 0.1])
    ok, _ = meets_auto_policy([math.inf, 30.0], [40.0, 30.0])  # identical in fp32, not in the candidate
    assert not ok


@pytest.mark.parametrize("ref,cand", [([], []), ([30.0], [30.0, 31.0]), ([math.nan], [30.0])])
def test_bad_input_is_a_vaepack_error(ref, cand):
    with pytest.raises(UsageError):
        meets_auto_policy(ref, cand)


def test_policy_module_is_bottom_layer():
    """No heavy imports: importing the policy must not pull torch or another vaepack layer in."""
    code = ("import sys, vaepack.policy; "
            "bad = [m for m in sys.modules if m == 'torch' or (m.startswith('vaepack.') "
            "and m not in ('vaepack.policy', 'vaepack.errors'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
