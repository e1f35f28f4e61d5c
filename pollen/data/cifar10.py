"""CIFAR-10 (python version): download, the archive, and its extracted folder.

Three sources, listed in :data:`pollen.data.load.SOURCES`:

* :data:`DEFAULT`: no data given; the archive in the cache folder, downloaded on first use
  by :func:`download_cifar10` (with a progress bar, checked against its SHA-256, and
  shared between processes that start together);
* :data:`ARCHIVE`: the archive ``cifar-10-python.tar.gz`` (any tar file), or a folder holding
  it. It is read member by member straight from the tar stream: nothing is ever extracted,
  least of all into the user's data folder. A file with the official name is checked
  against its SHA-256 first;
* :data:`FOLDER`: its extracted ``cifar-10-batches-py/`` folder, or a folder holding that.

The batch files are pickles; they are read with an unpickler that only rebuilds numpy
arrays, so a stray pickle cannot run code. Images are ``uint8 (N, 32, 32, 3)``, resized or
turned grey only when asked (see :func:`pollen.data.decode.convert_arrays`), and cached as
``.npz`` (see :mod:`pollen.data.cache`).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import http.client
import importlib.util
import io
import lzma
import os
import pickle
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from pollen.data.cache import cache_file, cached, file_signature, make_cache_dir
from pollen.data.dataset import Dataset, LayoutError, LoadOptions, Source
from pollen.data.decode import convert_arrays
from pollen.errors import PollenError
from pollen.files import file_lock

__all__ = [
    "ARCHIVE",
    "BoundedReads",
    "CIFAR10_ARCHIVE",
    "CIFAR10_CLASSES",
    "CIFAR10_FOLDER",
    "CIFAR10_SHA256",
    "CIFAR10_URL",
    "DEFAULT",
    "FOLDER",
    "check_member_path",
    "download_cifar10",
    "open_decompressed",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
"""Where :func:`download_cifar10` fetches the CIFAR-10 archive from by default."""

CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
"""SHA-256 of the official ``cifar-10-python.tar.gz``."""

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""CIFAR-10 class names, in label order (used when ``batches.meta`` is absent)."""

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
"""File name of the official CIFAR-10 archive (the archive is checked against
:data:`CIFAR10_SHA256` whenever it has this name)."""

CIFAR10_FOLDER = "cifar-10-batches-py"
"""Name of the folder inside the archive."""

_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_CIFAR_META = "batches.meta"
_CIFAR_SIZE = (32, 32)

_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 30.0

MAX_BATCH_FILE_BYTES = 64 << 20
"""Largest CIFAR-10 batch file read, in bytes, from the archive or the extracted folder
(each of the official ones is 30 MiB). A larger one is refused before it is read: a small
compressed archive can hold a member of gigabytes. Reads from the archive's stream are
bounded by it too (a tar header may claim a long name or extended header of any size)."""

MAX_ARCHIVE_MEMBERS = 10_000
"""Most entries of a tar archive read (the CIFAR-10 archive has 8): Python's tarfile keeps
every entry it passes, so an archive of millions of empty entries would fill memory."""


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------


