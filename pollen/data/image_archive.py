"""Archives of an image folder: ``.tar``, ``.tar.gz``, ``.tgz`` and ``.zip``.

The archive holds ``train/<class>/*`` and ``test/<class>/*``, at its root or under exactly one
top folder (``cifar10-jpg/train/cat/0001.jpg``). It is read entry by entry, straight from the
(possibly compressed) stream: nothing is extracted to disk. The layout rules and errors are
the image folder's (:mod:`pollen.data.image_folder`): class names are the sorted subfolder
names of ``train/``, every entry with an image extension Pillow can open is used, hidden
entries (and macOS's ``__MACOSX/``) are ignored.

An archive someone else made is not trusted: an entry whose path is absolute or climbs out
with ``..``, an image entry that is a link, an image entry over
:data:`pollen.data.cifar10.MAX_BATCH_FILE_BYTES`, more than :data:`MAX_ARCHIVE_ENTRIES`
entries or more than :data:`MAX_ARCHIVE_IMAGE_BYTES` of images in all are refused, and every
image is decoded through :func:`pollen.data.decode.decode_bytes` (so
:data:`~pollen.data.decode.MAX_IMAGE_PIXELS` holds). Decoded arrays are cached as ``.npz``
(see :mod:`pollen.data.cache`), keyed by the archive's size and modification time, so a large
archive is decoded once.
"""

from __future__ import annotations

import lzma
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path, PurePosixPath

import numpy as np

from pollen.data.cache import cache_file, cached, file_signature
from pollen.data.cifar10 import (
    MAX_BATCH_FILE_BYTES,
    BoundedReads,
    check_member_path,
    open_decompressed,
)
from pollen.data.dataset import Dataset, LayoutError, LoadOptions, Source
from pollen.data.decode import decode_bytes, header_size, image_extensions
from pollen.data.image_folder import check_splits
from pollen.errors import PollenError

__all__ = ["MAX_ARCHIVE_ENTRIES", "MAX_ARCHIVE_IMAGE_BYTES", "SOURCE"]

MAX_ARCHIVE_ENTRIES = 2_000_000
"""Most entries (files and folders) of an image archive read: an archive of millions of
empty entries would otherwise fill memory with their names."""

MAX_ARCHIVE_IMAGE_BYTES = 8 << 30
"""Most bytes of encoded images read from one archive (8 GiB): they are held in memory
until decoded. Each image entry is also at most
:data:`pollen.data.cifar10.MAX_BATCH_FILE_BYTES`."""

