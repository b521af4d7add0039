"""Decoding: every image visionflow reads goes through `decode_image`.

It returns a uint8 tensor (C, H, W) in the requested channel count and size, whatever the file's mode
(L, LA, RGB, RGBA, P, CMYK, I;16, I, F), with the EXIF orientation applied. Anything that cannot be
decoded raises `BrokenImage` naming the file, so collections can skip it and say so.

Plain JPEGs (RGB or greyscale, no orientation tag) skip Pillow: simplejpeg hands the bytes straight to
libjpeg-turbo, the library Pillow itself decodes with, so the pixels are the same and the Python work of
Pillow's JPEG parser (most of a small file's cost: CIFAR-10 decodes 3-4x faster) is gone. Everything else,
and any JPEG simplejpeg refuses, goes through Pillow.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from visionflow.errors import BrokenImage

try:
    import simplejpeg
except ImportError:  # a declared dependency; without it every JPEG goes through Pillow
    simplejpeg = None

# Files with these endings are images; anything else in a folder (.txt, .DS_Store, .csv) is ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".gif", ".webp", ".avif",
                              ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga"})
# Video files, read as clips (data/clips.py); named here too, so that a video given to an image model is said to be one.
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".avi", ".webm", ".mkv"})  # .mov: what phones and cameras write

# Pillow's own limit (about 89 Mpx) only warns between 1x and 2x; we refuse anything above it, so a
# decompression bomb is a broken file rather than a memory spike.
MAX_PIXELS = 89_478_485


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _to_8bit(img: Image.Image) -> Image.Image:
    """High bit-depth modes scale down to 8 bits (Pillow's convert would clip them instead)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)  # signed: a negative 32-bit value is below black, not a huge one
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")
    if img.mode == "F":
        # Floats are intensities in [0, 1], clipped, when their finite values lie within it give or take 5% (or all
        # are one value); another range (0..255, a depth map) is stretched from its lowest to its highest finite
        # value. NaN counts as the lowest, +-inf as the ends.
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if (lo >= -0.05 and hi <= 1.05) or lo == hi:
            lo, hi = 0.0, 1.0
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
        scaled = (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    return img


def pil_to_tensor(img: Image.Image, channels: int, size: int | None) -> torch.Tensor:
    """A decoded Pillow image -> uint8 (channels, size, size). Resizing squashes to a square (as Keras does)."""
    img = _to_8bit(img)
    if channels == 1 and img.mode == "LAB":
        img = img.convert("RGB")  # Pillow converts LAB to RGB only
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return _hwc_to_tensor(np.asarray(img, dtype=np.uint8))


def _hwc_to_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))  # one copy, always: 2 us a CIFAR image, not 4.7


_ORIENTATION_MARKERS = (b"Exif\x00\x00", b"http://ns.adobe.com/xap/1.0/")  # EXIF or XMP could rotate it


def _may_be_rotated(data: bytes) -> bool:
    """Whether a JPEG's header may hold an EXIF or XMP segment (either may carry an orientation). A search of the
    first 64 KB answers for most files at a byte search's speed (1.3 us a CIFAR image, where walking the segments
    took 2.7); past 64 KB the segments are walked up to the image data, so that one behind long comments is found."""
    if any(marker in data[:65536] for marker in _ORIENTATION_MARKERS):
        return True
    if len(data) <= 65536:
        return False
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before the marker
            i += 1
        elif marker in (0xDA, 0xD9):  # start of scan (or end of image): the header is over
            return False
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            i += 2
        else:
            if marker == 0xE1 and data[i + 4:i + 40].startswith(_ORIENTATION_MARKERS):
                return True
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return True  # a header that cannot be walked: Pillow decides