def download_cifar10(
    cache_dir: Path,
    *,
    url: str = CIFAR10_URL,
    sha256: str = CIFAR10_SHA256,
) -> Path:
    """Download the CIFAR-10 archive into ``cache_dir`` and verify its SHA-256.

    The file is written to ``cache_dir/cifar-10-python.tar.gz.part`` with a progress bar
    (bytes, speed, time left) on stderr, checked, and only then renamed to
    ``cache_dir/cifar-10-python.tar.gz``, so an interrupted download never leaves a
    half-written archive under the final name. Any ``urllib`` URL works, ``file://`` too.

    Args:
        cache_dir: Folder to download into (created if missing).
        url: Where to download from. Default :data:`CIFAR10_URL`.
        sha256: Expected SHA-256 (hex) of the archive. Default :data:`CIFAR10_SHA256`.

    Returns:
        The path of the downloaded archive.

    Raises:
        PollenError: If the download fails (no network, HTTP error, timeout), the folder
            cannot be written, or the checksum does not match; the partial file is removed.
    """
    cache_dir = Path(cache_dir).expanduser()
    make_cache_dir(cache_dir)
    final = cache_dir / CIFAR10_ARCHIVE
    part = cache_dir / (CIFAR10_ARCHIVE + ".part")
    digest = hashlib.sha256()
    if urllib.parse.urlsplit(url).scheme not in ("https", "http", "file"):
        raise _DownloadFailedError(url, "only http(s) and file (a local mirror) URLs are read")
    try:
        # Waived B310: the URL is the user's own (default: the official https archive) and
        # its scheme is checked just above: http(s), or file for a local mirror.
        response = urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S)  # nosec B310
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # URLError, HTTPError, refused connections and timeouts are all OSErrors; a malformed
        # or unsupported URL is a ValueError.
        raise _DownloadFailedError(url, _reason(exc)) from None
    try:
        with response, open(part, "wb") as out, _download_progress() as progress:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            task = progress.add_task(f"Downloading {CIFAR10_ARCHIVE}", total=total)
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:  # dropped connection
                    raise _DownloadFailedError(url, _reason(exc)) from None
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                progress.update(task, advance=len(chunk))
    except OSError as exc:  # could not create or write the .part file
        part.unlink(missing_ok=True)
        raise PollenError(
            f"Could not write the download to {part}: {exc.strerror or exc}. Make sure the "
            "cache folder is writable and has about 200 MB free, or choose another one with "
            "--cache-dir or the POLLEN_CACHE_DIR environment variable."
        ) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise

    got = digest.hexdigest()
    if got.lower() != sha256.lower():
        part.unlink(missing_ok=True)
        raise PollenError(
            f"The file downloaded from {url} has the wrong SHA-256 checksum (expected {sha256}, "
            f"got {got}), so it was deleted. The download was probably corrupted or the server "
            "returned something else (a proxy or login page, for example); run again to retry, "
            f"or download {CIFAR10_ARCHIVE} yourself and pass it with --data-dir."
        )
    os.replace(part, final)
    return final


