"""Tests for pollen.data.load, on small generated fixtures (never the real CIFAR-10)."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pollen.data.load as data
from pollen.data.load import (
    CIFAR10_CLASSES,
    Dataset,
    default_cache_dir,
    describe,
    download_cifar10,
    load_dataset,
    load_images,
)
from pollen.errors import PollenError

ROWS = 20  # rows per fake CIFAR batch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real ~/.cache, even if a test forgets cache_dir."""
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "default-cache"))


# --------------------------------------------------------------------------------------------
# Fixtures: a fake CIFAR-10 and an image folder
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_batch(path: Path, rows: np.ndarray, labels: list[int], legacy: bool = False) -> None:
    blob = pickle.dumps({b"batch_label": b"fake", b"data": rows, b"labels": labels}, protocol=2)
    if legacy:  # as written by numpy < 2 (the real CIFAR-10 files)
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(blob)


class FakeCifar:
    """A tiny cifar-10-batches-py folder and its .tar.gz archive."""

    def __init__(self, root: Path) -> None:
        rng = np.random.default_rng(0)
        self.folder = root / "extracted" / "cifar-10-batches-py"
        self.folder.mkdir(parents=True)
        # A known HWC image whose CHW flattening goes in row 0 of batch 1.
        self.pattern = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        self.train_labels: list[int] = []
        for i in range(1, 6):
            rows = rng.integers(0, 256, (ROWS, 3072), dtype=np.uint8)
            if i == 1:
                rows[0] = self.pattern.transpose(2, 0, 1).reshape(-1)
            labels = [int(v) for v in rng.integers(0, 10, ROWS)]
            self.train_labels += labels
            _write_batch(self.folder / f"data_batch_{i}", rows, labels, legacy=i == 2)
        self.test_rows = rng.integers(0, 256, (ROWS, 3072), dtype=np.uint8)
        self.test_labels = [int(v) for v in rng.integers(0, 10, ROWS)]
        _write_batch(self.folder / "test_batch", self.test_rows, self.test_labels)
        names = [n.encode() for n in CIFAR10_CLASSES]
        meta = {b"label_names": names, b"num_cases_per_batch": ROWS}
        (self.folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))

        self.archive_dir = root / "archive"
        self.archive_dir.mkdir()
        self.archive = self.archive_dir / "cifar-10-python.tar.gz"
        with tarfile.open(self.archive, "w:gz") as tar:
            tar.add(self.folder, arcname="cifar-10-batches-py")
        self.sha256 = _sha256(self.archive)

    def check(self, ds: Dataset) -> None:
        assert ds.x_train.shape == (5 * ROWS, 32, 32, 3)
        assert ds.x_test.shape == (ROWS, 32, 32, 3)
        assert ds.x_train.dtype == np.uint8 and ds.x_test.dtype == np.uint8
        assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
        np.testing.assert_array_equal(ds.y_train, self.train_labels)
        np.testing.assert_array_equal(ds.y_test, self.test_labels)
        np.testing.assert_array_equal(ds.x_train[0], self.pattern)  # CHW -> HWC is right
        np.testing.assert_array_equal(
            ds.x_test[3, 5, 7], self.test_rows[3, [5 * 32 + 7 + c * 1024 for c in range(3)]]
        )
        assert ds.class_names == CIFAR10_CLASSES


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> FakeCifar:
    return FakeCifar(tmp_path_factory.mktemp("cifar"))


