"""Image folders: ``train/<class>/*`` and ``test/<class>/*``.

Class names are the sorted subfolder names of ``train/`` (label ``i`` is the ``i``-th);
``test/`` may have fewer classes but no others. Every file with an extension Pillow can open
is used; hidden files and folders and other files are ignored. Images are decoded by
:func:`pollen.data.decode.decode_files` and cached as ``.npz`` (see
:mod:`pollen.data.cache`), keyed by every file's name, size and modification time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pollen.data.cache import cache_file, cached, file_signature
from pollen.data.dataset import Dataset, LayoutError, LoadOptions, Source
from pollen.data.decode import decode_files, header_size, image_extensions
from pollen.errors import PollenError

__all__ = ["MIN_TRAIN_IMAGES_PER_CLASS", "SOURCE", "check_class_sizes", "check_splits"]

log = logging.getLogger(__name__)

#: Fewest training images a class may have: a class seen once cannot be learnt, and a
#: single image is more often a stray file or a typo in a label than a class.
MIN_TRAIN_IMAGES_PER_CLASS = 2


def _list_split(root: Path, split: str, extensions: frozenset[str]) -> dict[str, list[Path]]:
    """Return ``{class name: sorted image files}`` of ``root/split``, classes sorted.

    A link (folder or file) that leads outside ``root`` is refused (:func:`_inside`).
    """
    folder = root / split
    if not folder.is_dir():
        other = "test" if split == "train" else "train"
        raise LayoutError(
            f"The image folder {root} has a {other}/ folder but no {split}/ folder. An image "
            f"folder needs both train/<class>/<images> and test/<class>/<images>."
        )
    real_root = root.resolve()
    classes: dict[str, list[Path]] = {}
    try:
        _inside(folder, root, real_root)
        for sub in sorted(folder.iterdir(), key=lambda p: p.name):
            if sub.is_dir() and not sub.name.startswith("."):
                _inside(sub, root, real_root)
                files = _images(sub, root, real_root, extensions)
                classes[sub.name] = sorted(files, key=lambda p: p.name)
    except OSError as exc:
        raise PollenError(f"Could not list the folder {folder}: {exc.strerror or exc}.") from None
    return classes


def _images(folder: Path, root: Path, real_root: Path, extensions: frozenset[str]) -> list[Path]:
    """The image files of ``folder``; hidden and other files left out, links checked."""
    files = []
    with os.scandir(folder) as entries:  # file types without a stat per file
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(".") or path.suffix.lower() not in extensions:
                continue
            if entry.is_file():
                if entry.is_symlink():
                    _inside(path, root, real_root)
                files.append(path)
    return files


def _inside(path: Path, root: Path, real_root: Path) -> None:
    """Refuse ``path`` if it is a link that leads outside the data folder ``root``.

    Only files of the data folder are read: a link inside it may lead to another of its
    files, never elsewhere (a data folder someone else made could otherwise have Pollen
    read any file of this machine into its training data).
    """
    if not path.is_symlink():
        return
    real = path.resolve()
    if not real.is_relative_to(real_root):
        raise PollenError(
            f"{path} is a link that leads outside the data folder {root} (to {real}). Pollen "
            "reads only files inside the data folder: replace the link with the file itself, "
            "or point --data-dir at the folder that holds the real files."
        )


def check_splits(
    root: Path, train: Mapping[str, Sequence[object]], test: Mapping[str, Sequence[object]]
) -> None:
    """Raise a PollenError unless every class has training images and test is usable.

    ``train`` and ``test`` map each class folder of ``root/train`` and ``root/test`` to its
    images (any kind of item: files, archive entries); the messages name ``root``.
    """
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
    check_class_sizes(train, test, str(root / "train"), str(root / "test"))


def check_class_sizes(
    train: Mapping[str, Sequence[object]],
    test: Mapping[str, Sequence[object]],
    train_where: str,
    test_where: str,
) -> None:
    """Refuse a class with a single training image; warn about classes missing in test.

    ``train_where`` and ``test_where`` name the folders or files in the messages.

    Raises:
        PollenError: A class has fewer than :data:`MIN_TRAIN_IMAGES_PER_CLASS` training
            images.
    """
    few = [name for name, items in train.items() if 0 < len(items) < MIN_TRAIN_IMAGES_PER_CLASS]
    if few:
        raise PollenError(
            f"The class(es) {', '.join(few)} in {train_where} have a single training image; "
            f"every class needs at least {MIN_TRAIN_IMAGES_PER_CLASS} (a few dozen to learn it "
            "well). Add images of those classes, or remove them from the data."
        )
    untested = [name for name in train if not test.get(name)]
    if untested:
        log.warning(
            "The class(es) %s of %s have no test images in %s: the test accuracy says nothing "
            "about them. Add held-out images of those classes to measure them.",
            ", ".join(untested),
            train_where,
            test_where,
        )


def _load(root: Path, options: LoadOptions) -> Dataset:
    size, channels = options.image_size, options.channels
    extensions = image_extensions()
    train = _list_split(root, "train", extensions)
    test = _list_split(root, "test", extensions)
    check_splits(root, train, test)
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
        "files": [[str(f.relative_to(root)), *file_signature(f)] for f in train_files + test_files],
    }

    def build() -> Dataset:
        x_train = decode_files(train_files, size, channels, "Decoding training images")
        x_test = decode_files(test_files, size, channels, "Decoding test images")
        return Dataset(x_train, y_train, x_test, y_test, class_names)

    return cached(cache_file(options.cache_dir, "images", root, size, channels, key), build)


def _recognise(path: Path) -> Path | None:
    return path if (path / "train").is_dir() or (path / "test").is_dir() else None


def _native_size(root: Path) -> tuple[int, int] | None:
    """The size of the first image of the first class of ``train/`` (header only)."""
    extensions = image_extensions()
    try:
        for sub in sorted((root / "train").iterdir(), key=lambda p: p.name):
            if sub.is_dir() and not sub.name.startswith("."):
                for path in sorted(sub.iterdir(), key=lambda p: p.name):
                    if not path.name.startswith(".") and path.suffix.lower() in extensions:
                        return header_size(path)
    except OSError:
        return None
    return None


SOURCE = Source(
    layout=(
        "an image folder with train/<class>/<images> and test/<class>/<images>, where each "
        "subfolder name is a class name"
    ),
    load=_load,
    recognise=_recognise,
    native_size=_native_size,
)
"""An image folder with ``train/<class>/*`` and ``test/<class>/*``."""