class _DownloadFailedError(PollenError):
    """The network part of a download failed (offline, refused, timeout, HTTP error)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"Could not download {url} ({reason}). Check the network connection and try "
            f"again, or download the file yourself and pass it with --data-dir."
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    if isinstance(exc, TimeoutError):
        return f"no answer within {_DOWNLOAD_TIMEOUT_S:.0f} s"
    return str(exc) or type(exc).__name__


def _download_progress() -> Any:
    # rich.progress is imported only for a download: it is slow to import, and every
    # client-app process imports this module.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _ensure_archive(cache: Path, options: LoadOptions) -> Path:
    """Return ``cache/cifar-10-python.tar.gz``, downloading it first if it is missing."""
    archive = cache / CIFAR10_ARCHIVE
    if archive.is_file():
        return archive
    if not options.download:
        raise PollenError(
            f"No data given and the CIFAR-10 archive is not in the cache ({archive}), "
            "and downloading is turned off. Pass --data-dir pointing at the archive "
            f"{CIFAR10_ARCHIVE}, its extracted {CIFAR10_FOLDER}/ folder, or an image "
            "folder with train/<class>/* and test/<class>/*; or put the archive at "
            f"{archive}; or allow the download."
        )
    make_cache_dir(cache)
    # Several clients may start at once: one downloads, the others wait for it.
    with file_lock(
        cache / (CIFAR10_ARCHIVE + ".lock"),
        waiting=f"Waiting for another process to finish downloading into {cache}",
    ):
        if not archive.is_file():
            try:
                download_cifar10(cache, url=options.url, sha256=options.sha256)
            except _DownloadFailedError as exc:
                raise PollenError(
                    f"CIFAR-10 could not be downloaded from {options.url} ({exc.reason}). If "
                    "this machine is offline, provide the data yourself: pass "
                    f"--data-dir pointing at the archive {CIFAR10_ARCHIVE}, at its "
                    f"extracted {CIFAR10_FOLDER}/ folder, or at an image folder with "
                    "train/<class>/* and test/<class>/*; or copy the archive to "
                    f"{archive} and run again."
                ) from None
    return archive


# --------------------------------------------------------------------------------------------
# Batch files (pickles)
# --------------------------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a stray pickle cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
    # numpy >= 2 keeps these in numpy._core (numpy.core is a deprecated alias); 1.x in core.
    _CORE = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"

    def find_class(self, module: str, name: str) -> Any:
        for prefix in ("numpy._core.", "numpy.core."):
            if module.startswith(prefix):
                module = "numpy.core." + module[len(prefix) :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module.startswith("numpy.core."):
            module = self._CORE + module[len("numpy.core") :]
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[bytes, Any]:
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise PollenError(
            f"{where} is not a readable CIFAR-10 batch file ({exc}). The data is corrupt or "
            "not CIFAR-10 (python version); delete it and download the archive again."
        ) from None
    if not isinstance(obj, dict):
        raise PollenError(f"{where} is not a CIFAR-10 batch file (it holds no dictionary).")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, 32, 32, 3), labels int64 (N,))`` from one batch pickle."""
    batch = _unpickle(data, where)
    if b"data" not in batch or b"labels" not in batch:
        raise PollenError(
            f"{where} is not a CIFAR-10 batch file: it lacks the 'data' and 'labels' entries. "
            "Pollen reads the python version of CIFAR-10 (cifar-10-python.tar.gz)."
        )
    try:
        rows = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64).reshape(-1)
        if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32 or len(rows) != len(labels):
            raise ValueError(f"data of shape {rows.shape} with {len(labels)} labels")
    except (TypeError, ValueError) as exc:
        raise PollenError(
            f"{where} does not hold CIFAR-10 images: expected rows of 3072 bytes (3x32x32) and "
            f"one label per row ({exc})."
        ) from None
    # Each row is channel-major (1024 red, 1024 green, 1024 blue values); make it HWC.
    images = np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _parse_meta(data: bytes | None, where: str) -> tuple[str, ...]:
    if data is None:
        return CIFAR10_CLASSES
    meta = _unpickle(data, where)
    names = meta.get(b"label_names")
    if not names:
        return CIFAR10_CLASSES
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _assemble_cifar(
    read: Callable[[str], bytes | None],
    where: Callable[[str], str],
    size: tuple[int, int],
    channels: int,
) -> Dataset:
    """Build the dataset from the batch files ``read(name)`` returns (``None``: missing)."""
    train = [_parse_batch(_required(read, where, n), where(n)) for n in _CIFAR_TRAIN_BATCHES]
    x_test, y_test = _parse_batch(_required(read, where, _CIFAR_TEST_BATCH), where("test_batch"))
    class_names = _parse_meta(read(_CIFAR_META), where(_CIFAR_META))
    y_train = np.concatenate([y for _, y in train])
    for split, y in (("train", y_train), ("test", y_test)):
        if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
            raise PollenError(
                f"The CIFAR-10 {split} labels range from {y.min()} to {y.max()}, but there are "
                f"only {len(class_names)} class names; the data is corrupt. Delete it and "
                "download the archive again."
            )
    x_train = np.concatenate([x for x, _ in train])
    if size != _CIFAR_SIZE or channels != 3:
        x_train = convert_arrays(x_train, size, channels)
        x_test = convert_arrays(x_test, size, channels)
    return Dataset(x_train, y_train, x_test, y_test, class_names)


def _required(read: Callable[[str], bytes | None], where: Callable[[str], str], name: str) -> bytes:
    data = read(name)
    if data is None:
        raise PollenError(
            f"{where(name)} is missing. A complete CIFAR-10 (python version) has "
            f"{', '.join(_CIFAR_TRAIN_BATCHES)}, {_CIFAR_TEST_BATCH} and {_CIFAR_META}; "
            "download the archive again or point --data-dir at a complete copy."
        )
    return data


# --------------------------------------------------------------------------------------------
# The extracted folder and the archive
# --------------------------------------------------------------------------------------------


def _load_folder(folder: Path, options: LoadOptions) -> Dataset:
    size, channels = options.image_size, options.channels
    names = (*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH, _CIFAR_META)
    key = {
        "size": size,
        "channels": channels,
        "files": {n: file_signature(folder / n) for n in names if (folder / n).is_file()},
    }

    def read(name: str) -> bytes | None:
        path = folder / name
        if not path.is_file():
            return None
        if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
            raise PollenError(
                f"{path} is a link that leads outside the data folder {folder} (to "
                f"{path.resolve()}). Pollen reads only files inside the data folder: replace "
                "the link with the file itself, or point --data-dir at the real folder."
            )
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BATCH_FILE_BYTES + 1)
        except OSError as exc:
            raise PollenError(f"Could not read {path}: {exc.strerror or exc}.") from None
        if len(data) > MAX_BATCH_FILE_BYTES:
            raise _too_large(str(path))
        return data

    def build() -> Dataset:
        return _assemble_cifar(read, lambda n: str(folder / n), size, channels)

    return cached(cache_file(options.cache_dir, "cifar", folder, size, channels, key), build)


