"""Tests for pollen.data.cifar10 (download, archive, extracted folder), on small generated
fixtures (never the real CIFAR-10)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pollen.data import cifar10
from pollen.data.cifar10 import CIFAR10_CLASSES, download_cifar10
from pollen.data.dataset import Dataset
from pollen.data.load import load_dataset
from pollen.errors import PollenError

ROWS = 20  # rows per fake CIFAR batch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real ~/.cache, even if a test forgets cache_dir."""
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "default-cache"))


# --------------------------------------------------------------------------------------------
# Fixture: a fake CIFAR-10
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
    monkeypatch.setattr(cifar10, "CIFAR10_SHA256", cifar.sha256)
    cifar.check(load_dataset(cifar.archive_dir, cache_dir=tmp_path / "b"))
    assert sorted(p.name for p in cifar.archive_dir.iterdir()) == ["cifar-10-python.tar.gz"]


def test_archive_checksum_mismatch(cifar: FakeCifar, tmp_path: Path) -> None:
    with pytest.raises(PollenError, match="wrong SHA-256") as info:
        load_dataset(cifar.archive, cache_dir=tmp_path)  # the real CIFAR-10 hash
    assert cifar.sha256 in str(info.value) and cifar10.CIFAR10_SHA256 in str(info.value)


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
# Hostile archives and folders
# --------------------------------------------------------------------------------------------


def _tar_with(path: Path, cifar: FakeCifar, extra: list[tuple[tarfile.TarInfo, bytes | None]]):
    """The fake CIFAR-10 archive with ``extra`` entries first."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        tar.add(cifar.folder, arcname="cifar-10-batches-py")
    return path


def _gzip_bomb(path: Path, info: tarfile.TarInfo) -> Path:
    """A .tar.gz of one entry ``info`` of zeros, ``info.size`` bytes inflated, ~1/1000 on disk.

    Made quickly: gzip members concatenated (which gzip readers read as one stream), one
    compressed mebibyte of zeros repeated.
    """
    block = gzip.compress(bytes(1 << 20))
    with open(path, "wb") as out:
        out.write(gzip.compress(info.tobuf(format=tarfile.GNU_FORMAT)))
        for _ in range(info.size >> 20):
            out.write(block)
    return path


def test_an_archive_entry_that_inflates_to_a_gigabyte_is_refused_unread(
    cifar: FakeCifar, tmp_path: Path
) -> None:
    from pollen.data.cifar10 import MAX_BATCH_FILE_BYTES

    info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    info.size = 1 << 30
    bomb = _gzip_bomb(tmp_path / "bomb.tar.gz", info)
    assert bomb.stat().st_size < 2 << 20 and info.size > MAX_BATCH_FILE_BYTES

    read = [0]
    real_read = gzip.GzipFile.read

    def counting_read(self, n=-1):
        data = real_read(self, n)
        read[0] += len(data)
        return data

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gzip.GzipFile, "read", counting_read)
        with pytest.raises(PollenError, match="larger than any CIFAR-10 batch file") as err:
            load_dataset(bomb, cache_dir=tmp_path / "cache")
    assert "data_batch_1 in the archive" in str(err.value) and str(bomb) in str(err.value)
    assert read[0] < 1 << 20, f"{read[0]} bytes inflated"


def test_an_archive_header_that_claims_a_gigabyte_is_refused(
    cifar: FakeCifar, tmp_path: Path
) -> None:
    """Python's tarfile reads a long-name header whole, whatever size it claims."""
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 1 << 30
    bomb = _gzip_bomb(tmp_path / "longname.tar.gz", info)
    with pytest.raises(PollenError, match="larger than any CIFAR-10 batch file"):
        load_dataset(bomb, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("name", ["../evil/data_batch_1", "/etc/data_batch_1", "a/../../x"])
def test_an_archive_entry_that_leads_outside_is_refused(
    cifar: FakeCifar, tmp_path: Path, name: str
) -> None:
    info = tarfile.TarInfo(name)
    info.size = 3
    archive = _tar_with(tmp_path / "evil.tar.gz", cifar, [(info, b"abc")])
    with pytest.raises(PollenError, match="leads outside the archive's folder") as err:
        load_dataset(archive, cache_dir=tmp_path / "cache")
    assert repr(name) in str(err.value) and str(archive) in str(err.value)


def test_an_archive_batch_file_that_is_a_link_is_refused(cifar: FakeCifar, tmp_path: Path) -> None:
    info = tarfile.TarInfo("x/data_batch_1")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _tar_with(tmp_path / "link.tar", cifar, [(info, None)])
    with pytest.raises(PollenError, match="is a link, not a file"):
        load_dataset(archive, cache_dir=tmp_path / "cache")


def test_an_extracted_folder_with_a_link_out_or_a_huge_file_is_refused(
    cifar: FakeCifar, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(cifar.folder, folder)
    (folder / "data_batch_3").unlink()
    (folder / "data_batch_3").symlink_to(cifar.folder / "data_batch_3")
    with pytest.raises(PollenError, match="leads outside the data folder"):
        load_dataset(folder, cache_dir=tmp_path / "cache")

    (folder / "data_batch_3").unlink()
    shutil.copy(cifar.folder / "data_batch_3", folder / "data_batch_3")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cifar10, "MAX_BATCH_FILE_BYTES", 1000)
        with pytest.raises(PollenError, match="larger than any CIFAR-10 batch file"):
            load_dataset(folder, cache_dir=tmp_path / "cache2")
    cifar.check(load_dataset(folder, cache_dir=tmp_path / "cache3"))
