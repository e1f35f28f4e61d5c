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
    with pytest.raises(PollenError, match="not a .csv manifest or a CIFAR-10 tar archive"):
        load_dataset(odd / "readme.md", cache_dir=tmp_path)
    with pytest.raises(PollenError, match="channels"):
        load_dataset(odd, channels=4, cache_dir=tmp_path)
    with pytest.raises(PollenError, match="image size"):
        load_dataset(odd, image_size=(0, 32), cache_dir=tmp_path)


def test_layouts_help_follows_sources() -> None:
    assert layouts_help() == (
        "Pollen accepts: (1) nothing, to use CIFAR-10 from the cache folder (downloaded on "
        "first use); (2) a CSV manifest: a .csv file with the columns path,label,split "
        "(split: train or test), or a folder with train.csv and test.csv (columns "
        "path,label), image paths relative to the CSV file's folder; (3) a .tar, .tar.gz, "
        ".tgz or .zip archive of an image folder, with "
        "train/<class>/<images> and test/<class>/<images> at its root or under one top "
        "folder; (4) the CIFAR-10 archive cifar-10-python.tar.gz or a folder containing "
        "it; (5) its extracted cifar-10-batches-py/ folder (data_batch_1..5, test_batch, "
        "batches.meta) or a folder containing it; (6) an image folder with "
        "train/<class>/<images> and test/<class>/<images>, where each subfolder name is a "
        "class name."
    )


def test_folder_holding_an_archive_is_only_a_fallback(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / split / "cat" / "x.png")
    Image.new("RGB", (4, 4)).save(root / "train" / "cat" / "y.png")
    (root / "cifar-10-python.tar.gz").write_bytes(b"not read: the image folder wins")
    ds = load_dataset(root, cache_dir=tmp_path / "cache")
    assert ds.class_names == ("cat",) and ds.x_train.shape == (2, 32, 32, 3)

    (tmp_path / "holder").mkdir()
    (tmp_path / "holder" / "cifar-10-python.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(PollenError, match="wrong SHA-256"):  # the archive is what was picked
        load_dataset(tmp_path / "holder", cache_dir=tmp_path / "cache")


def test_is_cifar10_tells_cifar10_from_other_data_without_decoding(tmp_path: Path) -> None:
    from pollen.data.load import is_cifar10

    assert is_cifar10(None) and is_cifar10("") and is_cifar10("  ")
    assert not is_cifar10(tmp_path / "nowhere")  # load_dataset reports it, not this
    batches = tmp_path / "c" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (batches / name).write_bytes(b"")
    assert is_cifar10(batches) and is_cifar10(tmp_path / "c")
    (tmp_path / "images/train/cat").mkdir(parents=True)
    (tmp_path / "images/test/cat").mkdir(parents=True)
    assert not is_cifar10(tmp_path / "images")
    (tmp_path / "m.csv").write_text("path,label,split\n")
    assert not is_cifar10(tmp_path / "m.csv")
