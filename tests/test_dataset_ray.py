"""The Ray Data engine of `vaepack dataset encode` (extra `vaepack[ray]`, installed by `dev`).

All Ray tests share one ``ray.init(num_cpus=2)`` (module fixture, shut down at the end) and each has
a timeout: a misconfigured actor pool waits forever for CPUs instead of failing.
"""

from __future__ import annotations

import faulthandler
import signal
import sys

import pytest
import torch

from test_dataset import GOOD, latents, make_photos, opts
from vaepack.data import shards as S
from vaepack.data.job import encode_dataset
from vaepack.data.ray_engine import actor_cpus, require_ray

TIMEOUT = 150  # seconds per Ray test (they take ~10-20 s here)


@pytest.fixture
def timeout():
    """Fail a test that runs past TIMEOUT (SIGALRM), and kill the process if even that cannot
    interrupt it (faulthandler, 30 s later), so CI never hangs."""
    def expire(*_):
        pytest.fail(f"timed out after {TIMEOUT} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIMEOUT)
    faulthandler.dump_traceback_later(TIMEOUT + 30, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def local_run(photos, tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("local") / "out"
        return out, encode_dataset(photos, out, opts())
    finally:
        torch.set_num_threads(n)


def test_actor_reservations_leave_a_cpu_for_reads():
    assert actor_cpus(2, 2) == 0.5 and actor_cpus(2, 1) == 1.0  # 2 x 1.0 on 2 CPUs hangs (issue 16)
    assert actor_cpus(64, 8) == 7.75 and actor_cpus(1, 1) == 0.25 and actor_cpus(4, 16) == 0.25


def test_missing_ray_is_a_clean_error_with_the_install_hint(monkeypatch):
    from vaepack.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BackendUnavailableError, match=r"vaepack\[ray\]"):
        require_ray()


def test_ray_gives_the_local_latents_and_index(ray_local, local_run, photos, tmp_path, timeout):
    out = tmp_path / "out"
    s = encode_dataset(photos, out, opts(engine="ray", workers=2))
    assert s.engine == "ray" and s.encoded == len(GOOD) and s.units_encoded == 4 and len(s.failed) == 4
    assert s.fingerprint == local_run[1].fingerprint
    assert (out / S.INDEX_JSONL).read_text() == (local_run[0] / S.INDEX_JSONL).read_text()
    a, b = latents(local_run[0]), latents(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on torch fp32
    assert ray_local.is_initialized()  # a Ray it did not start is left running


def test_ray_resumes_what_a_crashed_local_run_left(ray_local, local_run, photos, tmp_path, timeout):
    out = tmp_path / "out"

    def crash(_res):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_dataset(photos, out, opts(), on_result=crash)
    s = encode_dataset(photos, out, opts(engine="ray", workers=2))
    assert s.units_encoded == 3 and s.skipped == 3 and s.shards == 4
    assert (out / S.INDEX_JSONL).read_text() == (local_run[0] / S.INDEX_JSONL).read_text()


def _wrong_job(out):
    """A job planned for other weights than the workers will load (a node with another install)."""
    from vaepack.data.encode import Job
    from vaepack.data.plan import Settings

    st = Settings(model="vaepack-f2-p64", weights_sha256="0" * 64, convention={}, backend="torch", precision="fp32")
    return Job(str(out), "default", "torch", "fp32", "cpu", 2, st, "f" * 64)


def test_a_worker_with_another_install_is_one_clean_error(ray_local, photos, tmp_path, timeout):
    from vaepack.data import plan as P
    from vaepack.data.local import run_local
    from vaepack.data.ray_engine import run_ray

    units = P.make_units(P.collect_inputs(photos), 6)
    for run in (run_ray, run_local):
        with pytest.raises(P.DatasetError, match="but the dataset was planned for torch fp32 .weights 000000000000"):
            run(units, _wrong_job(tmp_path / run.__name__), 2, lambda res: None)


def test_engine_ray_without_ray_fails_before_writing(photos, tmp_path, monkeypatch, run_cli, clean_error):
    monkeypatch.setitem(sys.modules, "ray", None)
    code, _, err = run_cli("dataset", "encode", photos, tmp_path / "out", "--engine", "ray", "--backend", "torch")
    assert code == 1 and not (tmp_path / "out").exists()
    clean_error(err, "ray engine needs Ray Data", "pip install 'vaepack[ray]'")
