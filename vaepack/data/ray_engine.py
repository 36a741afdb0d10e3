"""The ``ray`` engine: Ray Data over the pending units with a pool of actors, each building the model once.

``map_batches`` with a callable class and ``compute=ActorPoolStrategy(size=N)``; each row is one
unit and each actor runs the same ``encode_unit`` as the local engine, writing its shard straight to
OUT (on a cluster: storage every node sees). Without ``--ray-address``/``RAY_ADDRESS`` a local Ray is
started with ``ray.init(num_cpus=<cores>)`` and shut down afterwards; an already initialized Ray (a
notebook, the tests) is used as it is and left running.

CPU reservations: the actors together reserve all but one CPU, so Ray Data's read tasks always get
one; on a 2-core machine two actors at ``num_cpus=1`` each never start reading (measured: hangs),
at 0.5 each they run. Each actor's torch/runner threads follow its reservation (at least one).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import pickle
import warnings
from dataclasses import asdict
from typing import Callable

from vaepack.data.encode import Job, encode_unit, load_encoder
from vaepack.data.plan import InputItem, Unit
from vaepack.data.shards import UnitResult
from vaepack.errors import BackendUnavailableError, VaepackError

INSTALL_HINT = "pip install 'vaepack[ray]'"


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(f"the ray engine needs Ray Data ({e})", hint=INSTALL_HINT) from None
    return ray


class UnitEncoder:
    """The actor: the encoder is built once in ``__init__``; each call encodes a batch of units. A
    VaepackError (e.g. this node loads another backend than planned) travels back in the row, so the
    driver raises that one line instead of Ray retrying a failed actor start."""

    def __init__(self, job: Job, threads: int):
        logging.getLogger("vaepack").setLevel(logging.WARNING)
        self.job, self.vae, self.error = job, None, None
        try:
            self.vae = load_encoder(job, threads)
        except VaepackError as e:
            self.error = e

    def __call__(self, batch: dict) -> dict:
        out, errs = [], []
        for uid, items in zip(batch["unit"], batch["items"]):
            err = self.error
            if err is None:
                unit = Unit(int(uid), tuple(InputItem(**d) for d in json.loads(items)))
                try:
                    out.append(json.dumps(asdict(encode_unit(self.vae, self.job, unit))))
                except VaepackError as e:
                    err = e
            if err is not None:
                out.append("")
            errs.append(base64.b64encode(pickle.dumps(err)).decode() if err is not None else "")
        return {"result": out, "error": errs}


def actor_cpus(total_cpus: float, workers: int) -> float:
    """CPUs each actor reserves: all but one CPU shared out, in quarter-CPU steps, at least 0.25
    (2 CPUs: 1 actor 1.0, 2 actors 0.5 each; 64 CPUs, 8 actors: 7.75 each)."""
    return max(0.25, math.floor((total_cpus - 1) / workers * 4) / 4)


def _no_restarts() -> dict:
    # Ray Data's default (restarts) also makes its driver log an error line about constructor arguments
    # in the object store (ray-project/ray#53727) on every run.
    return {"max_restarts": 0}


@contextlib.contextmanager
def _quiet():
    """Ray Data's per-run INFO lines and deprecation notes are not the user's business here (the
    CLI prints one progress bar); its warnings about real problems (level ERROR) still show."""
    log = logging.getLogger("ray.data")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.|vaepack\.data")
            warnings.filterwarnings("ignore", message=".*deprecated.*")
            yield
    finally:
        log.setLevel(level)


def _start(ray, address: str | None) -> bool:
    """Start (True) or join a Ray; False when one is already initialized here."""
    if ray.is_initialized():
        return False
    addr = address or os.environ.get("RAY_ADDRESS")
    kw = dict(include_dashboard=False, logging_level=logging.ERROR)
    if addr:
        ray.init(address=addr, **kw)
    else:
        from vaepack.data.local import cpu_count

        ray.init(num_cpus=cpu_count(), **kw)
    return True


def run_ray(units: list[Unit], job: Job, workers: int, on_result: Callable[[UnitResult], None],
            address: str | None = None, cpus_per_worker: float | None = None) -> None:
    """Encode ``units`` on Ray Data with ``workers`` actors (see the module docstring)."""
    if not units:
        return
    ray = require_ray()
    started = _start(ray, address)
    try:
        with _quiet():
            ctx = ray.data.DataContext.get_current()
            bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # the CLI shows one bar with images/s
            try:
                _run(ray, units, job, workers, on_result, cpus_per_worker)
            finally:
                ctx.enable_progress_bars = bars
    finally:
        if started:
            ray.shutdown()


def _run(ray, units, job, workers, on_result, cpus_per_worker) -> None:
    workers = min(workers, len(units))
    total = float(ray.cluster_resources().get("CPU", 1))
    cpus = cpus_per_worker or actor_cpus(total, workers)
    rows = [{"unit": u.id, "items": json.dumps([asdict(i) for i in u.items])} for u in units]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # threads: the actor's share of the cores (as the local engine's workers), not of its reservation,
    # which leaves a CPU free for Ray Data's own tasks
    args = dict(fn_constructor_kwargs={"job": job, "threads": max(1, int(total // workers))}, batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
                num_gpus=1 if job.device.startswith("cuda") else 0)
    try:  # no actor restarts: a crashed actor fails the run and a rerun resumes it (done units kept)
        res = ds.map_batches(UnitEncoder, **args, ray_remote_args_fn=_no_restarts)
    except TypeError:  # a Ray that dropped ray_remote_args_fn (announced for 2.64): its defaults
        res = ds.map_batches(UnitEncoder, **args)
    for row in res.iter_rows():
        if row["error"]:
            raise pickle.loads(base64.b64decode(row["error"]))  # a VaepackError from an actor
        on_result(UnitResult(**json.loads(row["result"])))
