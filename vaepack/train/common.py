"""What every trainer here uses: autocast, the training images, atomic saves with provenance
metadata, EMA weights, stopping on Ctrl-C or a time limit, and the run log.

The device comes from ``vaepack.vae.pick_device`` (one rule and one error for a missing CUDA).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from vaepack.errors import ImageError, UsageError
from vaepack.files import command_line
from vaepack.io import atomic_output, list_images, load_image

log = logging.getLogger("vaepack.train")


# ----------------------------------------------------------------------------- precision
def autocast(device: torch.device, enabled: bool, dtype: torch.dtype | None = None):
    """Mixed precision for a training step. ``dtype`` None: bf16 on the CPU (no fp16 CPU kernels
    worth having), fp16 on CUDA. Disabled, it also switches off an enclosing autocast."""
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- images
def training_images(data_dir: str | os.PathLike) -> list[Path]:
    """The image files of a training folder and its subfolders, sorted; a missing folder or one
    without images is an ImageError naming it."""
    return list_images(data_dir, recursive=True, require=True)


def load_rgb(path: Path) -> torch.Tensor:
    """uint8 (3, H, W) under vaepack's one image policy (vaepack.io.load_image: EXIF orientation,
    transparency on white, 16-bit, size guard), so training sees images as `encode` does."""
    return load_image(path).mul(255).round().to(torch.uint8)


def load_images(data_dir: str | os.PathLike, min_side: int = 16) -> list[tuple[Path, torch.Tensor]]:
    """All readable images of a training folder as uint8; unreadable or too small ones are skipped
    with a warning in the run log, and a folder with none left is an ImageError."""
    out, bad = [], []
    for p in training_images(data_dir):
        try:
            img = load_rgb(p)
        except ImageError as e:
            bad.append(str(e))
            log.warning("skipping %s", e)
            continue
        if min(img.shape[1:]) < min_side:
            bad.append(f"{p}: smaller than {min_side} px")
            log.warning("skipping %s: smaller than %d px", p, min_side)
            continue
        out.append((p, img))
    if not out:
        raise ImageError(f"no readable images ({len(bad)} skipped, first: {bad[0]})", path=str(data_dir),
                         hint="fix or replace the files")
    return out


def random_crops(images: list[torch.Tensor], n: int, crop: int, rng: random.Random) -> torch.Tensor:
    """``n`` random ``crop`` px crops (uint8 images, random mirror) as float [0, 1] (n, 3, crop, crop)."""
    out = []
    for _ in range(n):
        img = images[rng.randrange(len(images))]
        h, w = img.shape[-2:]
        top, left = rng.randrange(h - crop + 1), rng.randrange(w - crop + 1)
        c = img[:, top:top + crop, left:left + crop]
        out.append(c.flip(-1) if rng.random() < 0.5 else c)
    return torch.stack(out).float() / 255


# ----------------------------------------------------------------------------- saving
def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves a
    half-written checkpoint."""
    with atomic_output(Path(path)) as tmp:
        torch.save(obj, str(tmp))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (metadata values as strings)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    return path


def export_safetensors(module: nn.Module, path: str | os.PathLike, metadata: dict[str, str], fp16: bool = True) -> Path:
    """A module's state dict (fp16 floats unless ``fp16=False``; BatchNorm step counters dropped)
    as an atomic safetensors file with ``metadata``."""
    sd = {k: v.detach().to(torch.float16 if fp16 and v.is_floating_point() else v.dtype).contiguous().cpu()
          for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    return save_safetensors(sd, path, metadata)


def provenance(command: str | None = None, **fields: object) -> dict[str, str]:
    """Metadata of an exported weights file: ``fields`` as strings, plus the command that made it
    (``command``, else this process's command line) and the vaepack version."""
    from vaepack import __version__

    return {**{k: str(v) for k, v in fields.items()},
            "command": command if command is not None else command_line(), "vaepack_version": __version__}


# ----------------------------------------------------------------------------- EMA
def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay after ``step`` updates, with the usual warm-up min(decay, (1 + n) / (10 + n)),
    so short CPU runs are not dominated by the initial weights."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (BatchNorm statistics) copied."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


# ----------------------------------------------------------------------------- schedule and run log
def warmup_cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    f = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * f)))


def run_summary(step: int, steps: int, exported: object, minutes: float, meta: dict, **extra: object) -> dict:
    """The end of a run (done, or stopped by Ctrl-C / the budget after its checkpoint and export): one log
    line and the summary dict a trainer returns (the CLI prints it; --json)."""
    done = step >= steps
    log.info("stopped at step %d (%s); exported %s", step, "done" if done else "interrupted/budget", exported)
    return {"step": step, "steps": steps, "done": done, "exported": exported, **extra, "minutes": minutes, **meta}


