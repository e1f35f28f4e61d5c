"""Decode image files and resize image arrays into ``uint8 (N, H, W, C)`` arrays.

Every image Pollen trains on or predicts from goes through here, so training images (from
an image folder or a resized CIFAR-10) and images given to ``pollen predict`` are decoded
the same way: EXIF orientation applied, any mode or bit depth turned into 8-bit RGB or
greyscale, and a bilinear resize to the requested size. Decoding runs on a few threads.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from pollen.data.dataset import check_channels, check_image_size
from pollen.errors import PollenError

__all__ = [
    "header_size",
    "MAX_IMAGE_PIXELS",
    "convert_arrays",
    "decode_bytes",
    "decode_files",
    "image_extensions",
    "load_images",
]

MAX_IMAGE_PIXELS = 40_000_000
"""Most pixels (width x height) of an image Pollen decodes: 40 megapixels, a 7,300 x 5,400
photo. An image's size is read from its header before anything is decoded, and a larger one
is refused (naming the file): a small file can claim a huge image (a 12,000 x 12,000 PNG of
a few kilobytes decodes to gigabytes). A JPEG is counted at the reduced size it is decoded
at (Pillow's draft mode), so a large photo still loads. Pillow's own, higher limit
(``DecompressionBombError``) is reported the same way."""


def load_images(
    paths: Sequence[str | Path],
    image_size: tuple[int, int] = (32, 32),
    channels: int = 3,
) -> np.ndarray:
    """Decode image files for prediction, the same way training images are decoded.

    Args:
        paths: Image files in any format and colour depth Pillow reads.
        image_size: ``(height, width)`` to resize to (bilinear). Default ``(32, 32)``.
        channels: 3 for RGB (default) or 1 for greyscale.

    Returns:
        ``uint8`` array of shape ``(len(paths), height, width, channels)``, in the order of
        ``paths``.

    Raises:
        PollenError: If a file does not exist or cannot be decoded as an image.
    """
    size = check_image_size(image_size)
    check_channels(channels)
    files = [Path(p).expanduser() for p in paths]
    for f in files:
        if not f.is_file():
            raise PollenError(
                f"The image file {f} does not exist (or is not a file). Check the path."
            )
    return decode_files(files, size, channels, progress_label=None)


def header_size(source: Path | bytes) -> tuple[int, int] | None:
    """``(height, width)`` of an image file or its bytes, from its header; ``None`` if unreadable.

    Only the header is read (Pillow opens lazily); nothing is decoded.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return (height, width) if height > 0 and width > 0 else None


def image_extensions() -> frozenset[str]:
    """Return the file extensions (lower case, with the dot) Pillow can open."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def decode_files(
    files: Sequence[Path], size: tuple[int, int], channels: int, progress_label: str | None
) -> np.ndarray:
    """Decode ``files`` into one array, in order.

    Args:
        files: Image files.
        size: ``(height, width)`` to resize to (bilinear).
        channels: 3 for RGB or 1 for greyscale.
        progress_label: Label of a progress bar on stderr, shown for 2000 files or more;
            ``None`` for no bar.

    Returns:
        ``uint8`` array of shape ``(len(files), height, width, channels)``.

    Raises:
        PollenError: If a file cannot be decoded as an image (naming the file).
    """
    out = np.empty((len(files), *size, channels), dtype=np.uint8)
    return _parallel_fill(
        out, lambda i: _decode_one(files[i], str(files[i]), size, channels), progress_label
    )


def decode_bytes(
    blobs: Sequence[bytes],
    names: Sequence[str],
    size: tuple[int, int],
    channels: int,
    progress_label: str | None,
) -> np.ndarray:
    """Decode images held in memory (for example archive entries) exactly as files are.

    Args:
        blobs: The encoded images (the bytes of a PNG, JPEG, ... file).
        names: What to call each image in an error, for example ``"train/cat/1.jpg in the
            archive data.zip"``; same length as ``blobs``.
        size: ``(height, width)`` to resize to (bilinear).
        channels: 3 for RGB or 1 for greyscale.
        progress_label: As for :func:`decode_files`.

    Returns:
        ``uint8`` array of shape ``(len(blobs), height, width, channels)``.

    Raises:
        PollenError: If an image cannot be decoded or has more than
            :data:`MAX_IMAGE_PIXELS` pixels (naming it).
    """
    out = np.empty((len(blobs), *size, channels), dtype=np.uint8)
    return _parallel_fill(
        out, lambda i: _decode_one(io.BytesIO(blobs[i]), names[i], size, channels), progress_label
    )


def convert_arrays(x: np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    """Resize/convert RGB images exactly as decoded files would be.

    Args:
        x: ``uint8`` images of shape ``(N, H, W, 3)``.
        size: ``(height, width)`` to resize to (bilinear).
        channels: 3 for RGB or 1 for greyscale.

    Returns:
        ``uint8`` array of shape ``(N, height, width, channels)``.
    """
    h, w = size

    def convert(i: int) -> np.ndarray:
        pil = Image.fromarray(x[i])
        if channels == 1:
            pil = pil.convert("L")
        if pil.size != (w, h):
            pil = pil.resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(pil, dtype=np.uint8).reshape(h, w, channels)

    out = np.empty((len(x), h, w, channels), dtype=np.uint8)
    return _parallel_fill(out, convert, "Resizing images")


def _to_pil_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow image (any mode or bit depth) to 8-bit RGB or L."""
    target = "RGB" if channels == 3 else "L"
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # 16/32-bit integer or float greyscale: scale to 8 bits rather than clip.
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16"):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif img.mode == "F" and top <= 1.0:
            arr = arr * 255.0
        elif top > 255.0:
            arr = arr / (65535.0 if top <= 65535.0 else top) * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif img.mode in ("P", "PA"):
        # Going through RGBA avoids Pillow's warning about palette transparency.
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    return img if img.mode == target else img.convert(target)


def _decode_one(
    source: Path | IO[bytes], path: str, size: tuple[int, int], channels: int
) -> np.ndarray:
    """Decode the image ``source`` (a file or bytes), called ``path`` in errors."""
    h, w = size
    try:
        with Image.open(source) as img:
            if img.format == "JPEG":
                side = max(w, h)  # the image may still be rotated by its EXIF orientation
                img.draft("RGB" if channels == 3 else "L", (side, side))  # cheap downscale
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise _too_large(path, f"{img.width} x {img.height} pixels")
            img = ImageOps.exif_transpose(img)
            img = _to_pil_mode(img, channels)
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except PollenError:
        raise
    except Image.DecompressionBombError:
        raise _too_large(path, "more pixels than Pillow allows") from None
    except Exception as exc:  # Pillow raises many types for bad files
        raise PollenError(
            f"The image file {path} cannot be read ({type(exc).__name__}: {exc}). It may be "
            "corrupt, truncated or not an image; delete or replace it and run again."
        ) from None
    return arr.reshape(h, w, channels)


def _too_large(path: str, size: str) -> PollenError:
    return PollenError(
        f"The image file {path} is too large to decode ({size}; Pollen decodes at most "
        f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, see pollen.data.decode.MAX_IMAGE_PIXELS): "
        "it may be a decompression bomb. Shrink it or remove it from the data and run again."
    )


def _parallel_fill(
    out: np.ndarray, item: Callable[[int], np.ndarray], progress_label: str | None
) -> np.ndarray:
    """Set ``out[i] = item(i)`` for every ``i``, on a few threads, and return ``out``.

    Pillow releases the GIL while decoding and resizing, so the threads do run in parallel.
    The first exception is re-raised at once, without waiting for the remaining items.
    """
    n = len(out)
    if n == 0:
        return out
    chunk = 256
    starts = range(0, n, chunk)

    def run(start: int) -> int:
        stop = min(start + chunk, n)
        for i in range(start, stop):
            out[i] = item(i)
        return stop - start

    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(starts))))
    try:
        futures = [pool.submit(run, s) for s in starts]
        if progress_label is not None and n >= 2000:
            # rich.progress is imported only when a bar is shown: it is slow to import, and
            # every client-app process loads its data through here.
            from rich.console import Console
            from rich.progress import Progress

            with Progress(console=Console(stderr=True), transient=True) as progress:
                task = progress.add_task(progress_label, total=n)
                for future in as_completed(futures):
                    progress.advance(task, future.result())
        else:
            for future in as_completed(futures):
                future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out
