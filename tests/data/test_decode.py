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