def _save(img: Image.Image, path: Path, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def _image_folder(root: Path) -> Path:
    """train/{cat,dog}/ and test/{cat,dog}/ with assorted sizes, modes and formats."""
    rng = np.random.default_rng(1)
    red = np.zeros((40, 40, 4), np.uint8)
    red[..., 0], red[..., 3] = 255, 128
    _save(Image.fromarray(red, "RGBA"), root / "train/cat/a_rgba.png")
    _save(Image.fromarray(np.full((20, 30), 200, np.uint8), "L"), root / "train/cat/b_grey.png")
    pal = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("P")
    _save(pal, root / "train/cat/c_palette.png")
    _save(
        Image.fromarray(np.full((48, 64, 3), (0, 0, 255), np.uint8)), root / "train/dog/a.jpg"
    )  # 64 wide, 48 high
    sixteen = Image.fromarray(np.full((10, 10), 40000, np.uint16))  # 16-bit greyscale
    _save(sixteen, root / "train/dog/b_16bit.png")
    _save(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), root / "train/dog/c.bmp")
    (root / "train/dog/notes.txt").write_text("not an image, ignored")
    (root / "train/dog/.DS_Store").write_bytes(b"\0\0")
    _save(Image.fromarray(np.full((32, 32, 3), 9, np.uint8)), root / "test/cat/x.png")
    _save(Image.fromarray(np.full((33, 31, 3), 250, np.uint8)), root / "test/dog/y.jpeg")
    _save(Image.fromarray(np.full((5, 5, 3), 1, np.uint8)), root / "test/dog/z.webp")
    return root


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------


def test_load_extracted_folder(cifar: FakeCifar, tmp_path: Path) -> None:
    cifar.check(load_dataset(cifar.folder, cache_dir=tmp_path))
    cifar.check(load_dataset(cifar.folder.parent, cache_dir=tmp_path))  # folder holding it


