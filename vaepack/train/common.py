"""What every trainer here uses: autocast, the training images, atomic saves with provenance
metadata, EMA weights, stopping on Ctrl-C or a time limit, and the run log.

The device comes from ``vaepack.vae.pick_device`` (one rule and one error for a missing CUDA).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from vaepack.errors import ImageError
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
