"""Tests for pollen.data.load: picking the source of a data path, and describe."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pollen.data.load import layouts_help, load_dataset
from pollen.errors import PollenError


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real ~/.cache, even if a test forgets cache_dir."""
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "default-cache"))


def test_bad_paths_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(PollenError, match="does not exist"):
        load_dataset(tmp_path / "nowhere", cache_dir=tmp_path)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "readme.md").write_text("hi")
    (odd / "images").mkdir()
    with pytest.raises(PollenError, match="readme.md") as info:
        load_dataset(odd, cache_dir=tmp_path)
    assert "train/<class>" in str(info.value) and "cifar-10-batches-py" in str(info.value)
    with pytest.raises(PollenError, match="not a CIFAR-10 tar archive"):
        load_dataset(odd / "readme.md", cache_dir=tmp_path)
    with pytest.raises(PollenError, match="channels"):
        load_dataset(odd, channels=4, cache_dir=tmp_path)
    with pytest.raises(PollenError, match="image size"):
        load_dataset(odd, image_size=(0, 32), cache_dir=tmp_path)


def test_layouts_help_follows_sources() -> None:
    assert layouts_help() == (
        "Pollen accepts: (1) nothing, to use CIFAR-10 from the cache folder (downloaded on "
        "first use); (2) a .tar, .tar.gz, .tgz or .zip archive of an image folder, with "
        "train/<class>/<images> and test/<class>/<images> at its root or under one top "
        "folder; (3) the CIFAR-10 archive cifar-10-python.tar.gz or a folder containing "
        "it; (4) its extracted cifar-10-batches-py/ folder (data_batch_1..5, test_batch, "
        "batches.meta) or a folder containing it; (5) an image folder with "
        "train/<class>/<images> and test/<class>/<images>, where each subfolder name is a "
        "class name."
    )


def test_folder_holding_an_archive_is_only_a_fallback(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / split / "cat" / "x.png")
    (root / "cifar-10-python.tar.gz").write_bytes(b"not read: the image folder wins")
    ds = load_dataset(root, cache_dir=tmp_path / "cache")
    assert ds.class_names == ("cat",) and ds.x_train.shape == (1, 32, 32, 3)

    (tmp_path / "holder").mkdir()
    (tmp_path / "holder" / "cifar-10-python.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(PollenError, match="wrong SHA-256"):  # the archive is what was picked
        load_dataset(tmp_path / "holder", cache_dir=tmp_path / "cache")
