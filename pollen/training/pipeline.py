"""Input pipelines: batches of in-memory images and labels for ``fit``, ``evaluate``, ``predict``.

Everything here works on ``uint8`` image arrays of shape ``(N, 32, 32, 3)``
and ``int64`` labels of shape ``(N,)``. On a CPU, batches come from
``tf.data`` with prefetching so the next batch is ready while the current one
trains; on an accelerator (and wherever TensorFlow is not installed) the
arrays live on the device and each batch is one gather there
(:class:`DeviceBatches`). Which one :func:`pollen.backend.feeds_on_device` decides.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from pollen.backend import feeds_on_device

#: Largest random translation (pixels, each way) of ``make_dataset(augment=True)``
#: (per-image shifts: see docs/performance.md#augmentation).
MAX_SHIFT = 2


def _on_one_thread(ds):
    """Run a ``tf.data`` pipeline on one private thread, with tf.data's autotuner off.

    The pipelines here are light (a gather, a flip, a crop per batch) beside the
    training step they feed. Under the autotuner (``AUTOTUNE`` parallelism and
    buffers, tf.data's shared thread pool), simulated clients sharing two cores
    often fell into a slow mode (see docs/performance.md#tfdata-threads).
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Map positions in ``[-size+1, 2*size-2]`` into ``[0, size)`` by reflection at the borders.

    The same border rule as ``tf.pad(mode="REFLECT")``: the edge pixel is not repeated.
    """
    index = np.abs(index)
    return np.where(index >= size, 2 * (size - 1) - index, index)


class DeviceBatches(keras.utils.PyDataset):
    """Batches gathered on the backend's device from arrays kept there.

    The whole ``uint8`` image array is copied to the device once; a batch is
    then one gather from it, with the augmentation (a per-image flip and
    shift, the same as :func:`make_dataset`'s ``tf.data`` pipeline) folded
    into the gather's indices, which the host computes with numpy: only
    ``B * H * W`` indices cross to the device per batch. Keras's ``fit``,
    ``evaluate`` and ``predict`` take it like any ``PyDataset`` (one worker,
    in the training thread).

    Why not a library loader: ``tf.data`` keeps batches on the host (and may
    not be installed beside torch or JAX on a GPU machine), and
    ``torch.utils.data`` collates images one by one on the CPU; neither keeps
    the data on the accelerator.

    Args:
        x: ``uint8`` images, ``(N, H, W, C)``.
        y: Labels, ``(N,)``, or None (batches are then ``(images,)``, for ``predict``).
        batch_size: Examples per batch; the last batch may be smaller.
        shuffle: A new seeded order every epoch.
        seed: Shuffle and augmentation seed.
        augment: Per image, a random horizontal flip and a random translation of
            up to :data:`MAX_SHIFT` pixels each way (borders reflected).
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray | None,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        n, self._h, self._w, self._c = x.shape
        self._n, self._batch_size = n, int(batch_size)
        self._index_dtype = "int32" if n * self._h * self._w < 2**31 else "int64"
        # (N*H*W, C): one pixel a row, so a batch with any crop is a single row gather.
        self._pixels = keras.ops.convert_to_tensor(np.reshape(x, (-1, self._c)))
        self._labels = None if y is None else keras.ops.convert_to_tensor(np.asarray(y, "int32"))
        self._shuffle, self._augment = shuffle, augment
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(n) if shuffle else np.arange(n)

    def __len__(self) -> int:
        return math.ceil(self._n / self._batch_size)

    def __getitem__(self, i: int):
        positions = self._order[i * self._batch_size : (i + 1) * self._batch_size]
        rows, cols = np.arange(self._h)[None], np.arange(self._w)[None]  # (1, H), (1, W)
        if self._augment:
            b = len(positions)
            shift = self._rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(2, b, 1))
            rows = _reflect(rows + shift[0], self._h)
            cols = _reflect(cols + shift[1], self._w)
            flip = self._rng.random((b, 1)) < 0.5
            cols = np.where(flip, cols[:, ::-1], cols)
        pixel = (
            positions[:, None, None] * (self._h * self._w)
            + rows[:, :, None] * self._w
            + cols[:, None, :]
        )  # (B, H, W): row of each output pixel in self._pixels
        index = keras.ops.convert_to_tensor(pixel.reshape(-1).astype(self._index_dtype))
        images = keras.ops.reshape(
            keras.ops.take(self._pixels, index, axis=0), (len(positions), self._h, self._w, self._c)
        )
        if self._labels is None:
            return (images,)
        labels = keras.ops.take(
            self._labels, keras.ops.convert_to_tensor(positions.astype(self._index_dtype)), axis=0
        )
        return images, labels

    def on_epoch_end(self) -> None:  # noqa: D102
        if self._shuffle:
            self._order = self._rng.permutation(self._n)


def _flip_and_shift(ds, h: int, w: int, seed: int):
    """Map ``tf.data`` batches of ``(images, labels)`` through a per-image flip and shift.

    Each image is mirrored with probability 1/2, then cropped back to ``h x w``
    from its reflection-padded self at a random offset of up to
    :data:`MAX_SHIFT` pixels each way.
    """
    import tensorflow as tf

    pad = MAX_SHIFT
    rng = tf.random.Generator.from_seed(seed)

    def aug(xb, yb):
        n = tf.shape(xb)[0]
        xb = tf.where(rng.uniform([n, 1, 1, 1]) < 0.5, tf.reverse(xb, axis=[2]), xb)
        padded = tf.pad(xb, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        # A crop window per image, as two batched gathers (rows, then columns).
        top = rng.uniform([n, 1], 0, 2 * pad + 1, dtype=tf.int32) + tf.range(h)[None]
        left = rng.uniform([n, 1], 0, 2 * pad + 1, dtype=tf.int32) + tf.range(w)[None]
        xb = tf.gather(padded, top, axis=1, batch_dims=1)
        return tf.gather(xb, left, axis=2, batch_dims=1), yb

    return ds.map(aug)


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool = False,
    on_device: bool | None = None,
):
    """Build batches over in-memory arrays for ``fit`` / ``evaluate``.

    A prefetching ``tf.data.Dataset``, or :class:`DeviceBatches` where
    :func:`feeds_on_device` says so (or ``on_device`` forces it).

    Args:
        x: ``uint8`` images, ``(N, H, W, C)``.
        y: ``int64`` labels, ``(N,)``.
        batch_size: Examples per batch; the last batch may be smaller.
        shuffle: Reshuffle the whole array every epoch (seeded).
        seed: Shuffle and augmentation seed.
        augment: Per image, a random horizontal flip and a random translation
            of up to :data:`MAX_SHIFT` pixels each way (borders reflected).
        on_device: Force (True) or forbid (False) :class:`DeviceBatches`;
            None = :func:`feeds_on_device`.

    Returns:
        Batches of ``(images (B, H, W, C) in 0-255, labels (B,))``, images in
        the dtype of ``x``: registry models cast inside (their first layer
        rescales), so ``uint8`` batches cross into the model 4x smaller.
    """
    if feeds_on_device() if on_device is None else on_device:
        return DeviceBatches(x, y, batch_size, shuffle=shuffle, seed=seed, augment=augment)
    import tensorflow as tf

    # Shuffle and batch positions, then gather each batch's images at once: cheaper than
    # shuffling and batching the images one by one (a full-size shuffle buffer of
    # images also copies the whole array before the first batch).
    images, labels = tf.constant(x), tf.constant(y)
    ds = tf.data.Dataset.range(len(x))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def gather(positions):
        return tf.gather(images, positions), tf.gather(labels, positions)

    ds = ds.map(gather)
    if augment:
        ds = _flip_and_shift(ds, int(x.shape[1]), int(x.shape[2]), seed)
    return _on_one_thread(ds.prefetch(2))


def image_batches(x: np.ndarray, batch_size: int):
    """Batches of images alone, in order, for ``predict``.

    Args:
        x: Images, ``(N, H, W, C)``, any numeric dtype (0-255).
        batch_size: Images per batch; the last batch may be smaller.

    Returns:
        :class:`DeviceBatches` of ``(images,)`` where :func:`feeds_on_device`
        says so, else a prefetching ``tf.data.Dataset`` of image batches.
    """
    if feeds_on_device():
        return DeviceBatches(x, None, batch_size)
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
    return _on_one_thread(ds.prefetch(2))
