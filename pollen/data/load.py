"""Datasets for Pollen: CIFAR-10 (downloaded or local) and image folders.

Everything Pollen trains on or predicts from is turned into plain numpy arrays here, so the
rest of the package never deals with file formats:

* :func:`load_dataset` returns a :class:`Dataset` (``uint8`` images in ``(N, H, W, C)`` layout
  and ``int64`` labels) from one of these sources:

  - nothing (``data_dir=None``): CIFAR-10 from the cache folder, downloaded on first use;
  - the CIFAR-10 archive ``cifar-10-python.tar.gz`` (the file, or a folder holding it);
  - its extracted ``cifar-10-batches-py/`` folder (or a folder holding that folder);
  - an image folder with ``train/<class>/*`` and ``test/<class>/*``.

* :func:`download_cifar10` fetches the official archive with a progress bar and checks its
  SHA-256 before it is used.
* :func:`load_images` decodes a few image files for prediction, exactly the way the training
  images were decoded.

Decoded arrays are cached as uncompressed ``.npz`` files in the cache folder (see
:func:`default_cache_dir`), keyed by the source path, the requested image size and channels,
and the names, sizes and modification times of the source files, so a second load is fast
and any change to the data is picked up. Archives are read member by member straight from
the tar file: nothing is ever extracted, least of all into the user's data folder.

Every problem the user can fix (missing or corrupt files, unreadable images, no network)
raises :class:`~pollen.errors.PollenError` with a one-paragraph explanation.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import io
import json
import logging
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pollen.errors import PollenError
from pollen.files import atomic_writer, file_lock

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_SHA256",
    "CIFAR10_URL",
    "Dataset",
    "default_cache_dir",
    "describe",
    "download_cifar10",
    "load_dataset",
    "load_images",
]

log = logging.getLogger(__name__)

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

_CACHE_VERSION = 1  # bump when the decoding changes, to invalidate old .npz caches
_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 30.0

_LAYOUTS = (
    "Pollen accepts: (1) nothing, to use CIFAR-10 from the cache folder (downloaded on first "
    f"use); (2) the CIFAR-10 archive {CIFAR10_ARCHIVE} or a folder containing it; (3) its "
    f"extracted {CIFAR10_FOLDER}/ folder (data_batch_1..5, test_batch, batches.meta) or a "
    "folder containing it; (4) an image folder with train/<class>/<images> and "
    "test/<class>/<images>, where each subfolder name is a class name."
)


@dataclass(frozen=True)
class Dataset:
    """A labelled image dataset with a train and a test split, held in memory.

    Attributes:
        x_train: Training images, ``uint8``, shape ``(N, H, W, C)`` (channels last,
            ``C`` is 3 for RGB or 1 for greyscale).
        y_train: Training labels, ``int64``, shape ``(N,)``, values in
            ``[0, len(class_names))``.
        x_test: Test images, ``uint8``, shape ``(M, H, W, C)``.
        y_test: Test labels, ``int64``, shape ``(M,)``.
        class_names: Name of each class; label ``i`` means ``class_names[i]``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(class_names)``."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(H, W, C)`` of one image."""
        h, w, c = self.x_train.shape[1:]
        return int(h), int(w), int(c)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Return the folder where Pollen keeps downloads and decoded-array caches.

    Returns:
        ``$POLLEN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/pollen`` if ``XDG_CACHE_HOME``
        is set, else ``~/.cache/pollen``. The folder is not created here.
    """
    explicit = os.environ.get("POLLEN_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "pollen"
    return Path.home() / ".cache" / "pollen"


def load_dataset(
    data_dir: str | Path | None = None,
    *,
    image_size: tuple[int, int] = (32, 32),
    channels: int = 3,
    cache_dir: str | Path | None = None,
    download: bool = True,
    url: str | None = None,
    sha256: str | None = None,
) -> Dataset:
    """Load a dataset as ``uint8`` arrays of shape ``(N, H, W, C)`` with ``int64`` labels.

    Args:
        data_dir: Where the data is. ``None`` (or ``""``) uses CIFAR-10 from ``cache_dir``
            (downloading it when missing and ``download`` is true). Otherwise the path of
            the archive ``cifar-10-python.tar.gz`` or a folder containing it; an extracted
            ``cifar-10-batches-py/`` folder or a folder containing it; or an image folder
            with ``train/<class>/*`` and ``test/<class>/*`` (class names are the sorted
            subfolder names of ``train/``; every file with an image extension Pillow can
            read is used; hidden and other files are ignored).
        image_size: ``(height, width)`` of the returned images. Images of another size are
            resized with bilinear filtering. Default ``(32, 32)``.
        channels: 3 for RGB (default) or 1 for greyscale.
        cache_dir: Folder for the downloaded archive and the ``.npz`` caches of decoded
            arrays (in its ``arrays/`` subfolder). ``None`` (or ``""``) means
            :func:`default_cache_dir`.
        download: Whether to download CIFAR-10 when ``data_dir`` is ``None`` and the archive
            is not in ``cache_dir``. Default true.
        url: Where to download CIFAR-10 from. Default :data:`CIFAR10_URL`.
        sha256: Expected SHA-256 of a file named ``cifar-10-python.tar.gz`` (downloaded or
            given). Default :data:`CIFAR10_SHA256`.

    Returns:
        The dataset, with ``x_*`` of dtype ``uint8`` and shape ``(N, *image_size, channels)``
        and ``y_*`` of dtype ``int64``.

    Raises:
        PollenError: If the data is missing, unrecognised, corrupt or cannot be downloaded,
            or an argument is invalid.
    """
    size = _check_image_size(image_size)
    _check_channels(channels)
    url = CIFAR10_URL if url is None else url
    sha256 = CIFAR10_SHA256 if sha256 is None else sha256
    if cache_dir is None or not str(cache_dir).strip():
        cache = default_cache_dir()
    else:
        cache = Path(cache_dir).expanduser()
    if data_dir is not None and not str(data_dir).strip():
        data_dir = None  # an empty setting (e.g. data-dir = "" in a run config) means "none"

    if data_dir is None:
        archive = cache / CIFAR10_ARCHIVE
        if not archive.is_file():
            if not download:
                raise PollenError(
                    f"No data given and the CIFAR-10 archive is not in the cache ({archive}), "
                    "and downloading is turned off. Pass --data-dir pointing at the archive "
                    f"{CIFAR10_ARCHIVE}, its extracted {CIFAR10_FOLDER}/ folder, or an image "
                    "folder with train/<class>/* and test/<class>/*; or put the archive at "
                    f"{archive}; or allow the download."
                )
            _make_dir(cache)
            # Several clients may start at once: one downloads, the others wait for it.
            with file_lock(
                cache / (CIFAR10_ARCHIVE + ".lock"),
                waiting=f"Waiting for another process to finish downloading into {cache}",
            ):
                if not archive.is_file():
                    try:
                        download_cifar10(cache, url=url, sha256=sha256)
                    except _DownloadFailedError as exc:
                        raise PollenError(
                            f"CIFAR-10 could not be downloaded from {url} ({exc.reason}). If "
                            "this machine is offline, provide the data yourself: pass "
                            f"--data-dir pointing at the archive {CIFAR10_ARCHIVE}, at its "
                            f"extracted {CIFAR10_FOLDER}/ folder, or at an image folder with "
                            "train/<class>/* and test/<class>/*; or copy the archive to "
                            f"{archive} and run again."
                        ) from None
        return _load_cifar_archive(archive, size, channels, cache, sha256)

    path = Path(data_dir).expanduser()
    if not path.exists():
        raise PollenError(
            f"The data path {path} does not exist. Check the spelling of --data-dir, or leave "
            f"it out to use CIFAR-10 from the cache folder. {_LAYOUTS}"
        )
    if path.is_file():
        if _looks_like_tar(path):
            return _load_cifar_archive(path, size, channels, cache, sha256)
        raise PollenError(
            f"The data path {path} is a file but not a CIFAR-10 tar archive. {_LAYOUTS}"
        )
    if not path.is_dir():
        raise PollenError(f"The data path {path} is neither a file nor a folder. {_LAYOUTS}")

    if (path / "data_batch_1").exists() or (path / _CIFAR_TEST_BATCH).exists():
        return _load_cifar_folder(path, size, channels, cache)
    if (path / CIFAR10_FOLDER).is_dir():
        return _load_cifar_folder(path / CIFAR10_FOLDER, size, channels, cache)
    if (path / "train").is_dir() or (path / "test").is_dir():
        return _load_image_folder(path, size, channels, cache)
    if (path / CIFAR10_ARCHIVE).is_file():
        return _load_cifar_archive(path / CIFAR10_ARCHIVE, size, channels, cache, sha256)
    raise PollenError(
        f"The data folder {path} does not have a layout Pollen recognises: it contains "
        f"{_summarise_folder(path)}. {_LAYOUTS}"
    )


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
    _make_dir(cache_dir)
    final = cache_dir / CIFAR10_ARCHIVE
    part = cache_dir / (CIFAR10_ARCHIVE + ".part")
    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S)
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


def load_images(
    paths: Sequence[str | Path],
    image_size: tuple[int, int] = (32, 32),
    channels: int = 3,
) -> np.ndarray:
    """Decode image files for prediction, the same way training images are decoded.

    Args:
        paths: Image files in any format and colour depth Pillow reads.
        image_size: ``(height, width)`` to resize to (bilinear). Default ``(32, 32)``.
        channels: 3 for RGB (default) or 1 for greyscale.

    Returns:
        ``uint8`` array of shape ``(len(paths), height, width, channels)``, in the order of
        ``paths``.

    Raises:
        PollenError: If a file does not exist or cannot be decoded as an image.
    """
    size = _check_image_size(image_size)
    _check_channels(channels)
    files = [Path(p).expanduser() for p in paths]
    for f in files:
        if not f.is_file():
            raise PollenError(
                f"The image file {f} does not exist (or is not a file). Check the path."
            )
    return _decode_files(files, size, channels, progress_label=None)


def describe(ds: Dataset) -> str:
    """Summarise a dataset in one line.

    Args:
        ds: The dataset.

    Returns:
        For example ``"50000 train / 10000 test images of 32x32x3, 10 classes: airplane,
        automobile, ..."`` (at most ten class names are listed).
    """
    h, w, c = ds.x_train.shape[1:] if ds.x_train.ndim == 4 else ds.x_test.shape[1:]
    names = list(ds.class_names[:10])
    if len(ds.class_names) > 10:
        names.append(f"... ({len(ds.class_names) - 10} more)")
    return (
        f"{len(ds.x_train)} train / {len(ds.x_test)} test images of {h}x{w}x{c}, "
        f"{len(ds.class_names)} classes: {', '.join(names)}"
    )


# --------------------------------------------------------------------------------------------
# Argument checks and small helpers
# --------------------------------------------------------------------------------------------


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


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise PollenError(
            f"The image size {image_size!r} is not valid: give it as two positive whole numbers "
            "(height, width), for example 32x32."
        ) from None
    if h < 1 or w < 1:
        raise PollenError(
            f"The image size {h}x{w} is not valid: height and width must both be at least 1."
        )
    return h, w


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise PollenError(
            f"The number of image channels must be 3 (colour) or 1 (greyscale), not {channels!r}."
        )


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PollenError(
            f"Could not create the cache folder {path}: {exc.strerror or exc}. Choose a "
            "writable folder with --cache-dir or the POLLEN_CACHE_DIR environment variable."
        ) from None


def _download_progress() -> Any:
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


def _looks_like_tar(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return True
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def _summarise_folder(path: Path, limit: int = 8) -> str:
    try:
        entries = sorted(path.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        return f"nothing readable ({exc.strerror or exc})"
    entries = [e for e in entries if not e.name.startswith(".")]
    if not entries:
        return "nothing (it is empty)"
    shown = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(shown) + more


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _file_signature(path: Path) -> list[Any]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


# --------------------------------------------------------------------------------------------
# .npz cache of decoded arrays
# --------------------------------------------------------------------------------------------


def _cache_file(
    cache_dir: Path, kind: str, source: Path, size: tuple[int, int], channels: int, key: Any
) -> Path:
    """Return the ``.npz`` cache file for decoding ``source`` at ``size`` and ``channels``.

    The name is ``<kind>-<source id>-<content id>.npz``: the source id hashes the resolved
    path, size and channels; the content id hashes ``key`` (file names, sizes, mtimes...),
    so it changes whenever the data does, and :func:`_write_cache` then removes the stale
    file with the same source id.
    """
    source_blob = json.dumps([str(source.resolve()), list(size), channels]).encode()
    source_id = hashlib.sha256(source_blob).hexdigest()[:12]
    blob = json.dumps([_CACHE_VERSION, key], sort_keys=True, default=str).encode()
    key_id = hashlib.sha256(blob).hexdigest()[:20]
    return cache_dir / "arrays" / f"{kind}-{source_id}-{key_id}.npz"


def _read_cache(path: Path) -> Dataset | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            ds = Dataset(
                x_train=z["x_train"],
                y_train=z["y_train"],
                x_test=z["x_test"],
                y_test=z["y_test"],
                class_names=tuple(str(n) for n in z["class_names"]),
            )
    except Exception as exc:  # corrupt or foreign file: rebuild it
        log.warning("Ignoring unreadable cache file %s (%s)", path, exc)
        return None
    if ds.x_train.dtype != np.uint8 or ds.y_train.dtype != np.int64:
        return None
    return ds


def _write_cache(path: Path, ds: Dataset) -> None:
    """Write ``ds`` to ``path`` atomically; remove older caches of the same source."""
    try:
        with atomic_writer(path) as f:
            np.savez(
                f,
                x_train=ds.x_train,
                y_train=ds.y_train,
                x_test=ds.x_test,
                y_test=ds.y_test,
                class_names=np.array(ds.class_names, dtype=str),
            )
        prefix = path.name.rsplit("-", 1)[0] + "-"
        for old in path.parent.glob(prefix + "*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as exc:  # a cache is an optimisation: never fail the load over it
        log.warning("Could not write the dataset cache %s (%s)", path, exc)


def _cached(path: Path, build: Callable[[], Dataset]) -> Dataset:
    ds = _read_cache(path)
    if ds is None:
        ds = build()
        _write_cache(path, ds)
    return ds


# --------------------------------------------------------------------------------------------
# CIFAR-10 (archive or extracted folder)
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
        x_train = _convert_arrays(x_train, size, channels)
        x_test = _convert_arrays(x_test, size, channels)
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


def _load_cifar_folder(folder: Path, size: tuple[int, int], channels: int, cache: Path) -> Dataset:
    names = (*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH, _CIFAR_META)
    key = {
        "size": size,
        "channels": channels,
        "files": {n: _file_signature(folder / n) for n in names if (folder / n).is_file()},
    }

    def read(name: str) -> bytes | None:
        path = folder / name
        if not path.is_file():
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise PollenError(f"Could not read {path}: {exc.strerror or exc}.") from None

    def build() -> Dataset:
        return _assemble_cifar(read, lambda n: str(folder / n), size, channels)

    return _cached(_cache_file(cache, "cifar", folder, size, channels, key), build)


def _load_cifar_archive(
    archive: Path, size: tuple[int, int], channels: int, cache: Path, sha256: str
) -> Dataset:
    official = archive.name == CIFAR10_ARCHIVE
    key = {
        "size": size,
        "channels": channels,
        "archive": _file_signature(archive),
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
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise PollenError(
                f"The archive {archive} is truncated or corrupt and cannot be read ({exc}). "
                "Delete it and download it again, or point --data-dir at its extracted "
                f"{CIFAR10_FOLDER}/ folder."
            ) from None
        if not any(n in members for n in _CIFAR_TRAIN_BATCHES):
            raise PollenError(
                f"The archive {archive} does not contain CIFAR-10 (no {CIFAR10_FOLDER}/"
                f"data_batch_1 inside). {_LAYOUTS}"
            )
        return _assemble_cifar(members.get, lambda n: f"{n} in {archive}", size, channels)

    return _cached(_cache_file(cache, "cifar-archive", archive, size, channels, key), build)


def _read_tar_members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """Yield ``(base name, content)`` of the CIFAR-10 batch files inside a tar archive.

    Reads straight from the (possibly compressed) tar stream; nothing is written to disk.
    """
    wanted = {*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH, _CIFAR_META}
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:
            base = member.name.rstrip("/").rsplit("/", 1)[-1]
            if member.isfile() and base in wanted:
                f = tar.extractfile(member)
                if f is not None:
                    yield base, f.read()


# --------------------------------------------------------------------------------------------
# Image decoding (image folders, prediction, resizing CIFAR-10)
# --------------------------------------------------------------------------------------------


def _image_extensions() -> frozenset[str]:
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _to_pil_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow image (any mode or bit depth) to 8-bit RGB or L."""
    target = "RGB" if channels == 3 else "L"
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # 16/32-bit integer or float greyscale: scale to 8 bits rather than clip.
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16"):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif img.mode == "F" and top <= 1.0:
            arr = arr * 255.0
        elif top > 255.0:
            arr = arr / (65535.0 if top <= 65535.0 else top) * 255.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif img.mode in ("P", "PA"):
        # Going through RGBA avoids Pillow's warning about palette transparency.
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    return img if img.mode == target else img.convert(target)


def _decode_one(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    h, w = size
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                side = max(w, h)  # the image may still be rotated by its EXIF orientation
                img.draft("RGB" if channels == 3 else "L", (side, side))  # cheap downscale
            img = ImageOps.exif_transpose(img)
            img = _to_pil_mode(img, channels)
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except PollenError:
        raise
    except Exception as exc:  # Pillow raises many types for bad files
        raise PollenError(
            f"The image file {path} cannot be read ({type(exc).__name__}: {exc}). It may be "
            "corrupt, truncated or not an image; delete or replace it and run again."
        ) from None
    return arr.reshape(h, w, channels)


def _parallel_fill(
    out: np.ndarray, item: Callable[[int], np.ndarray], progress_label: str | None
) -> np.ndarray:
    """Set ``out[i] = item(i)`` for every ``i``, on a few threads, and return ``out``.

    Pillow releases the GIL while decoding and resizing, so the threads do run in parallel.
    The first exception is re-raised at once, without waiting for the remaining items.
    """
    n = len(out)
    if n == 0:
        return out
    chunk = 256
    starts = range(0, n, chunk)

    def run(start: int) -> int:
        stop = min(start + chunk, n)
        for i in range(start, stop):
            out[i] = item(i)
        return stop - start

    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(starts))))
    try:
        futures = [pool.submit(run, s) for s in starts]
        if progress_label is not None and n >= 2000:
            from rich.console import Console
            from rich.progress import Progress

            with Progress(console=Console(stderr=True), transient=True) as progress:
                task = progress.add_task(progress_label, total=n)
                for future in as_completed(futures):
                    progress.advance(task, future.result())
        else:
            for future in as_completed(futures):
                future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out


def _decode_files(
    files: Sequence[Path], size: tuple[int, int], channels: int, progress_label: str | None
) -> np.ndarray:
    """Decode ``files`` into one ``uint8 (N, H, W, C)`` array, in order."""
    out = np.empty((len(files), *size, channels), dtype=np.uint8)
    return _parallel_fill(out, lambda i: _decode_one(files[i], size, channels), progress_label)


def _convert_arrays(x: np.ndarray, size: tuple[int, int], channels: int) -> np.ndarray:
    """Resize/convert ``uint8 (N, H, W, 3)`` images exactly as decoded files would be."""
    h, w = size

    def convert(i: int) -> np.ndarray:
        pil = Image.fromarray(x[i])
        if channels == 1:
            pil = pil.convert("L")
        if pil.size != (w, h):
            pil = pil.resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(pil, dtype=np.uint8).reshape(h, w, channels)

    out = np.empty((len(x), h, w, channels), dtype=np.uint8)
    return _parallel_fill(out, convert, "Resizing images")


# --------------------------------------------------------------------------------------------
# Image folders: train/<class>/*, test/<class>/*
# --------------------------------------------------------------------------------------------


def _list_split(root: Path, split: str, extensions: frozenset[str]) -> dict[str, list[Path]]:
    folder = root / split
    if not folder.is_dir():
        other = "test" if split == "train" else "train"
        raise PollenError(
            f"The image folder {root} has a {other}/ folder but no {split}/ folder. An image "
            f"folder needs both train/<class>/<images> and test/<class>/<images>. {_LAYOUTS}"
        )
    classes: dict[str, list[Path]] = {}
    try:
        for sub in sorted(folder.iterdir(), key=lambda p: p.name):
            if sub.is_dir() and not sub.name.startswith("."):
                classes[sub.name] = sorted(
                    (
                        f
                        for f in sub.iterdir()
                        if f.is_file()
                        and not f.name.startswith(".")
                        and f.suffix.lower() in extensions
                    ),
                    key=lambda p: p.name,
                )
    except OSError as exc:
        raise PollenError(f"Could not list the folder {folder}: {exc.strerror or exc}.") from None
    return classes


def _load_image_folder(root: Path, size: tuple[int, int], channels: int, cache: Path) -> Dataset:
    extensions = _image_extensions()
    train = _list_split(root, "train", extensions)
    test = _list_split(root, "test", extensions)
    n_train = sum(len(v) for v in train.values())
    if not train or n_train == 0:
        raise PollenError(
            f"The training folder {root / 'train'} has no images: it should contain one "
            "subfolder per class (for example train/cat/, train/dog/) holding image files "
            "(.png, .jpg, ...). Add images or point --data-dir elsewhere."
        )
    empty = [name for name, files in train.items() if not files]
    if empty:
        raise PollenError(
            f"The class folder(s) {', '.join(empty)} in {root / 'train'} contain no image files. "
            "Every class needs training images; add some or remove the empty folders."
        )
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise PollenError(
            f"The test folder {root / 'test'} has class folder(s) {', '.join(unknown)} that "
            f"{root / 'train'} does not have. The test classes must be among the training "
            f"classes ({', '.join(train)}); rename or remove those folders."
        )
    if sum(len(v) for v in test.values()) == 0:
        raise PollenError(
            f"The test folder {root / 'test'} has no images: it should contain the same class "
            "subfolders as train/ with held-out images. Add some and run again."
        )
    class_names = tuple(train)  # already sorted
    label_of = {name: i for i, name in enumerate(class_names)}

    def flatten(split: dict[str, list[Path]]) -> tuple[list[Path], np.ndarray]:
        files = [f for name in split for f in split[name]]
        labels = np.array([label_of[name] for name in split for _ in split[name]], np.int64)
        return files, labels

    train_files, y_train = flatten(train)
    test_files, y_test = flatten(test)
    key = {
        "size": size,
        "channels": channels,
        "files": [
            [str(f.relative_to(root)), *_file_signature(f)] for f in train_files + test_files
        ],
    }

    def build() -> Dataset:
        x_train = _decode_files(train_files, size, channels, "Decoding training images")
        x_test = _decode_files(test_files, size, channels, "Decoding test images")
        return Dataset(x_train, y_train, x_test, y_test, class_names)

    return _cached(_cache_file(cache, "images", root, size, channels, key), build)
