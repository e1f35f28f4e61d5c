"""Fixed features computed once: a model's weightless prefix, cached in memory and on disk.

A model may start with a *fixed* transform: layers without weights that look
at no data, ending in the layer named
:data:`~pollen.models.registry.FIXED_FEATURES` (``scatternet``'s scattering
transform + per-image GroupNorm). Its output for an image never changes during
a run, so training and evaluation compute it once per image set
(:func:`cached_features`) and run only the layers after it (:func:`split_fixed`).

The cache has two levels:

- in this process, the newest arrays up to :data:`MAX_MEMORY_BYTES`;
- on disk, in ``<cache folder>/features/`` (``POLLEN_CACHE_DIR``, see
  :func:`pollen.data.cache.default_cache_dir`), one ``.npy`` file per image
  set, read back memory-mapped: the processes of a simulation share one copy
  through the page cache, and a second run skips the transform. The folder is
  kept under :data:`MAX_DISK_BYTES` (oldest files removed first).

The key is a hash of the images' bytes and of the transform's layer
configuration, so other images or another transform never hit the same
entry. The features are derived from the client's own images and stay on the
client's disk, like the decoded-array cache beside them. A cache is only an
optimisation: an unreadable file is recomputed, a failed write only logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import keras
import numpy as np

from pollen.data.cache import default_cache_dir
from pollen.models.registry import FIXED_FEATURES

log = logging.getLogger(__name__)

#: Feature bytes kept in this process (the newest arrays; a memory-mapped file costs none).
MAX_MEMORY_BYTES = 4 << 30
#: Feature bytes kept on disk in ``<cache folder>/features/`` (oldest files removed first).
MAX_DISK_BYTES = 32 << 30
#: Images per forward pass of the transform.
BATCH = 500
#: Images transformed before their features are written out (bounds the memory it takes).
CHUNK = 5000

_MEMORY: dict[str, np.ndarray] = {}


def split_fixed(model: keras.Model) -> tuple[keras.Model, keras.Model] | None:
    """``(transform, head)`` of a model with a fixed prefix, else ``None``.

    ``transform`` maps the model's inputs to the output of the layer named
    :data:`FIXED_FEATURES`; ``head`` maps those features to the model's
    outputs through the layers after it, sharing their weights with
    ``model`` (training the head trains the model). Both are built once per
    model object.
    """
    names = [layer.name for layer in model.layers]
    if FIXED_FEATURES not in names:
        return None
    cached = getattr(model, "_pollen_fixed_split", None)
    if cached is not None:
        return cached
    end = model.get_layer(FIXED_FEATURES)
    transform = keras.Model(model.inputs, end.output, name=f"{model.name}_fixed")
    inputs = keras.Input(tuple(end.output.shape[1:]), name="features")
    x = inputs
    for layer in model.layers[names.index(FIXED_FEATURES) + 1 :]:
        x = layer(x)
    split = (transform, keras.Model(inputs, x, name=f"{model.name}_head"))
    model._pollen_fixed_split = split
    return split


def _key(transform: keras.Model, x: np.ndarray) -> str:
    """Hash of the images (shape, dtype, bytes) and the transform's layers."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(json.dumps([str(x.dtype), list(x.shape)]).encode())
    configs = [(type(layer).__name__, layer.get_config()) for layer in transform.layers]
    digest.update(json.dumps(configs, sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(x).data)
    return digest.hexdigest()


def _remember(key: str, features: np.ndarray) -> None:
    if isinstance(features, np.memmap):  # pages belong to the page cache, not this process
        _MEMORY[key] = features
        return
    while _MEMORY and sum(a.nbytes for a in _MEMORY.values()) + features.nbytes > MAX_MEMORY_BYTES:
        del _MEMORY[next(iter(_MEMORY))]
    _MEMORY[key] = features


def _read(path: Path, n: int) -> np.ndarray | None:
    """The cached features at ``path`` (memory-mapped), or None if absent or unusable."""
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        if path.exists():
            log.warning("Recomputing the features cached in %s: %s", path, exc)
        return None
    return features if features.dtype == np.float32 and len(features) == n else None


def _make_room(folder: Path, needed: int) -> None:
    """Remove the oldest cached feature files until ``needed`` more bytes fit the bound."""
    files = sorted(folder.glob("*.npy"), key=lambda f: f.stat().st_mtime)
    total = sum(f.stat().st_size for f in files) + needed
    while files and total > MAX_DISK_BYTES:
        oldest = files.pop(0)
        total -= oldest.stat().st_size
        oldest.unlink(missing_ok=True)


def _compute(transform: keras.Model, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``transform(x)`` into ``out``, :data:`CHUNK` images at a time (bounded memory)."""
    for start in range(0, len(x), CHUNK):
        chunk = x[start : start + CHUNK]
        out[start : start + len(chunk)] = transform.predict(chunk, batch_size=BATCH, verbose=0)
    return out


def _compute_to_disk(transform: keras.Model, x: np.ndarray, path: Path) -> np.ndarray | None:
    """Compute the features straight into ``path`` and map them back; None if it cannot write."""
    shape = (len(x), *(int(d) for d in transform.output.shape[1:]))
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _make_room(path.parent, 4 * int(np.prod(shape)))
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        _compute(transform, x, out)
        out.flush()
        del out
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("Could not cache features in %s: %s", path.parent, exc)
        tmp.unlink(missing_ok=True)
        return None
    return _read(path, len(x))


def cached_features(
    transform: keras.Model, x: np.ndarray, cache_dir: Path | None = None
) -> np.ndarray:
    """``transform(x)`` as ``float32``, computed once per image set (memory, then disk).

    The transform runs :data:`CHUNK` images at a time, written straight into
    the cache file, so a client never holds its features twice in memory.

    Args:
        transform: A fixed transform (:func:`split_fixed`).
        x: Images, ``(N, H, W, C)``.
        cache_dir: The cache folder (default: :func:`pollen.data.cache.default_cache_dir`).

    Returns:
        ``(N, *feature_shape)`` features, read-only and memory-mapped when the
        disk cache could be used.
    """
    key = _key(transform, x)
    hit = _MEMORY.get(key)
    if hit is not None:
        return hit
    path = (cache_dir or default_cache_dir()) / "features" / f"{key}.npy"
    features = _read(path, len(x))
    if features is None:
        features = _compute_to_disk(transform, x, path)
    if features is None:  # no disk cache: this process keeps them
        shape = (len(x), *(int(d) for d in transform.output.shape[1:]))
        features = _compute(transform, x, np.empty(shape, np.float32))
    _remember(key, features)
    return features


__all__ = ["MAX_DISK_BYTES", "MAX_MEMORY_BYTES", "cached_features", "split_fixed"]
