"""Optional heavy backends (onnx, onnxruntime, OpenVINO, TensorRT), imported lazily with an install hint.

Every ``require_*`` returns the module or raises BackendUnavailableError naming what to install.
"""

from __future__ import annotations

import importlib
import platform

import torch

from vaepack import __version__
from vaepack.errors import BackendUnavailableError

INSTALL_HINT = {
    "onnx": "pip install 'vaepack[onnx]'",
    "onnxruntime": "pip install 'vaepack[onnx]'",
    "openvino": "pip install 'vaepack[openvino]'",
    "tensorrt": "pip install 'vaepack[gpu]' (needs an NVIDIA GPU and driver)",
}


def _import(module: str, what: str):
    """Import an optional package, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendUnavailableError(f"{what} needs the '{module}' package", hint=INSTALL_HINT[module]) from None


def require_onnx():
    return _import("onnx", "the ONNX exporter")


# Distributions that all install the same top-level ``onnxruntime`` module; two of them at once
# overwrite each other's files and leave an import that loads but misses providers.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-rocm", "onnxruntime-qnn", "onnxruntime-training")


def onnxruntime_distributions() -> list[str]:
    from importlib import metadata

    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def require_onnxruntime():
    dists = onnxruntime_distributions()
    if len(dists) > 1:
        raise BackendUnavailableError(
            f"{' and '.join(dists)} are installed together; they ship the same 'onnxruntime' module "
            "and overwrite each other",
            hint=f"pip uninstall -y {' '.join(dists)}, then pip install 'vaepack[onnx]' (CPU) or "
                 "'vaepack[gpu]' (CUDA)")
    return _import("onnxruntime", "the onnxruntime backend")


def require_openvino():
    return _import("openvino", "the openvino backend")


def require_tensorrt():
    """TensorRT and a CUDA device, or a BackendUnavailableError saying which is missing."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError("TensorRT is not installed", hint=INSTALL_HINT["tensorrt"]) from None
    except OSError as e:  # the wheel is there but libnvinfer/CUDA libraries are not loadable
        raise BackendUnavailableError(f"TensorRT is installed but cannot load its libraries ({e})",
                                      hint="check the NVIDIA driver and CUDA runtime") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU, and none is available to torch",
                                      hint="use --backend onnxruntime or openvino on this machine")
    return tensorrt


def versions(*extra: str) -> dict[str, str]:
    from importlib import metadata

    out = {"vaepack": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnx", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out

