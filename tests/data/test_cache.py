"""Tests for pollen.data.cache: the cache folder and the .npz cache of decoded arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from image_samples import image_folder, save
from PIL import Image

from pollen.data import decode
from pollen.data.cache import default_cache_dir
from pollen.data.load import load_dataset
from pollen.errors import PollenError


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real ~/.cache, even if a test forgets cache_dir."""
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "default-cache"))


def test_image_folder_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = image_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    first = load_dataset(root, cache_dir=cache)
    assert len(list((cache / "arrays").glob("*.npz"))) == 1
    assert not list((cache / "arrays").glob("*.tmp"))

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(decode.Image, "open", fail)
    second = load_dataset(root, cache_dir=cache)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert second.class_names == first.class_names

    # A new file changes the key: the folder is decoded again (here: with the failing open).
    save(Image.new("RGB", (4, 4)), root / "train/cat/d_new.png")
    with pytest.raises(PollenError, match="cannot be read"):
        load_dataset(root, cache_dir=cache)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "p"))
    assert default_cache_dir() == tmp_path / "p"
    monkeypatch.delenv("POLLEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pollen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pollen"
