"""``image-size = "auto"`` never upsamples past the images' own size (the header probe)."""

from __future__ import annotations

import csv
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pollen.config import auto_image_size
from pollen.data.load import native_image_size


def _folder(root: Path, height: int, width: int) -> Path:
    """A 2-class image folder of ``height x width`` PNGs, 2 train + 1 test per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 1)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_folder_archive_and_manifest_report_the_first_training_image(tmp_path):
    folder = _folder(tmp_path / "data", 40, 56)
    assert native_image_size(folder) == (40, 56)

    tgz = tmp_path / "data.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname="data")
    assert native_image_size(tgz) == (40, 56)

    zipped = tmp_path / "data.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, path.relative_to(folder).as_posix())
    assert native_image_size(zipped) == (40, 56)

    manifest = folder / "labels.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for path in sorted(folder.rglob("*.png")):
            rel = path.relative_to(folder)
            writer.writerow([rel.as_posix(), rel.parts[1], rel.parts[0]])
    assert native_image_size(manifest) == (40, 56)


def test_unreadable_data_gives_no_size_and_no_error(tmp_path):
    assert native_image_size(tmp_path / "missing") is None
    broken = tmp_path / "broken.zip"  # (any tar file counts as CIFAR-10 until loaded)
    broken.write_bytes(b"not a tar")
    assert native_image_size(broken) is None
    assert native_image_size("") == (32, 32)  # CIFAR-10


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(40, 56, 40), (300, 200, 96), (16, 16, 32), (32, 32, 32)],
)
def test_auto_size_is_the_models_but_not_above_the_images(tmp_path, height, width, expected):
    folder = _folder(tmp_path / "data", height, width)
    assert auto_image_size("mobilenetv2", str(folder)) == (expected, expected)
    assert auto_image_size("cnn", str(folder)) == (32, 32)
