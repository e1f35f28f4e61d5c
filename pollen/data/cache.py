"""The cache folder, and the ``.npz`` cache of decoded datasets in it.

Decoded arrays are cached as uncompressed ``.npz`` files in ``<cache folder>/arrays/``,
keyed by the source path, the requested image size and channels, and whatever the source
puts in its key (typically the names, sizes and modification times of its files), so a
second load is fast and any change to the data is picked up. A cache is only an
optimisation: an unreadable cache file is rebuilt, and a failed write only logs a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pollen.data.dataset import Dataset
from pollen.errors import PollenError
from pollen.files import atomic_writer

__all__ = ["cache_file", "cached", "default_cache_dir", "file_signature", "make_cache_dir"]

log = logging.getLogger(__name__)

_CACHE_VERSION = 1  # bump when the decoding changes, to invalidate old .npz caches


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


def make_cache_dir(path: Path) -> None:
    """Create the cache folder ``path`` (and its parents) if missing.

    Raises:
        PollenError: If it cannot be created.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PollenError(
            f"Could not create the cache folder {path}: {exc.strerror or exc}. Choose a "
            "writable folder with --cache-dir or the POLLEN_CACHE_DIR environment variable."
        ) from None


def file_signature(path: Path) -> list[Any]:
    """Return ``[size in bytes, modification time in ns]`` of ``path``, for cache keys."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def cache_file(
    cache_dir: Path, kind: str, source: Path, size: tuple[int, int], channels: int, key: Any
) -> Path:
    """Return the ``.npz`` cache file for decoding ``source`` at ``size`` and ``channels``.

    The name is ``<kind>-<source id>-<content id>.npz`` in ``cache_dir/arrays/``: the source
    id hashes the resolved path, size and channels; the content id hashes ``key`` (any
    JSON-able value: file names, sizes, mtimes...), so it changes whenever the data does,
    and :func:`cached` then removes the stale file with the same source id.
    """
    source_blob = json.dumps([str(source.resolve()), list(size), channels]).encode()
    source_id = hashlib.sha256(source_blob).hexdigest()[:12]
    blob = json.dumps([_CACHE_VERSION, key], sort_keys=True, default=str).encode()
    key_id = hashlib.sha256(blob).hexdigest()[:20]
    return cache_dir / "arrays" / f"{kind}-{source_id}-{key_id}.npz"


def cached(path: Path, build: Callable[[], Dataset]) -> Dataset:
    """Return the dataset cached at ``path``, else ``build()`` it and cache it there.

    Args:
        path: The cache file, from :func:`cache_file`.
        build: Decodes the dataset; called only when ``path`` is missing or unreadable.
            Its exceptions propagate and nothing is cached.

    Returns:
        The dataset (``uint8`` images, ``int64`` labels).
    """
    ds = _read_cache(path)
    if ds is None:
        ds = build()
        _write_cache(path, ds)
    return ds


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
