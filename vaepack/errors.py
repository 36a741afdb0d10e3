"""One exception hierarchy for everything a user can get wrong.

The CLI maps a VaepackError to a one-line message and its ``exit_code``; anything else is a bug
and keeps its traceback. Messages name the file and say what to do about it.
"""

from __future__ import annotations


class VaepackError(Exception):
    """A problem the user can fix. ``str(err)`` is the whole one-line message."""

    exit_code = 1

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        self.path = path
        self.hint = hint
        text = f"{path}: {message}" if path else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)


class UsageError(VaepackError):
    """Bad combination of options or arguments (exit code 2, like click's usage errors)."""

    exit_code = 2


class UnknownModelError(UsageError):
    pass


class ManifestError(VaepackError):
    pass


class WeightsError(VaepackError):
    """Missing, tampered or mismatched weights."""


class ImageError(VaepackError):
    """An input image that cannot be read or is not usable."""


class LatentFileError(VaepackError):
    """A latent file with the wrong layout, dtype, metadata or values."""


class OutputExistsError(VaepackError):
    pass


class BackendUnavailableError(VaepackError):
    """An optional backend (onnxruntime, openvino, tensorrt, CUDA) is not installed or usable."""


class ExportError(VaepackError):
    pass
