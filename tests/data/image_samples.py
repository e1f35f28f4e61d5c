"""Small generated image folders shared by the tests of pollen.data (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def save(img: Image.Image, path: Path, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def image_folder(root: Path) -> Path:
    """train/{cat,dog}/ and test/{cat,dog}/ with assorted sizes, modes and formats."""
    rng = np.random.default_rng(1)
    red = np.zeros((40, 40, 4), np.uint8)
    red[..., 0], red[..., 3] = 255, 128
    save(Image.fromarray(red, "RGBA"), root / "train/cat/a_rgba.png")
    save(Image.fromarray(np.full((20, 30), 200, np.uint8), "L"), root / "train/cat/b_grey.png")
    pal = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("P")
    save(pal, root / "train/cat/c_palette.png")
    save(
        Image.fromarray(np.full((48, 64, 3), (0, 0, 255), np.uint8)), root / "train/dog/a.jpg"
    )  # 64 wide, 48 high
    sixteen = Image.fromarray(np.full((10, 10), 40000, np.uint16))  # 16-bit greyscale
    save(sixteen, root / "train/dog/b_16bit.png")
    save(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), root / "train/dog/c.bmp")
    (root / "train/dog/notes.txt").write_text("not an image, ignored")
    (root / "train/dog/.DS_Store").write_bytes(b"\0\0")
    save(Image.fromarray(np.full((32, 32, 3), 9, np.uint8)), root / "test/cat/x.png")
    save(Image.fromarray(np.full((33, 31, 3), 250, np.uint8)), root / "test/dog/y.jpeg")
    save(Image.fromarray(np.full((5, 5, 3), 1, np.uint8)), root / "test/dog/z.webp")
    return root
