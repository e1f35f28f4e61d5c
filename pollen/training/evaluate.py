"""Evaluation on one client: class probabilities, loss and accuracy, BatchNorm re-estimation.

Works on a Keras model from :mod:`pollen.models.registry` (compiled, for
:func:`evaluate`) and on in-memory ``uint8`` images of shape
``(N, 32, 32, 3)`` with ``int64`` labels of shape ``(N,)``.
"""

from __future__ import annotations

import keras
import numpy as np

from pollen.compat.keras import flatten_layers
from pollen.models.registry import batchnorm_stat_indices
from pollen.training.features import cached_features, split_fixed
from pollen.training.pipeline import image_batches, make_dataset

#: Pixels per image that the batch sizes of this module are given for (32x32): larger
#: images go through in proportionally smaller batches, so the activations of one forward
#: pass stay the same size (mobilenetv2 at 224x224 holds about 5 MB of activations per image
#: in one layer; 256 of them would be 1.2 GB) (see docs/images.md#memory).
BATCH_PIXELS = 32 * 32


def images_per_pass(batch_size: int, x: np.ndarray) -> int:
    """``batch_size`` scaled down for images larger than 32x32; at least 8 (or ``batch_size``)."""
    pixels = int(x.shape[1]) * int(x.shape[2]) if x.ndim == 4 else BATCH_PIXELS
    return max(min(batch_size, 8), batch_size * BATCH_PIXELS // max(pixels, BATCH_PIXELS))


def predict_proba(
    model: keras.Model, x: np.ndarray, *, flip_tta: bool = False, batch_size: int = 256
) -> np.ndarray:
    """Class probabilities of a model that ends in a softmax.

    Args:
        model: Model mapping ``(N, H, W, C)`` pixels to ``(N, classes)`` probabilities.
        x: Images, ``(N, H, W, C)``, any numeric dtype (0-255).
        flip_tta: Average the probabilities of each image and of its mirror
            image (test-time augmentation; costs a second forward pass; see
            docs/performance.md#flip-tta).
        batch_size: Images per forward pass.

    Returns:
        ``float32`` probabilities, ``(N, classes)``.
    """
    split = split_fixed(model)

    def run(images: np.ndarray) -> np.ndarray:
        if split is not None:  # a fixed transform: its features once per image set, then the head
            transform, head = split
            features = cached_features(transform, images)
            return np.asarray(head.predict(features, batch_size=1024, verbose=0), np.float32)
        ds = image_batches(images, images_per_pass(batch_size, images))
        return np.asarray(model.predict(ds, verbose=0), dtype=np.float32)

    probs = run(x)
    if flip_tta:
        probs = 0.5 * (probs + run(np.ascontiguousarray(x[:, :, ::-1])))
    return probs


def evaluate(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 256,
    flip_tta: bool = False,
) -> tuple[float, float]:
    """Return ``(loss, accuracy)`` of a compiled model on ``(x, y)``.

    Without ``flip_tta`` both come from the model's compiled loss and metric
    (for a model with a fixed prefix, :mod:`pollen.training.features`, from its
    head on cached features: the cross-entropy and arg-max accuracy below).
    With it (see :func:`predict_proba`) the loss is the cross-entropy of the
    averaged probabilities and the accuracy that of their arg-max.

    Args:
        model: Compiled model with an accuracy metric.
        x: ``uint8`` images, ``(N, H, W, C)``.
        y: ``int64`` labels, ``(N,)``.
        batch_size: Images per forward pass.
        flip_tta: Also average over mirror images.

    Returns:
        ``(loss, accuracy)``, accuracy in [0, 1]; ``(nan, nan)`` for no
        examples with ``flip_tta``.
    """
    if not flip_tta and split_fixed(model) is None:
        batches = make_dataset(x, y, images_per_pass(batch_size, x))
        loss, accuracy = model.evaluate(batches, verbose=0)
        return float(loss), float(accuracy)
    if len(y) == 0:
        return float("nan"), float("nan")
    probs = predict_proba(model, x, flip_tta=flip_tta, batch_size=batch_size)
    labels = np.asarray(y, dtype=np.int64)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(-np.mean(np.log(picked))), float(np.mean(probs.argmax(axis=1) == labels))


def calibrate_batchnorm(
    model: keras.Model,
    x: np.ndarray,
    *,
    max_examples: int = 2000,
    seed: int = 0,
    chunk_size: int = 256,
) -> tuple[list[int], list[np.ndarray], int]:
    """Re-estimate BatchNorm moving statistics for the model's current weights.

    Averaging the weights of several clients also averages their BatchNorm
    moving statistics, but those described each client's own weights, not
    the averaged ones: the averaged model then scores far below either
    client. Forward passes in training mode over ``max_examples`` local
    images (no weight update) give every BatchNorm layer the mean and
    variance of its inputs under the new weights; those become the moving
    statistics. The images go through in near-equal chunks and the layers
    keep the running average of the chunks' statistics (momentum ``k/(k+1)``
    for chunk ``k``): the mean is exact, the variance misses only the spread
    of the chunk means, and small chunks run faster on a CPU than one large
    batch (see docs/performance.md#batchnorm-calibration).

    Args:
        model: Model whose BatchNorm statistics are replaced in place.
        x: ``uint8`` local training images, ``(N, H, W, C)``.
        max_examples: Images used (a seeded random subset if ``N`` is larger).
        seed: Subset seed.
        chunk_size: Largest number of images per forward pass.

    Returns:
        ``(indices, arrays, n)``: positions in ``model.get_weights()`` of the
        statistics, their new values, and the number of images used.
    """
    indices = batchnorm_stat_indices(model)
    if not indices or max_examples <= 0 or len(x) == 0:
        return indices, [], 0
    if len(x) > max_examples:
        pick = np.random.default_rng(seed).choice(len(x), max_examples, replace=False)
        x = x[np.sort(pick)]
    bn_layers = [
        layer
        for layer in flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    saved = [layer.momentum for layer in bn_layers]
    chunks = np.array_split(x, -(-len(x) // max(images_per_pass(chunk_size, x), 1)))
    try:
        for k, chunk in enumerate(chunks):
            for layer in bn_layers:  # chunk 0: momentum 0, moving stats := its stats
                layer.momentum = k / (k + 1)
            model(chunk.astype("float32"), training=True)
    finally:
        for layer, momentum in zip(bn_layers, saved, strict=True):
            layer.momentum = momentum
    weights = model.get_weights()
    return indices, [weights[i] for i in indices], len(x)