def decode_plain_jpeg(data: bytes, channels: int, size: int | None) -> torch.Tensor | None:
    """A JPEG with nothing for Pillow to do (no orientation tag, RGB or greyscale, the channel count
    kept or grey repeated) decoded by libjpeg-turbo directly; None to send it through Pillow instead."""
    if simplejpeg is None or data[:3] != b"\xff\xd8\xff":
        return None
    if _may_be_rotated(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if width * height > MAX_PIXELS or colorspace not in ("YCbCr", "Gray"):
            return None
        if channels == 1 and colorspace != "Gray":
            return None  # Pillow's RGB -> L weights differ from the stored luma: keep one answer
        arr = simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB")
    except ValueError:
        return None  # truncated or unusual: Pillow decides, and names what is wrong
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if size is not None and (width, height) != (size, size):
        img = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        arr = np.asarray(img, dtype=np.uint8)
    return _hwc_to_tensor(arr)


def open_image(source: str | os.PathLike | bytes, origin: str | None = None) -> Image.Image:
    """Open and fully load an image with EXIF orientation applied; BrokenImage on any failure."""
    origin = origin or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        if isinstance(source, bytes):
            if not source:
                raise BrokenImage(origin, "empty file")
            img = open_within_limit(io.BytesIO(source), origin)
        else:
            img = open_within_limit(source, origin)  # decode_image has checked that it is a file with bytes in it
        img.load()
        if img.format == "JPEG" and "exif" not in img.info and "xmp" not in img.info:
            return img  # no orientation to apply; parsing for it costs a tenth of a small JPEG's decode
        return ImageOps.exif_transpose(img)
    except BrokenImage:
        raise
    except UnidentifiedImageError as exc:
        if os.path.splitext(origin)[1].lower() in VIDEO_EXTENSIONS:  # named to an image run: say what it is
            raise BrokenImage(origin, "a video, but the run's model takes images") from None
        raise BrokenImage(origin, f"not a readable image ({type(exc).__name__})") from None
    except PermissionError:
        raise BrokenImage(origin, "no permission to read it") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BrokenImage(origin, f"truncated or corrupt image ({exc})") from None


def open_within_limit(source, origin: str) -> Image.Image:
    """Image.open (the header only), refusing an image over MAX_PIXELS as a broken file: between 1x and 2x Pillow
    only warns, above it raises its own error, and both are the same decompression bomb here."""
    try:
        img = Image.open(source)
    except Image.DecompressionBombError:
        raise BrokenImage(origin, f"over the {MAX_PIXELS:,}-pixel limit (decompression bomb?)") from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise BrokenImage(origin, f"{width}x{height} pixels is over the {MAX_PIXELS:,} limit (decompression bomb?)")
    return img


def decode_image(source: str | os.PathLike | bytes, channels: int, size: int | None = None,
                 origin: str | None = None) -> torch.Tensor:
    """Read one image file (or its bytes) as a uint8 tensor (channels, size, size)."""
    if not isinstance(source, bytes):
        origin = origin or str(source)
        require_nonempty_file(source, origin)
        if os.path.splitext(str(source))[1].lower() in (".jpg", ".jpeg"):
            try:
                with open(source, "rb") as f:
                    source = f.read()
            except OSError as exc:
                raise BrokenImage(origin, f"cannot be read ({exc.strerror or exc})") from None
    if isinstance(source, bytes):
        fast = decode_plain_jpeg(source, channels, size)
        if fast is not None:
            return fast
    image = open_image(source, origin)
    try:
        return pil_to_tensor(image, channels, size)
    except (ValueError, OSError) as exc:  # a mode Pillow opens but cannot convert (LAB, ...)
        raise BrokenImage(origin or str(source), f"cannot convert its {image.mode} pixels ({exc})") from None


def require_nonempty_file(path: str | os.PathLike, origin: str) -> None:
    """BrokenImage unless `path` is a regular file with bytes in it, from one stat: a FIFO would block the reader,
    /dev/zero would never end, and Pillow would call an empty file merely unidentified."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise BrokenImage(origin, "no such file") from None
    except OSError as exc:
        raise BrokenImage(origin, f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise BrokenImage(origin, "a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise BrokenImage(origin, "not a regular file (a pipe, a device or a socket)")
    if info.st_size == 0:
        raise BrokenImage(origin, "empty file")


def probe_image(path: str | Path) -> tuple[int, tuple[int, int]]:
    """(channel count the image naturally has, (width, height)) without a full decode; BrokenImage on failure,
    as decoding it would fail: not a regular file, unreadable, or over MAX_PIXELS."""
    require_nonempty_file(path, str(path))
    try:
        with open_within_limit(path, str(path)) as img:
            mode, size = img.mode, img.size
    except (OSError, ValueError, SyntaxError) as exc:
        raise BrokenImage(str(path), f"not a readable image ({type(exc).__name__})") from None
    gray = mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
    return (1 if gray else 3), size