_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
_SPLITS = ("train", "test")
_PEEK_ENTRIES = 64  # tar entries looked at to recognise an image archive
_CIFAR_NAMES = frozenset({*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"})


class _Entry:
    """One entry of the archive: its path, kind, and (for a candidate image) its bytes."""

    __slots__ = ("data", "is_dir", "is_link", "name", "parts")

    def __init__(self, name: str, parts: tuple[str, ...], is_dir: bool, is_link: bool) -> None:
        self.name = name  # the entry's whole path in the archive, for messages
        self.parts = parts  # its path parts (after the top folder, once that is dropped)
        self.is_dir = is_dir
        self.is_link = is_link
        self.data: bytes | None = None

    def below_top(self) -> _Entry:
        """This entry with its first path part (the top folder) dropped."""
        entry = _Entry(self.name, self.parts[1:], self.is_dir, self.is_link)
        entry.data = self.data
        return entry


# --------------------------------------------------------------------------------------------
# Reading the entries
# --------------------------------------------------------------------------------------------


def _visible(parts: tuple[str, ...]) -> bool:
    return bool(parts) and parts[0] != "__MACOSX" and not any(p.startswith(".") for p in parts)


def _may_be_image(parts: tuple[str, ...], extensions: frozenset[str]) -> bool:
    """Whether ``parts`` could be ``[top/]split/class/image``: worth reading its bytes."""
    n = len(parts)
    in_split = (n == 3 and parts[0] in _SPLITS) or (n == 4 and parts[1] in _SPLITS)
    return in_split and PurePosixPath(parts[-1]).suffix.lower() in extensions


def _too_large(what: str) -> PollenError:
    return PollenError(
        f"{what} is larger than Pollen reads from an image archive (at most "
        f"{MAX_BATCH_FILE_BYTES >> 20} MiB per entry, see "
        "pollen.data.cifar10.MAX_BATCH_FILE_BYTES): it may be a decompression bomb. Remove "
        "it from the archive, or extract the archive and point --data-dir at the folder."
    )


class _Budget:
    """Counts entries and image bytes against the archive caps."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.entries = 0
        self.bytes = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > MAX_ARCHIVE_ENTRIES:
            raise PollenError(
                f"The archive {self.archive} has more than {MAX_ARCHIVE_ENTRIES} entries "
                "(see pollen.data.image_archive.MAX_ARCHIVE_ENTRIES). Split the data, or "
                "extract it and point --data-dir at the folder."
            )

    def image(self, name: str, size: int) -> None:
        if size > MAX_BATCH_FILE_BYTES:
            raise _too_large(f"{name} in the archive {self.archive}")
        self.bytes += size
        if self.bytes > MAX_ARCHIVE_IMAGE_BYTES:
            raise PollenError(
                f"The images in the archive {self.archive} add up to more than "
                f"{MAX_ARCHIVE_IMAGE_BYTES >> 30} GiB (see "
                "pollen.data.image_archive.MAX_ARCHIVE_IMAGE_BYTES), more than Pollen holds in "
                "memory at once. Extract the archive and point --data-dir at the folder."
            )


def _tar_entries(archive: Path, extensions: frozenset[str]) -> Iterator[_Entry]:
    budget = _Budget(archive)
    with ExitStack() as stack:
        stream = BoundedReads(open_decompressed(archive, stack), archive, _too_large)
        tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r:"))
        while (member := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every entry it passes; we need none back
            budget.entry()
            parts = check_member_path(archive, member.name).parts
            if not _visible(parts):
                continue
            entry = _Entry("/".join(parts), parts, member.isdir(), member.issym() or member.islnk())
            if member.isfile() and _may_be_image(parts, extensions):
                budget.image(member.name, member.size)
                f = tar.extractfile(member)
                entry.data = f.read() if f is not None else b""
            yield entry


def _zip_entries(archive: Path, extensions: frozenset[str]) -> Iterator[_Entry]:
    budget = _Budget(archive)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            budget.entry()
            parts = check_member_path(archive, info.filename).parts
            if not _visible(parts):
                continue
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            entry = _Entry("/".join(parts), parts, info.is_dir(), is_link)
            if not info.is_dir() and not is_link and _may_be_image(parts, extensions):
                budget.image(info.filename, info.file_size)
                with zf.open(info) as f:
                    entry.data = f.read(MAX_BATCH_FILE_BYTES + 1)
                if len(entry.data) > MAX_BATCH_FILE_BYTES:
                    raise _too_large(f"{info.filename} in the archive {archive}")
            yield entry


def _read_entries(archive: Path) -> list[_Entry]:
    extensions = image_extensions()
    is_zip = archive.name.lower().endswith(".zip")
    try:
        if is_zip:
            return list(_zip_entries(archive, extensions))
        return list(_tar_entries(archive, extensions))
    except PollenError:
        raise
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        EOFError,
        zlib.error,
        lzma.LZMAError,
        OSError,
        RuntimeError,  # an encrypted zip entry
        NotImplementedError,  # a zip compression method Python lacks
    ) as exc:
        raise PollenError(
            f"The archive {archive} is truncated, corrupt or not a {'zip' if is_zip else 'tar'} "
            f"archive and cannot be read ({type(exc).__name__}: {exc}). Recreate it, or "
            "extract it and point --data-dir at the folder."
        ) from None


# --------------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------------


def _top_folder(archive: Path, entries: list[_Entry]) -> str | None:
    """The one top folder holding train/ and test/, or ``None`` when they are at the root."""
    if any(e.parts[0] in _SPLITS and (e.is_dir or len(e.parts) > 1) for e in entries):
        return None
    tops = sorted({e.parts[0] for e in entries if len(e.parts) > 1 and e.parts[1] in _SPLITS})
    if len(tops) == 1:
        return tops[0]
    if tops:
        raise LayoutError(
            f"The archive {archive} holds several top folders with train/ or test/ inside "
            f"({', '.join(tops)}). An image archive holds train/<class>/<images> and "
            "test/<class>/<images> at its root or under exactly one top folder."
        )
    raise LayoutError(
        f"The archive {archive} holds no train/ or test/ folder, at its root or under one "
        "top folder: it is not an image archive."
    )


def _split(
    archive: Path, entries: list[_Entry], split: str
) -> tuple[dict[str, list[tuple[str, bytes]]], bool]:
    """``({class: sorted [(entry name, bytes)]}, whether split/ exists)`` of one split."""
    classes: dict[str, list[tuple[str, bytes]]] = {}
    found = False
    for e in entries:
        if not e.parts or e.parts[0] != split:
            continue
        found = True
        if len(e.parts) >= 2 and e.is_link:
            raise PollenError(
                f"{e.name} in the archive {archive} is a link, not a file or folder. Pollen "
                "reads only the images themselves from an archive: replace the link with the "
                "file it points to and pack the archive again."
            )
        if len(e.parts) == 2 and e.is_dir:
            classes.setdefault(e.parts[1], [])
        elif len(e.parts) >= 3:
            files = classes.setdefault(e.parts[1], [])
            if len(e.parts) == 3 and e.data is not None:
                files.append((e.name, e.data))
    for files in classes.values():
        files.sort(key=lambda f: f[0].rsplit("/", 1)[-1])
    return dict(sorted(classes.items())), found


def _load(archive: Path, options: LoadOptions) -> Dataset:
    size, channels = options.image_size, options.channels
    key = {"size": size, "channels": channels, "archive": file_signature(archive)}

    def build() -> Dataset:
        entries = _read_entries(archive)
        top = _top_folder(archive, entries)
        if top is not None:
            entries = [e.below_top() for e in entries if e.parts[0] == top and len(e.parts) > 1]
        root = archive if top is None else archive / top  # how errors name the folders inside
        train, has_train = _split(archive, entries, "train")
        test, has_test = _split(archive, entries, "test")
        if not (has_train and has_test):
            have, lack = ("train", "test") if has_train else ("test", "train")
            raise LayoutError(
                f"The archive {archive} has a {have}/ folder but no {lack}/ folder. An image "
                "archive needs both train/<class>/<images> and test/<class>/<images>."
            )
        check_splits(root, train, test)
        class_names = tuple(train)
        label_of = {name: i for i, name in enumerate(class_names)}

        def decode(split: dict[str, list[tuple[str, bytes]]], label: str) -> np.ndarray:
            items = [item for name in split for item in split[name]]
            names = [f"{n} in the archive {archive}" for n, _ in items]
            return decode_bytes([b for _, b in items], names, size, channels, label)

        def labels(split: dict[str, list[tuple[str, bytes]]]) -> np.ndarray:
            return np.array([label_of[n] for n in split for _ in split[n]], np.int64)

        x_train = decode(train, "Decoding training images")
        x_test = decode(test, "Decoding test images")
        return Dataset(x_train, labels(train), x_test, labels(test), class_names)

    return cached(
        cache_file(options.cache_dir, "image-archive", archive, size, channels, key), build
    )


# --------------------------------------------------------------------------------------------
# Recognising an image archive
# --------------------------------------------------------------------------------------------


def _tar_has_splits(path: Path) -> bool:
    """Whether one of the first tar entries is ``[top/]train`` or ``[top/]test`` (or inside).

    Only entry headers are read (the stream is stopped at the first CIFAR-10 batch file
    name, so the CIFAR-10 archive is left to its own source at once).
    """
    try:
        with ExitStack() as stack:
            stream = BoundedReads(open_decompressed(path, stack), path, _too_large)
            tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r:"))
            for _ in range(_PEEK_ENTRIES):
                member = tar.next()
                if member is None:
                    return False
                parts = PurePosixPath(member.name).parts
                if parts and parts[-1] in _CIFAR_NAMES:
                    return False
                if _visible(parts) and (
                    parts[0] in _SPLITS or parts[1:2] in (("train",), ("test",))
                ):
                    return True
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, PollenError):
        return False
    return False


def _native_size(archive: Path) -> tuple[int, int] | None:
    """The size of the first training image in the archive, from its header.

    The entries before it are streamed past; nothing is extracted.
    """
    extensions = image_extensions()
    entries = _zip_entries if archive.name.lower().endswith(".zip") else _tar_entries
    try:
        for entry in entries(archive, extensions):
            if entry.data is not None and "train" in entry.parts[:2]:
                return header_size(entry.data)
    except (
        PollenError,
        tarfile.TarError,
        zipfile.BadZipFile,
        EOFError,
        zlib.error,
        lzma.LZMAError,
        OSError,
        RuntimeError,
        NotImplementedError,
    ):
        return None  # loading the archive reports what is wrong with it
    return None


def _recognise(path: Path) -> Path | None:
    name = path.name.lower()
    if not path.is_file() or not name.endswith(_SUFFIXES):
        return None
    if name.endswith(".zip"):
        return path  # no other source reads zips: its errors say what is missing
    return path if _tar_has_splits(path) else None


SOURCE = Source(
    layout=(
        "a .tar, .tar.gz, .tgz or .zip archive of an image folder, with train/<class>/<images> "
        "and test/<class>/<images> at its root or under one top folder"
    ),
    load=_load,
    recognise=_recognise,
    native_size=_native_size,
)
"""A ``.tar``, ``.tar.gz``, ``.tgz`` or ``.zip`` archive of an image folder."""