def test_load_archive_and_folder_with_archive(
    cifar: FakeCifar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cifar.check(load_dataset(cifar.archive, cache_dir=tmp_path / "a", sha256=cifar.sha256))
    monkeypatch.setattr(data, "CIFAR10_SHA256", cifar.sha256)
    cifar.check(load_dataset(cifar.archive_dir, cache_dir=tmp_path / "b"))
    assert sorted(p.name for p in cifar.archive_dir.iterdir()) == ["cifar-10-python.tar.gz"]


def test_archive_checksum_mismatch(cifar: FakeCifar, tmp_path: Path) -> None:
    with pytest.raises(PollenError, match="wrong SHA-256") as info:
        load_dataset(cifar.archive, cache_dir=tmp_path)  # the real CIFAR-10 hash
    assert cifar.sha256 in str(info.value) and data.CIFAR10_SHA256 in str(info.value)


def test_truncated_archive(cifar: FakeCifar, tmp_path: Path) -> None:
    blob = cifar.archive.read_bytes()
    for name in ("cifar-10-python.tar.gz", "other.tar.gz"):
        bad = tmp_path / name
        bad.write_bytes(blob[: len(blob) // 2])
        with pytest.raises(PollenError, match="truncated or corrupt"):
            load_dataset(bad, cache_dir=tmp_path / "cache", sha256=_sha256(bad))


def test_resize_and_greyscale_cifar(cifar: FakeCifar, tmp_path: Path) -> None:
    ds = load_dataset(cifar.folder, image_size=(16, 24), channels=1, cache_dir=tmp_path)
    assert ds.x_train.shape == (5 * ROWS, 16, 24, 1) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (ROWS, 16, 24, 1)


def test_cifar_incomplete_and_malicious(cifar: FakeCifar, tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes((cifar.folder / "data_batch_1").read_bytes())
    with pytest.raises(PollenError, match="data_batch_2 is missing"):
        load_dataset(folder, cache_dir=tmp_path / "c1")

    for f in cifar.folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "test_batch").write_bytes(pickle.dumps(print))  # not an array: refused
    with pytest.raises(PollenError, match="not a readable CIFAR-10 batch"):
        load_dataset(folder, cache_dir=tmp_path / "c2")


def test_download_file_url(cifar: FakeCifar, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    path = download_cifar10(cache, url=cifar.archive.as_uri(), sha256=cifar.sha256)
    assert path == cache / "cifar-10-python.tar.gz"
    assert _sha256(path) == cifar.sha256
    assert sorted(p.name for p in cache.iterdir()) == ["cifar-10-python.tar.gz"]
    assert "Downloading" in capsys.readouterr().err  # the progress bar went to stderr
    # load_dataset(None) now finds it in the cache without downloading again.
    cifar.check(load_dataset(cache_dir=cache, url="http://127.0.0.1:9/", sha256=cifar.sha256))


def test_load_dataset_downloads_when_missing(cifar: FakeCifar, tmp_path: Path) -> None:
    # Two loaders at once (like clients starting together) share one download.
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(
                lambda _: load_dataset(
                    "", cache_dir=tmp_path, url=cifar.archive.as_uri(), sha256=cifar.sha256
                ),
                range(2),
            )
        )
    for ds in results:
        cifar.check(ds)
    assert (tmp_path / "cifar-10-python.tar.gz").is_file()
    assert not (tmp_path / "cifar-10-python.tar.gz.part").exists()


def test_download_wrong_checksum(cifar: FakeCifar, tmp_path: Path) -> None:
    with pytest.raises(PollenError, match="wrong SHA-256") as info:
        download_cifar10(tmp_path, url=cifar.archive.as_uri(), sha256="0" * 64)
    assert cifar.sha256 in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no .part, no archive


def test_offline_without_data(tmp_path: Path) -> None:
    cache = tmp_path / "empty-cache"
    with pytest.raises(PollenError) as info:
        load_dataset(None, cache_dir=cache, url="http://127.0.0.1:9/cifar.tar.gz")
    msg = str(info.value)
    assert "could not be downloaded from http://127.0.0.1:9/cifar.tar.gz" in msg
    assert "--data-dir" in msg and "train/<class>" in msg
    assert str(cache / "cifar-10-python.tar.gz") in msg
    assert not (cache / "cifar-10-python.tar.gz.part").exists()

    with pytest.raises(PollenError, match="downloading is turned off"):
        load_dataset(None, cache_dir=cache, download=False)


# --------------------------------------------------------------------------------------------
# Image folders and load_images
# --------------------------------------------------------------------------------------------


def test_image_folder(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
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


def test_image_folder_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _image_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    first = load_dataset(root, cache_dir=cache)
    assert len(list((cache / "arrays").glob("*.npz"))) == 1
    assert not list((cache / "arrays").glob("*.tmp"))

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(data.Image, "open", fail)
    second = load_dataset(root, cache_dir=cache)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert second.class_names == first.class_names

    # A new file changes the key: the folder is decoded again (here: with the failing open).
    _save(Image.new("RGB", (4, 4)), root / "train/cat/d_new.png")
    with pytest.raises(PollenError, match="cannot be read"):
        load_dataset(root, cache_dir=cache)


def test_corrupt_image(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    (root / "train/dog/broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    with pytest.raises(PollenError, match="broken.jpg"):
        load_dataset(root, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npz"))


def test_image_folder_errors(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    _save(Image.new("RGB", (4, 4)), root / "test/bird/a.png")
    with pytest.raises(PollenError, match="bird"):
        load_dataset(root, cache_dir=cache)

    only_train = tmp_path / "only_train"
    _save(Image.new("RGB", (4, 4)), only_train / "train/a/x.png")
    with pytest.raises(PollenError, match="no test/ folder"):
        load_dataset(only_train, cache_dir=cache)

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(PollenError, match="has no images"):
        load_dataset(empty, cache_dir=cache)


def test_load_images(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images")
    files = [root / "train/cat/a_rgba.png", str(root / "train/dog/a.jpg")]
    x = load_images(files)
    assert x.shape == (2, 32, 32, 3) and x.dtype == np.uint8
    assert load_images(files, image_size=(10, 20), channels=1).shape == (2, 10, 20, 1)
    assert load_images([]).shape == (0, 32, 32, 3)
    with pytest.raises(PollenError, match="missing.png"):
        load_images([root / "missing.png"])


# --------------------------------------------------------------------------------------------
# Other errors and helpers
# --------------------------------------------------------------------------------------------


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


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "p"))
    assert default_cache_dir() == tmp_path / "p"
    monkeypatch.delenv("POLLEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pollen"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pollen"
