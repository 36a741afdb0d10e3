"""What a benchmark was measured on, and how much memory its work took.

Memory on CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs) over the block,
minus the RSS at its start (glibc free lists trimmed first). So it is activations + workspace +
one-time kernel caches, not weights already resident. Without clear_refs a thread samples
/proc/self/statm every 1 ms (``PeakMemory.method`` says which); short spikes can then be missed.
On CUDA it is ``torch.cuda.max_memory_allocated`` above the allocation at the start.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import subprocess
import threading
import time
from pathlib import Path

import torch

from vaepack import __version__
from vaepack.paths import package_dir


# =========================================================================== machine info
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The few ISA flags that decide which kernels torch/oneDNN can use."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    have = set(m.group(1).split()) if m else set()
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16",
                        "amx_int8") if f in have]


def _git_commit() -> dict | None:
    root = package_dir().parent  # the checkout holding the package (none for an installed wheel)
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device | None = None) -> dict:
    """What the numbers were measured on. The load average is there because a busy machine
    inflates latency; a result with load well above ``threads`` should not be compared."""
    gpu = None
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
               "cuda": torch.version.cuda}
    return {
        "cpu": _cpu_model(), "cpu_flags": _cpu_flags(), "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "gpu": gpu, "device": str(device or "cpu"),
        "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "vaepack": __version__, "onnxruntime": package_version("onnxruntime"),
        "openvino": package_version("openvino"), "git": _git_commit(), "loadavg": load_average(),
    }


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# =========================================================================== memory
def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        m = re.search(r"VmHWM:\s+(\d+)", f.read())
    return int(m.group(1)) if m else 0


def _trim_heap() -> None:
    """Return freed heap to the OS so the baseline is honest (glibc only; harmless elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the work done inside the ``with`` block, above the level at its start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "none"
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_allocated"
            return self
        if not Path("/proc/self/statm").exists():
            return self
        _trim_heap()
        self._base = _rss_kb()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "rss_hwm"
        except OSError:
            self.method = "rss_sampled"
            self._max = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, _rss_kb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 1e6
        elif self.method == "rss_hwm":
            self.peak_mb = max(0, _hwm_kb() - self._base) * 1024 / 1e6
        elif self.method == "rss_sampled":
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_kb())
            self.peak_mb = max(0, self._max - self._base) * 1024 / 1e6
        return False
