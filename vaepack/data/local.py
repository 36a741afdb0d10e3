"""The ``local`` engine: worker processes on this machine, each building the model once.

One worker runs in the driver's process (no start-up cost; the driver's model is reused). N > 1
workers are spawned processes that split the CPU (torch and runner threads = cores // N) and pull
units from a bounded queue (2 per worker), so at most a few units are in flight: each worker holds
one unit in memory and writes its shard itself; only small UnitResults travel back.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import traceback
from typing import Callable

from vaepack.data.encode import Job, encode_unit, load_encoder
from vaepack.data.plan import DatasetError, Unit
from vaepack.data.shards import UnitResult
from vaepack.errors import VaepackError

OnResult = Callable[[UnitResult], None]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def worker_threads(workers: int) -> int:
    """Each worker's share of the cores (at least one thread)."""
    return max(1, cpu_count() // max(1, workers))


def _worker(job: Job, threads: int, tasks, results) -> None:
    """A worker process: build the encoder, then encode units until the None sentinel."""
    import logging

    logging.getLogger("vaepack").setLevel(logging.WARNING)
    try:
        vae = load_encoder(job, threads)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which raises it
        results.put(("error", None, e if isinstance(e, VaepackError) else traceback.format_exc()))
        return
    results.put(("ready", os.getpid(), None))
    while True:
        unit = tasks.get()
        if unit is None:
            return
        try:
            results.put(("result", unit.id, encode_unit(vae, job, unit)))
        except BaseException as e:  # noqa: BLE001
            results.put(("error", unit.id, e if isinstance(e, VaepackError) else traceback.format_exc()))
            return


def _raise(unit: int | None, err) -> None:
    if isinstance(err, VaepackError):
        raise err
    where = f"unit {unit}" if unit is not None else "start-up"
    raise RuntimeError(f"a dataset worker failed at {where}:\n{err}")


def run_local(units: list[Unit], job: Job, workers: int, on_result: OnResult, vae=None) -> None:
    """Encode ``units`` with ``workers`` processes, calling ``on_result`` in the driver as each unit's
    shard is written. An exception (a worker's, or one raised by ``on_result``) stops every worker;
    the units already written stay done."""
    if not units:
        return
    if workers <= 1:
        vae = vae if vae is not None else load_encoder(job)
        for u in units:
            on_result(encode_unit(vae, job, u))
        return
    workers = min(workers, len(units))
    ctx = mp.get_context("spawn")  # fork after torch/OpenVINO have started threads is unsafe
    tasks, results = ctx.Queue(maxsize=2 * workers), ctx.Queue()
    threads = worker_threads(workers)
    procs = [ctx.Process(target=_worker, args=(job, threads, tasks, results), daemon=True,
                         name=f"vaepack-dataset-{i}") for i in range(workers)]
    stop = threading.Event()

    def feed() -> None:
        for item in [*units, *([None] * workers)]:
            while not stop.is_set():
                try:
                    tasks.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue

    for p in procs:
        p.start()
    feeder = threading.Thread(target=feed, name="vaepack-dataset-feed", daemon=True)
    feeder.start()
    remaining = len(units)
    ok = False
    try:
        while remaining:
            try:
                kind, unit, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise DatasetError(f"a dataset worker died (exit code {dead[0].exitcode}); done units are kept",
                                       hint="rerun the same command to resume") from None
                continue
            if kind == "error":
                _raise(unit, payload)
            elif kind == "result":
                remaining -= 1
                on_result(payload)
        ok = True
    finally:
        stop.set()
        for p in procs:
            if ok:
                p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        feeder.join(timeout=1)
        for q in (tasks, results):
            q.cancel_join_thread()
            q.close()
