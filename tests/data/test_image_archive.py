"""Tests for pollen.data.image_archive: image folders packed as .tar, .tar.gz, .tgz, .zip."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pollen.data import cifar10, image_archive
from pollen.data.load import _pick_source, load_dataset
from pollen.errors import PollenError
from tests.data.image_samples import image_folder
from tests.data.test_cifar10 import FakeCifar


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the real ~/.cache, even if a test forgets cache_dir."""
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "default-cache"))


def _pack(folder: Path, archive: Path, top: str | None) -> Path:
    """Pack ``folder``'s contents into ``archive`` (by suffix), under ``top`` or at the root."""
    files = sorted(p for p in folder.rglob("*"))
    arc = {p: (f"{top}/" if top else "") + p.relative_to(folder).as_posix() for p in files}
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, arc[p])
    else:
        mode = "w:gz" if archive.name.endswith(("gz", ".tgz")) else "w"
        with tarfile.open(archive, mode) as tar:
            for p in files:
                tar.add(p, arc[p], recursive=False)
    return archive


def _add_tar(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz", ".zip"])
@pytest.mark.parametrize("top", [None, "pictures"])
def test_archive_loads_like_its_folder(tmp_path: Path, suffix: str, top: str | None) -> None:
    folder = image_folder(tmp_path / "folder")
    archive = _pack(folder, tmp_path / f"data{suffix}", top)
    expected = load_dataset(folder, image_size=(16, 16), cache_dir=tmp_path / "c1")
    ds = load_dataset(archive, image_size=(16, 16), cache_dir=tmp_path / "c2")
    assert ds.class_names == expected.class_names == ("cat", "dog")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(ds, name), getattr(expected, name))
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    grey = load_dataset(archive, image_size=(8, 8), channels=1, cache_dir=tmp_path / "c2")
    assert grey.x_train.shape == (6, 8, 8, 1)


def test_archive_is_cached_by_its_signature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = _pack(image_folder(tmp_path / "folder"), tmp_path / "data.tgz", "top")
    first = load_dataset(archive, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "arrays").glob("image-archive-*.npz"))

    def fail(*args: object) -> None:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(image_archive, "_read_entries", fail)
    again = load_dataset(archive, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.x_train, first.x_train)


def test_missing_test_class_and_split(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "folder")
    (folder / "test/bird").mkdir()
    (folder / "test/bird/x.png").write_bytes((folder / "test/cat/x.png").read_bytes())
    archive = _pack(folder, tmp_path / "data.zip", None)
    with pytest.raises(PollenError, match="class folder\\(s\\) bird") as info:
        load_dataset(archive, cache_dir=tmp_path)
    assert "data.zip/test" in str(info.value) and "\n" not in str(info.value)

    only_train = tmp_path / "train-only"
    (only_train / "train/cat").mkdir(parents=True)
    (only_train / "train/cat/a.png").write_bytes((folder / "test/cat/x.png").read_bytes())
    with pytest.raises(PollenError, match="no test/ folder"):
        load_dataset(_pack(only_train, tmp_path / "t.tar", "top"), cache_dir=tmp_path)


def test_unreadable_member_is_named(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "folder")
    (folder / "train/cat/broken.png").write_bytes(b"not a png")
    for suffix in (".tar.gz", ".zip"):
        archive = _pack(folder, tmp_path / f"data{suffix}", "top")
        with pytest.raises(PollenError, match="cannot be read") as info:
            load_dataset(archive, cache_dir=tmp_path)
        assert f"top/train/cat/broken.png in the archive {archive}" in str(info.value)


def test_entry_leading_out_is_refused(tmp_path: Path) -> None:
    png = (image_folder(tmp_path / "folder") / "test/cat/x.png").read_bytes()
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("train/cat/a.png", "test/cat/a.png", "../evil.jpg"):
            _add_tar(tar, name, png)
    with pytest.raises(PollenError, match="leads outside the archive's folder") as info:
        load_dataset(archive, cache_dir=tmp_path)
    assert "../evil.jpg" in str(info.value)

    zipped = tmp_path / "evil.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("train/cat/a.png", png)
        zf.writestr("test/cat/a.png", png)
        zf.writestr("../evil.jpg", png)
    with pytest.raises(PollenError, match="leads outside the archive's folder"):
        load_dataset(zipped, cache_dir=tmp_path)


def test_link_member_is_refused(tmp_path: Path) -> None:
    png = (image_folder(tmp_path / "folder") / "test/cat/x.png").read_bytes()
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _add_tar(tar, "top/train/cat/a.png", png)
        _add_tar(tar, "top/train/cat/b.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add_tar(tar, "top/test/cat/a.png", png)
    with pytest.raises(PollenError, match="is a link") as info:
        load_dataset(archive, cache_dir=tmp_path)
    assert "top/train/cat/b.png" in str(info.value)

    zipped = tmp_path / "links.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("train/cat/a.png", png)
        link = zipfile.ZipInfo("train/cat/b.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        zf.writestr("test/cat/a.png", png)
    with pytest.raises(PollenError, match="is a link"):
        load_dataset(zipped, cache_dir=tmp_path)


def test_member_over_the_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = image_folder(tmp_path / "folder")
    archive = _pack(folder, tmp_path / "data.zip", None)
    monkeypatch.setattr(image_archive, "MAX_BATCH_FILE_BYTES", 100)
    with pytest.raises(PollenError, match="larger than Pollen reads from an image archive"):
        load_dataset(archive, cache_dir=tmp_path)


def test_archive_without_train_and_test(tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "images/cat").mkdir(parents=True)
    (other / "images/cat/a.png").write_bytes(b"x")
    with pytest.raises(PollenError, match="holds no train/ or test/ folder") as info:
        load_dataset(_pack(other, tmp_path / "other.zip", None), cache_dir=tmp_path)
    assert "Pollen accepts:" in str(info.value)
    with pytest.raises(PollenError, match="does not contain CIFAR-10"):  # a tar: not claimed
        load_dataset(_pack(other, tmp_path / "other.tar.gz", None), cache_dir=tmp_path)

    two = tmp_path / "two"
    for top in ("a", "b"):
        (two / top / "train/cat").mkdir(parents=True)
        (two / top / "test/cat").mkdir(parents=True)
    with pytest.raises(
        PollenError, match="several top folders with train/ or test/ inside \\(a, b\\)"
    ):
        load_dataset(_pack(two, tmp_path / "two.zip", None), cache_dir=tmp_path)


def test_cifar10_archive_is_still_claimed_by_cifar(tmp_path: Path) -> None:
    fake = FakeCifar(tmp_path)
    assert _pick_source(fake.archive)[0] is cifar10.ARCHIVE
    plain = tmp_path / "cifar.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(fake.folder, arcname="cifar-10-batches-py")
    assert _pick_source(plain)[0] is cifar10.ARCHIVE
    fake.check(load_dataset(fake.archive, sha256=fake.sha256, cache_dir=tmp_path / "cache"))