def _load_archive(archive: Path, options: LoadOptions) -> Dataset:
    size, channels, sha256 = options.image_size, options.channels, options.sha256
    official = archive.name == CIFAR10_ARCHIVE
    key = {
        "size": size,
        "channels": channels,
        "archive": file_signature(archive),
        "sha256": sha256.lower() if official else None,
    }

    def build() -> Dataset:
        if official:
            got = _sha256_file(archive)
            if got.lower() != sha256.lower():
                raise PollenError(
                    f"The archive {archive} has the wrong SHA-256 checksum (expected {sha256}, "
                    f"got {got}): it is incomplete, corrupt or not the official CIFAR-10 file. "
                    "Delete it and run again to download it afresh, or point --data-dir at a "
                    "good copy (the archive or its extracted folder)."
                )
        try:
            members = dict(_read_tar_members(archive))
        except PollenError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as exc:
            raise PollenError(
                f"The archive {archive} is truncated or corrupt and cannot be read ({exc}). "
                "Delete it and download it again, or point --data-dir at its extracted "
                f"{CIFAR10_FOLDER}/ folder."
            ) from None
        if not any(n in members for n in _CIFAR_TRAIN_BATCHES):
            raise LayoutError(
                f"The archive {archive} does not contain CIFAR-10 (no {CIFAR10_FOLDER}/"
                "data_batch_1 inside)."
            )
        return _assemble_cifar(members.get, lambda n: f"{n} in {archive}", size, channels)

    return cached(
        cache_file(options.cache_dir, "cifar-archive", archive, size, channels, key), build
    )


def _read_tar_members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """Yield ``(base name, content)`` of the CIFAR-10 batch files inside a tar archive.

    Reads straight from the (possibly compressed) tar stream; nothing is written to disk.
    An entry whose path is absolute or climbs out with ``..``, a batch file that is a link,
    or one over :data:`MAX_BATCH_FILE_BYTES` is refused before it is read, and no single
    read from the stream is larger than that (:class:`BoundedReads`).
    """
    wanted = {*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH, _CIFAR_META}
    with ExitStack() as stack:
        stream = BoundedReads(open_decompressed(archive, stack), archive)
        tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r:"))
        for count, member in enumerate(tar, 1):
            base = _checked_member(archive, member, count)
            if base in wanted and (member.issym() or member.islnk()):
                raise PollenError(
                    f"{member.name} in the archive {archive} is a link, not a file. Pollen "
                    "reads only the batch files themselves; use the official archive."
                )
            if member.isfile() and base in wanted:
                if member.size > MAX_BATCH_FILE_BYTES:
                    raise _too_large(f"{member.name} in the archive {archive}")
                f = tar.extractfile(member)
                if f is not None:
                    yield base, f.read()  # member.size bytes: at most MAX_BATCH_FILE_BYTES


def _checked_member(archive: Path, member: tarfile.TarInfo, count: int) -> str:
    """The base name of ``member``, the ``count``-th entry; refused if it leads out."""
    if count > MAX_ARCHIVE_MEMBERS:
        raise PollenError(
            f"The archive {archive} has more than {MAX_ARCHIVE_MEMBERS} entries: it is not "
            "CIFAR-10 (whose archive has 8). Point --data-dir at the CIFAR-10 archive "
            f"{CIFAR10_ARCHIVE} or at an image folder."
        )
    return check_member_path(archive, member.name).name


