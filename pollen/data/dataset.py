"""What every data source returns and how it plugs into :func:`~pollen.data.load.load_dataset`.

* :class:`Dataset`: the in-memory result, ``uint8`` images ``(N, H, W, C)`` and ``int64``
  labels for a train and a test split.
* :class:`LoadOptions`: the checked arguments of ``load_dataset`` a source loads with.
* :class:`Source`: one kind of data (how a path is recognised, how it is loaded, how it is
  described to the user); :data:`pollen.data.load.SOURCES` lists them.
* :class:`LayoutError`: raised by a source when the data is not laid out as it expects;
  ``load_dataset`` adds the list of accepted layouts to the message.
* :func:`check_image_size` and :func:`check_channels`: the argument checks every entry
  point shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pollen.errors import PollenError

__all__ = [
    "Dataset",
    "LayoutError",
    "LoadOptions",
    "Source",
    "check_channels",
    "check_image_size",
]


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


@dataclass(frozen=True)
class LoadOptions:
    """The checked arguments of :func:`~pollen.data.load.load_dataset`, as sources get them.

    Attributes:
        image_size: ``(height, width)`` the returned images must have (resize when needed).
        channels: 3 for RGB or 1 for greyscale.
        cache_dir: Folder for downloads and the ``.npz`` caches of decoded arrays
            (see :mod:`pollen.data.cache`).
        download: Whether a source may download missing data (CIFAR-10 does).
        url: Where to download CIFAR-10 from.
        sha256: Expected SHA-256 (hex) of a file named ``cifar-10-python.tar.gz``.
    """

    image_size: tuple[int, int]
    channels: int
    cache_dir: Path
    download: bool
    url: str
    sha256: str


def _never(path: Path) -> Path | None:
    """A recogniser that claims nothing."""
    return None


def _unknown_size(path: Path) -> tuple[int, int] | None:
    """A size probe that knows nothing."""
    return None


@dataclass(frozen=True)
class Source:
    """One kind of data :func:`~pollen.data.load.load_dataset` reads.

    ``load_dataset`` offers the user's path to every source in
    :data:`~pollen.data.load.SOURCES`, in order, through ``recognise``; when none claims
    it, through ``fallback``, in the same order. The first claim wins.

    Attributes:
        layout: How the user lays this data out, as one phrase of the help text
            "Pollen accepts: (1) ...; (2) ...", for example ``"an image folder with
            train/<class>/<images> and ..."``.
        load: ``load(path, options)`` returns the :class:`Dataset` at ``path`` (the path a
            recogniser returned) with ``options.image_size`` and ``options.channels``.
            Raises :class:`~pollen.errors.PollenError` for problems the user can fix, or
            :class:`LayoutError` when the data is not laid out as this source expects.
        recognise: ``recognise(path)`` returns the path to load when ``path`` (an existing
            file or folder) is this kind of data, else ``None``. It should be cheap: look at
            names, not contents. Default: claims nothing.
        fallback: Like ``recognise``, but asked only after every source's ``recognise``
            declined; for weak evidence such as "a folder that holds a file of this kind".
            Default: claims nothing.
        native_size: ``native_size(path)`` returns ``(height, width)`` of the first
            training image at ``path`` (a recogniser's path), read from its header only, or
            ``None`` when unknown; ``image-size = "auto"`` never upsamples past it.
            Default: unknown.
        file_kind: What a file of this kind is called, for the message about a file no
            source recognises (``"The data path X is a file but not <file_kind>."``);
            ``None`` for sources that only read folders.
    """

    layout: str
    load: Callable[[Path, LoadOptions], Dataset]
    recognise: Callable[[Path], Path | None] = _never
    fallback: Callable[[Path], Path | None] = _never
    native_size: Callable[[Path], tuple[int, int] | None] = _unknown_size
    file_kind: str | None = None


class LayoutError(PollenError):
    """The data is not laid out as its source expects.

    :func:`~pollen.data.load.load_dataset` re-raises it as a
    :class:`~pollen.errors.PollenError` with the list of accepted layouts appended.
    """


def check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    """Check an image size and return it as ``(height, width)`` ints.

    Args:
        image_size: Two positive whole numbers, ``(height, width)``.

    Returns:
        ``(height, width)``.

    Raises:
        PollenError: If it is not two whole numbers of at least 1.
    """
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


def check_channels(channels: int) -> None:
    """Check a channel count.

    Args:
        channels: 3 (colour) or 1 (greyscale).

    Raises:
        PollenError: If it is anything else.
    """
    if channels not in (1, 3):
        raise PollenError(
            f"The number of image channels must be 3 (colour) or 1 (greyscale), not {channels!r}."
        )
