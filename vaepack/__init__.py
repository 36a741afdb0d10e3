"""vaepack: fast, practical image VAEs (encode, decode, distill, export, benchmark).

Importing this package has no side effects: no downloads, no cache folders, no heavy backends.
"""

__version__ = "0.1.0"

from vaepack.errors import VaepackError  # noqa: E402

__all__ = ["__version__", "VaepackError"]