def check_member_path(archive: Path, name: str) -> PurePosixPath:
    """The path of the archive entry ``name``; refused if absolute or climbing out (``..``)."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise PollenError(
            f"The archive {archive} has an entry {name!r} whose path leads outside the "
            "archive's folder (absolute, or with '..'): Pollen refuses such an archive, which "
            "may be hostile. Recreate it with relative paths, or download it again."
        )
    return path


def _too_large(what: str) -> PollenError:
    return PollenError(
        f"{what} is larger than any CIFAR-10 batch file (Pollen reads at most "
        f"{MAX_BATCH_FILE_BYTES >> 20} MiB, see pollen.data.cifar10.MAX_BATCH_FILE_BYTES): "
        "it is not CIFAR-10 and may be a decompression bomb. Use the official archive, "
        "downloaded again."
    )


def open_decompressed(archive: Path, stack: ExitStack) -> IO[bytes]:
    """``archive`` opened for reading (closed with ``stack``), decompressed if need be.

    Gzip, bzip2 and xz are recognised by their first bytes, whatever the file's name.
    """
    raw = stack.enter_context(open(archive, "rb"))
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
    if magic.startswith(b"BZh"):
        return stack.enter_context(bz2.BZ2File(raw))
    if magic.startswith(b"\xfd7zXZ\x00"):
        return stack.enter_context(lzma.LZMAFile(raw))
    return raw


class BoundedReads:
    """A read-only stream that refuses any one read of more than MAX_BATCH_FILE_BYTES.

    Python's tarfile reads a long-name or extended (pax) header whole, whatever size the
    archive claims for it; through this stream, a claim beyond the cap is refused with
    ``too_large("An entry of the archive <archive>")`` (default: the CIFAR-10 message).
    """

    def __init__(
        self,
        stream: IO[bytes],
        archive: Path,
        too_large: Callable[[str], PollenError] | None = None,
    ) -> None:
        self.stream = stream
        self.archive = archive
        self.too_large = too_large or _too_large

    def read(self, size: int = -1) -> bytes:
        """Read ``size`` bytes; refused when ``size`` is negative or over the cap."""
        if size is None or size < 0 or size > MAX_BATCH_FILE_BYTES:
            raise self.too_large(f"An entry of the archive {self.archive}")
        return self.stream.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Seek the underlying stream."""
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        """The underlying stream's position."""
        return self.stream.tell()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The sources
# --------------------------------------------------------------------------------------------


def _looks_like_tar(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return True
    try:  # tarfile.is_tarfile would read a first header of any claimed size
        with ExitStack() as stack:
            stream = BoundedReads(open_decompressed(path, stack), path)
            stack.enter_context(tarfile.open(fileobj=stream, mode="r:"))
        return True
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, PollenError):
        return False


def _recognise_archive(path: Path) -> Path | None:
    return path if path.is_file() and _looks_like_tar(path) else None


def _folder_holding_archive(path: Path) -> Path | None:
    archive = path / CIFAR10_ARCHIVE
    return archive if path.is_dir() and archive.is_file() else None


def _recognise_folder(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    if (path / "data_batch_1").exists() or (path / _CIFAR_TEST_BATCH).exists():
        return path
    if (path / CIFAR10_FOLDER).is_dir():
        return path / CIFAR10_FOLDER
    return None


def _load_default(cache: Path, options: LoadOptions) -> Dataset:
    return _load_archive(_ensure_archive(cache, options), options)


DEFAULT = Source(
    layout="nothing, to use CIFAR-10 from the cache folder (downloaded on first use)",
    load=_load_default,
)
"""CIFAR-10 from the cache folder (its ``load`` gets the cache folder), downloaded if missing."""

ARCHIVE = Source(
    layout=f"the CIFAR-10 archive {CIFAR10_ARCHIVE} or a folder containing it",
    load=_load_archive,
    recognise=_recognise_archive,
    # Only a fallback: a folder with the archive beside an extracted copy or an image folder
    # is read as the latter.
    fallback=_folder_holding_archive,
    file_kind="a CIFAR-10 tar archive",
)
"""The CIFAR-10 archive (any tar file), or a folder holding ``cifar-10-python.tar.gz``."""

FOLDER = Source(
    layout=(
        f"its extracted {CIFAR10_FOLDER}/ folder (data_batch_1..5, test_batch, batches.meta) "
        "or a folder containing it"
    ),
    load=_load_folder,
    recognise=_recognise_folder,
)
"""The extracted ``cifar-10-batches-py/`` folder, or a folder holding it."""
