"""Image reading/writing and atomic outputs.

Reading treats bad input as expected: every failure becomes an ImageError naming the file.
Mode policy (documented in the README): RGBA/LA/transparent palette (or tRNS) images are composited on
white; grayscale is replicated to RGB; 16-bit images are scaled from 0..65535; CMYK/YCbCr/other
modes are converted by Pillow; EXIF orientation is applied. Images above ``max_pixels`` are refused
before decoding (decompression-bomb guard).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from vaepack.errors import ImageError, OutputExistsError, UsageError, VaepackError
from vaepack.files import publish_mode

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
DEFAULT_MAX_PIXELS = 16384 * 16384  # ~268 MP; override with --max-pixels or VAEPACK_MAX_PIXELS


def max_pixels_default() -> int:
    env = os.environ.get("VAEPACK_MAX_PIXELS")
    return int(env) if env else DEFAULT_MAX_PIXELS


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError("output exists", path=str(path), hint="use --force to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        publish_mode(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_output(path: Path, force: bool) -> None:
    if Path(path).exists() and not force:
        raise OutputExistsError("output exists", path=str(path), hint="use --force to overwrite")


def load_image(path: Path, max_pixels: int | None = None, uint8: bool = False) -> torch.Tensor:
    """Read an image file as float32 (3, H, W) in [0, 1].

    ``uint8``: 8-bit images come back as uint8 (3, H, W) (a view of the H x W x 3 pixels): a quarter
    of the memory, and exactly the float image times 255 (``image_float`` converts); 16-bit and
    float images stay float32. Large images are encoded from this form tile by tile."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    limit = max_pixels or max_pixels_default()
    if path.is_dir():
        raise ImageError("is a directory, not an image", path=str(path))
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(f"cannot read ({e.strerror})", path=str(path)) from None
    if size == 0:
        raise ImageError("file is empty (0 bytes)", path=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on odd metadata: not for the user
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit below, before decoding
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = old
            w, h = im.size
            if w * h > limit:
                raise ImageError(f"{w}x{h} pixels exceeds the limit of {limit} pixels", path=str(path),
                                 hint="raise --max-pixels / VAEPACK_MAX_PIXELS if this is intended")
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception as e:  # noqa: BLE001 - broken EXIF is metadata: keep the stored pixels
                logging.getLogger("vaepack").warning("%s: unreadable EXIF orientation (%s: %s); not rotated",
                                                     path, type(e).__name__, str(e).splitlines()[0][:80] if str(e) else "")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image file Pillow can read", path=str(path)) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"corrupt or truncated image ({msg})", path=str(path)) from None
    return pil_to_tensor(im, uint8=uint8)


def image_float(x: torch.Tensor) -> torch.Tensor:
    """A ``load_image(uint8=True)`` image as the float32 (3, H, W) ``load_image`` returns (float passes)."""
    if x.dtype != torch.uint8:
        return x
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def pil_to_tensor(im, uint8: bool = False) -> torch.Tensor:
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float32)
        a = a / (65535.0 if a.max(initial=0) > 255 or mode.startswith("I;16") else 255.0)
        a = np.repeat(a[..., None], 3, axis=2)
    elif mode == "F":
        a = np.repeat(np.asarray(im, dtype=np.float32)[..., None], 3, axis=2)
    else:
        if mode in ("P", "L", "RGB") and "transparency" in im.info:  # palette index or tRNS colour key
            im = im.convert("RGBA")
        elif mode == "LA" or mode == "PA":
            im = im.convert("RGBA")
        if im.mode == "RGBA":
            # Transparency is composited on white: the usual "paper" background for photos/art.
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        rgb = im if im.mode == "RGB" else im.convert("RGB")  # (convert would copy an RGB image)
        if uint8:  # copied in ~4 MB strips: no whole-image bytes object beside Pillow's own pixels
            w, h = rgb.size
            u = np.empty((h, w, 3), dtype=np.uint8)
            step = max(1, (4 << 20) // (3 * w))
            for y in range(0, h, step):
                u[y:y + step] = np.asarray(rgb.crop((0, y, w, min(h, y + step))))
            return torch.from_numpy(u).permute(2, 0, 1)
        a = np.asarray(rgb, dtype=np.float32) / 255.0
    a = np.clip(a, 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def tensor_to_pil(x: torch.Tensor):
    """(3, H, W) float in [0, 1] (rounded to 8 bits) or uint8 -> an RGB PIL image."""
    from PIL import Image

    if x.dtype != torch.uint8:
        x = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    a = x.permute(1, 2, 0).contiguous().cpu().numpy()
    return Image.fromarray(a, "RGB")


class StripImage:
    """An 8-bit RGB image filled in row strips ((3, r, W) or (1, 3, r, W), float in [0, 1] or uint8,
    quantized as ``tensor_to_pil`` does), so a tiled decoder hands over rows as they finish and the
    float image never exists; Pillow holds the pixels until ``save_image``."""

    def __init__(self, width: int, height: int):
        from PIL import Image

        self.image = Image.new("RGB", (width, height))

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size  # (width, height)

    def write(self, top: int, rows: torch.Tensor) -> None:
        self.image.paste(tensor_to_pil(rows[0] if rows.dim() == 4 else rows), (0, top))


def save_image(path: Path, x, force: bool = True) -> None:
    """Save an image atomically: (3, H, W) float in [0, 1] or uint8, a PIL image or a StripImage;
    the format follows the suffix (PNG if unknown)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
           ".tiff": "TIFF"}.get(path.suffix.lower(), "PNG")
    im = x.image if isinstance(x, StripImage) else tensor_to_pil(x) if isinstance(x, torch.Tensor) else x
    with atomic_output(path, force=force) as tmp:
        im.save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))


def center_crop(x: torch.Tensor, crop: int | None) -> torch.Tensor:
    """The centered ``crop`` x ``crop`` window of a (..., H, W) image (each side at most its size).

    Quick measurements use it: every network here costs O(pixels), so a 256 px crop of a 4x remap
    costs what the whole image costs at 1x."""
    if not crop:
        return x
    h, w = x.shape[-2:]
    ch, cw = min(h, crop), min(w, crop)
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]


def list_images(folder: str | os.PathLike, recursive: bool = False, require: bool = False) -> list[Path]:
    """The image files (by suffix) of a folder, sorted; ``recursive`` walks subfolders too.
    ``require``: a missing folder or one without images raises an ImageError naming it."""
    d = Path(folder)
    if not d.is_dir():
        if require:
            raise ImageError("is not a folder", path=str(d), hint="pass a folder of images")
        return []
    walk = d.rglob("*") if recursive else d.iterdir()
    files = sorted(p for p in walk if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if require and not files:
        raise ImageError("contains no images", path=str(d),
                         hint=f"add {'/'.join(sorted(IMAGE_SUFFIXES))} files or pick another folder")
    return files


def expand_inputs(items: list[str], list_dir=None, what: str = "input images") -> list[Path]:
    """Files, directories (``list_dir(folder)``; default: their images, sorted) and glob patterns -> list
    of paths."""
    import glob

    out: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            out += (list_dir or list_images)(p)
        elif any(ch in it for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(it, recursive=True) if Path(m).is_file())
            if not matches:
                raise UsageError(f"no files match '{it}'")
            out += matches
        else:
            out.append(p)  # missing files are reported per file, so --keep-going can skip them
    if not out:
        raise UsageError(f"no {what} given")
    return out


def output_paths(paths: list[Path], output: Path | None, suffix: str) -> dict[Path, Path]:
    """One input + -o FILE -> that file; several inputs -> -o is a directory (default: beside inputs)."""
    def name(p: Path) -> str:
        stem = p.name
        for s in (".latent.safetensors", ".safetensors", ".latent"):
            if stem.endswith(s):
                stem = stem[: -len(s)]
                break
        else:
            stem = p.stem
        return stem + suffix

    if output is not None and len(paths) == 1 and not output.is_dir():
        return {paths[0]: output}
    if output is not None and output.exists() and not output.is_dir():
        raise UsageError(f"{output}: -o must be a directory when there are several inputs")
    outs = {p: (output / name(p) if output is not None else p.with_name(name(p))) for p in paths}
    if len(set(outs.values())) != len(outs):
        raise UsageError("several inputs map to the same output name; give them distinct names")
    return outs



def group_by_size(paths: list[Path], batch_size: int, load: Callable[[Path], Any],
                   alone: Callable[[Any], bool] = lambda x: False):
    """Yield lists of (path, image) with equal sizes, at most ``batch_size`` long, in input order.

    A path that fails to load is yielded alone as (path, error) so the caller reports it per file;
    so is an image for which ``alone`` holds (one that runs tiled: one such image in memory at a time).
    """
    group: list = []
    for p in paths:
        try:
            x = load(p)
        except VaepackError as e:
            if group:
                yield group
                group = []
            yield [(p, e)]
            continue
        if group and (len(group) >= batch_size or group[0][1].shape != x.shape or alone(x)):
            yield group
            group = []
        group.append((p, x))
        if alone(x):
            yield group
            group = []
    if group:
        yield group

