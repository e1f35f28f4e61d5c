"""Tests for pollen.data.image_folder: train/<class>/* and test/<class>/* folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from image_samples import image_folder, save
from PIL import Image

from pollen.data.load import describe, load_dataset
from pollen.errors import PollenError


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real ~/.cache, even if a test forgets cache_dir."""
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "default-cache"))


def test_image_folder(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images")
    ds = load_dataset(root, cache_dir=tmp_path / "cache")
    assert ds.class_names == ("cat", "dog")
    assert ds.x_train.shape == (6, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.y_test, [0, 1, 1])
    assert ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.x_train[0, 0, 0], [255, 0, 0])  # RGBA: alpha dropped
    np.testing.assert_array_equal(ds.x_train[1, 0, 0], [200, 200, 200])  # L -> RGB
    assert abs(int(ds.x_train[3, 16, 16, 2]) - 255) <= 3  # 64x48 JPEG, blue
    assert 150 <= int(ds.x_train[4, 0, 0, 0]) <= 160  # 16-bit 40000 scaled, not clipped
    assert ds.x_test[2].max() == 1  # tiny WebP upscaled

    grey = load_dataset(root, channels=1, image_size=(8, 12), cache_dir=tmp_path / "cache")
    assert grey.x_train.shape == (6, 8, 12, 1) and grey.x_test.shape == (3, 8, 12, 1)
    assert grey.x_train[1, 0, 0, 0] == 200
    assert describe(ds) == "6 train / 3 test images of 32x32x3, 2 classes: cat, dog"


def test_corrupt_image(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images")
    (root / "train/dog/broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    with pytest.raises(PollenError, match="broken.jpg"):
        load_dataset(root, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npz"))


def test_image_folder_errors(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    save(Image.new("RGB", (4, 4)), root / "test/bird/a.png")
    with pytest.raises(PollenError, match="bird"):
        load_dataset(root, cache_dir=cache)

    only_train = tmp_path / "only_train"
    save(Image.new("RGB", (4, 4)), only_train / "train/a/x.png")
    with pytest.raises(PollenError, match="no test/ folder"):
        load_dataset(only_train, cache_dir=cache)

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(PollenError, match="has no images"):
        load_dataset(empty, cache_dir=cache)


def test_links_that_lead_outside_the_image_folder_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "secret.png"
    save(Image.new("RGB", (4, 4), (1, 2, 3)), secret)
    root = image_folder(tmp_path / "images")
    cache = tmp_path / "cache"

    link = root / "train/cat/z_link.png"
    link.symlink_to(secret)
    with pytest.raises(PollenError, match="leads outside the data folder") as info:
        load_dataset(root, cache_dir=cache)
    assert str(link) in str(info.value) and str(secret) in str(info.value)

    link.unlink()  # a class folder that is a link to a folder outside
    (root / "train/bird").symlink_to(secret.parent, target_is_directory=True)
    with pytest.raises(PollenError, match="train/bird is a link that leads outside"):
        load_dataset(root, cache_dir=cache)

    # A link to another file of the folder is fine, and so is a data folder that is a link.
    (root / "train/bird").unlink()
    (root / "train/cat/z_link.png").symlink_to(root / "train/cat/a_rgba.png")
    (tmp_path / "images-link").symlink_to(root, target_is_directory=True)
    ds = load_dataset(tmp_path / "images-link", cache_dir=cache)
    assert ds.x_train.shape == (7, 32, 32, 3)


def test_a_class_with_one_training_image_is_refused(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "images")
    save(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), root / "train/owl/only.png")
    with pytest.raises(PollenError, match="owl in .*train have a single training image") as info:
        load_dataset(root, cache_dir=tmp_path / "cache")
    assert "at least 2" in str(info.value) and "\n" not in str(info.value)


def test_a_class_without_test_images_is_named_in_a_warning(tmp_path: Path, caplog) -> None:
    import logging

    root = image_folder(tmp_path / "images")
    for name in ("a.png", "b.png"):
        save(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), root / "train/owl" / name)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(root, cache_dir=tmp_path / "cache")
    assert ds.class_names == ("cat", "dog", "owl") and 2 not in ds.y_test
    assert f"owl of {root / 'train'} have no test images in {root / 'test'}" in caplog.text
