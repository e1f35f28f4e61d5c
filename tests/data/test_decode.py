"""Tests for pollen.data.decode: decoding image files for prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from image_samples import image_folder

from pollen.data.decode import load_images
from pollen.errors import PollenError


def test_load_images(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images")
    files = [root / "train/cat/a_rgba.png", str(root / "train/dog/a.jpg")]
    x = load_images(files)
    assert x.shape == (2, 32, 32, 3) and x.dtype == np.uint8
    assert load_images(files, image_size=(10, 20), channels=1).shape == (2, 10, 20, 1)
    assert load_images([]).shape == (0, 32, 32, 3)
    with pytest.raises(PollenError, match="missing.png"):
        load_images([root / "missing.png"])


def _huge_png(path: Path, side: int = 12_000) -> Path:
    """A valid 1-bit PNG of ``side`` x ``side`` pixels, a few kilobytes on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte, then the row's bits
    pack = zlib.compressobj(9)
    idat = b"".join(pack.compress(row) for _ in range(side)) + pack.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def test_an_image_of_too_many_pixels_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    import time
    import warnings

    from PIL import Image

    from pollen.data.decode import MAX_IMAGE_PIXELS

    bomb = _huge_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000 and 12_000**2 > MAX_IMAGE_PIXELS
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(PollenError, match="too large to decode") as info:
            load_images([bomb])
    assert time.monotonic() - start < 1.0  # its header was read, not its 144 megapixels
    message = str(info.value)
    assert str(bomb) in message and "12000 x 12000 pixels" in message and "\n" not in message

    # Beyond Pillow's own limit (DecompressionBombError), the same one paragraph.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(PollenError, match="too large to decode") as info:
            load_images([_huge_png(tmp_path / "bigger.png", 20_000)])
    assert "bigger.png" in str(info.value)


def test_a_large_jpeg_is_counted_at_the_size_it_is_decoded_at(tmp_path: Path) -> None:
    from PIL import Image

    photo = tmp_path / "photo.jpg"  # 9000 x 5000: 45 megapixels, decoded at 1/8 of that
    Image.new("RGB", (9000, 5000), (10, 200, 30)).save(photo, quality=50)
    x = load_images([photo])
    assert x.shape == (1, 32, 32, 3) and abs(int(x[0, 16, 16, 1]) - 200) <= 4
