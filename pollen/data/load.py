"""Load a dataset from whichever source the user's path is: :func:`load_dataset`.

The sources Pollen reads are listed in :data:`SOURCES` (plus :data:`DEFAULT_SOURCE` for
"no data given"); the order of that tuple is the order in which they are offered the path
and the order of the layouts in the help text of every "unrecognised data" error. To add
a source, write one module with a :class:`~pollen.data.dataset.Source` and add it to
:data:`SOURCES` (see docs/extending.md).

Every problem the user can fix (missing or corrupt files, unreadable images, no network)
raises :class:`~pollen.errors.PollenError` with a one-paragraph explanation.
"""

from __future__ import annotations

from pathlib import Path

from pollen.data import cifar10, image_archive, image_folder, manifest
from pollen.data.cache import default_cache_dir
from pollen.data.dataset import (
    Dataset,
    LayoutError,
    LoadOptions,
    Source,
    check_channels,
    check_image_size,
)
from pollen.errors import PollenError

__all__ = [
    "CIFAR10_IMAGE_SIZE",
    "DEFAULT_SOURCE",
    "SOURCES",
    "describe",
    "is_cifar10",
    "layouts_help",
    "load_dataset",
    "native_image_size",
]

#: ``(height, width)`` of CIFAR-10's images: ``image-size = "auto"`` on CIFAR-10.
CIFAR10_IMAGE_SIZE = (32, 32)

DEFAULT_SOURCE: Source = cifar10.DEFAULT
"""What ``load_dataset`` reads when no data is given; its ``load`` gets the cache folder."""

SOURCES: tuple[Source, ...] = (
    # A .csv file, or a folder with train.csv/test.csv and no train/ or test/ subfolder.
    manifest.SOURCE,
    # Before cifar10.ARCHIVE, which claims every tar file: an image archive is claimed only
    # when its first entries are train/ or test/ (at the root or under one top folder).
    image_archive.SOURCE,
    cifar10.ARCHIVE,
    cifar10.FOLDER,
    image_folder.SOURCE,
)
"""Every source a data path can be, in the order they are offered it."""


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
            read is used; hidden and other files are ignored). See :data:`SOURCES`.
        image_size: ``(height, width)`` of the returned images. Images of another size are
            resized with bilinear filtering. Default ``(32, 32)``.
        channels: 3 for RGB (default) or 1 for greyscale.
        cache_dir: Folder for the downloaded archive and the ``.npz`` caches of decoded
            arrays (in its ``arrays/`` subfolder). ``None`` (or ``""``) means
            :func:`~pollen.data.cache.default_cache_dir`.
        download: Whether to download CIFAR-10 when ``data_dir`` is ``None`` and the archive
            is not in ``cache_dir``. Default true.
        url: Where to download CIFAR-10 from. Default :data:`pollen.data.cifar10.CIFAR10_URL`.
        sha256: Expected SHA-256 of a file named ``cifar-10-python.tar.gz`` (downloaded or
            given). Default :data:`pollen.data.cifar10.CIFAR10_SHA256`.

    Returns:
        The dataset, with ``x_*`` of dtype ``uint8`` and shape ``(N, *image_size, channels)``
        and ``y_*`` of dtype ``int64``.

    Raises:
        PollenError: If the data is missing, unrecognised, corrupt or cannot be downloaded,
            or an argument is invalid.
    """
    size = check_image_size(image_size)
    check_channels(channels)
    if cache_dir is None or not str(cache_dir).strip():
        cache = default_cache_dir()
    else:
        cache = Path(cache_dir).expanduser()
    options = LoadOptions(
        image_size=size,
        channels=channels,
        cache_dir=cache,
        download=download,
        url=cifar10.CIFAR10_URL if url is None else url,
        sha256=cifar10.CIFAR10_SHA256 if sha256 is None else sha256,
    )
    if data_dir is None or not str(data_dir).strip():
        # An empty setting (e.g. data-dir = "" in a run config) means "none".
        source, path = DEFAULT_SOURCE, cache
    else:
        source, path = _pick_source(Path(data_dir).expanduser())
    try:
        return source.load(path, options)
    except LayoutError as exc:
        raise PollenError(f"{exc} {layouts_help()}") from None


def is_cifar10(data_dir: str | Path | None) -> bool:
    """Whether ``data_dir`` is CIFAR-10: ``None``/"" (the default) or a CIFAR-10 archive/folder.

    Cheap (no image is decoded) and never raises: a path that does not exist or that no
    source claims is not CIFAR-10 (:func:`load_dataset` reports it when it loads).
    """
    if data_dir is None or not str(data_dir).strip():
        return True
    try:
        source, _ = _pick_source(Path(data_dir).expanduser())
    except (PollenError, OSError):
        return False
    return source in (cifar10.ARCHIVE, cifar10.FOLDER)


def native_image_size(data_dir: str | Path | None) -> tuple[int, int] | None:
    """``(height, width)`` of the first training image at ``data_dir``, or ``None``.

    CIFAR-10 (also ``None``/"") is 32x32. Cheap (one image header) and never raises: data
    that cannot be read is reported when :func:`load_dataset` loads it.
    """
    if is_cifar10(data_dir):
        return CIFAR10_IMAGE_SIZE
    try:
        source, path = _pick_source(Path(str(data_dir)).expanduser())
        return source.native_size(path)
    except (PollenError, OSError):
        return None


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


def layouts_help() -> str:
    """Return the sentence listing every accepted layout, numbered, default first."""
    layouts = [DEFAULT_SOURCE.layout, *(source.layout for source in SOURCES)]
    return "Pollen accepts: " + "; ".join(f"({i}) {t}" for i, t in enumerate(layouts, 1)) + "."


def _pick_source(path: Path) -> tuple[Source, Path]:
    """Return the source that claims ``path`` and the path it will load.

    Every source's ``recognise`` is asked in :data:`SOURCES` order, then every ``fallback``.
    """
    if not path.exists():
        raise PollenError(
            f"The data path {path} does not exist. Check the spelling of --data-dir, or leave "
            f"it out to use CIFAR-10 from the cache folder. {layouts_help()}"
        )
    if not path.is_file() and not path.is_dir():
        raise PollenError(f"The data path {path} is neither a file nor a folder. {layouts_help()}")
    claims = [(s, s.recognise) for s in SOURCES] + [(s, s.fallback) for s in SOURCES]
    for source, claim in claims:
        target = claim(path)
        if target is not None:
            return source, target
    if path.is_file():
        kinds = " or ".join(s.file_kind for s in SOURCES if s.file_kind) or "a data file"
        raise PollenError(f"The data path {path} is a file but not {kinds}. {layouts_help()}")
    raise PollenError(
        f"The data folder {path} does not have a layout Pollen recognises: it contains "
        f"{_summarise_folder(path)}. {layouts_help()}"
    )


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