class StepLog:
    """The loss terms of the steps since the last log line, averaged into one line of the run log
    (and one ``progress`` call) every ``every`` steps and at ``total``; ``due_save()`` is true once
    ``save_minutes`` have passed since the last save."""

    def __init__(self, total: int, every: int, start_step: int, save_minutes: float,
                 progress: Callable[[dict], None] | None = None):
        self.total, self.every, self.start_step, self.save_minutes = total, every, start_step, save_minutes
        self.progress = progress
        self.rows: list[dict[str, float]] = []
        self.t_start = self.last_save = time.time()

    def add(self, step: int, terms: dict) -> None:
        self.rows.append({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()})
        if step % self.every and step != self.total:
            return
        avg = {k: sum(r[k] for r in self.rows) / len(self.rows) for k in self.rows[0]}
        sps = (step - self.start_step) / max(1e-9, time.time() - self.t_start)
        log.info("step %d/%d %s  %.3f steps/s", step, self.total, " ".join(f"{k} {v:.5f}" for k, v in avg.items()), sps)
        if self.progress:
            self.progress({"phase": "train", "step": step, "total": self.total, "loss": avg["loss"], "steps_per_s": sps})
        self.rows = []

    def due_save(self) -> bool:
        if time.time() - self.last_save <= self.save_minutes * 60:
            return False
        self.last_save = time.time()
        return True

    @property
    def minutes(self) -> float:
        return round((time.time() - self.t_start) / 60, 2)


# ----------------------------------------------------------------------------- stopping
class Stop:
    """Stop a training loop cleanly: Ctrl-C (SIGINT) sets ``interrupted`` and the loop checkpoints
    after its current step; a second Ctrl-C raises KeyboardInterrupt at once. ``timed_out()`` is true
    once ``max_minutes`` have passed since entering. Off the main thread no handler is installed."""

    def __init__(self, max_minutes: float | None = None, on_interrupt: Callable[[], None] | None = None):
        self.max_minutes = max_minutes
        self.on_interrupt = on_interrupt
        self.interrupted = False
        self.start = time.time()
        self._old = None

    def __enter__(self) -> "Stop":
        self.start = time.time()
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)

            def handler(sig, frame):
                if self.interrupted:
                    raise KeyboardInterrupt
                self.interrupted = True
                if self.on_interrupt:
                    self.on_interrupt()

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def timed_out(self) -> bool:
        return self.max_minutes is not None and time.time() - self.start >= self.max_minutes * 60


# ----------------------------------------------------------------------------- the run log
def check_resume(out_dir: str | os.PathLike, resume: bool) -> None:
    """A run folder that already holds a checkpoint is continued only when asked to (``--resume``)."""
    if (Path(out_dir) / "checkpoint.pt").exists() and not resume:
        raise UsageError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out")


def resume_checkpoint(ckpt: Path, meta: dict, device: torch.device, rng: random.Random, what: str) -> dict | None:
    """The checkpoint of a run being continued (None for a new run), refused when it was made with
    other options (``meta`` differs); the python and torch RNG states are restored from it."""
    if not ckpt.exists():
        return None
    c = torch.load(ckpt, weights_only=False, map_location=device)
    if c["meta"] != meta:
        raise UsageError(f"checkpoint was made with a different {what} config", path=str(ckpt),
                         hint="use a new --out, or the original options")
    rng.setstate(c["rng"])
    torch.set_rng_state(c["torch_rng"])
    log.info("resumed from %s at step %d", ckpt, c["step"] if "step" in c else c["state"]["step"])
    return c


@contextlib.contextmanager
def training_session(out_dir: str | os.PathLike, resume: bool, threads: int | None, device: str | None,
                     seed: int) -> Iterator[tuple[Path, Path, torch.device, random.Random]]:
    """What a resumable trainer does first: the run folder (one holding a checkpoint is continued only
    with ``resume``), its log, the thread count, the device and the seeds. Yields (run folder,
    checkpoint path, device, a ``random.Random(seed + 1)`` for crops and batches)."""
    from vaepack.vae import pick_device

    run_dir = Path(out_dir)
    check_resume(run_dir, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    with file_log(run_dir):
        if threads:
            torch.set_num_threads(threads)
        dev = pick_device(device)
        torch.manual_seed(seed)
        yield run_dir, run_dir / "checkpoint.pt", dev, random.Random(seed + 1)


@contextlib.contextmanager
def file_log(run_dir: Path, logger: logging.Logger = log) -> Iterator[logging.Logger]:
    """Send ``logger``'s INFO records to ``run_dir/train.log`` (appended) for the block."""
    h = logging.FileHandler(Path(run_dir) / "train.log")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(h)
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.removeHandler(h)
        h.close()
