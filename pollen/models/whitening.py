"""Whitening of a model's first convolution: its kernel from the principal components of patches."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pollen.models.registry import find_layer

if TYPE_CHECKING:  # keras is imported where a model is built
    import keras

#: Most image pixels whitening looks at: 2,000 images of 32x32. Larger images are fewer
#: (96x96: 222 images; 224x224: 40), so memory and time stay those of 32x32.
WHITEN_PIXELS = 2000 * 32 * 32


def whitening_kernel(
    images: np.ndarray, kernel_size: int, filters: int, eps: float = 5e-4
) -> np.ndarray:
    """A convolution kernel whose outputs are the whitened principal components of patches.

    The ``filters // 2`` directions of largest variance among the images'
    ``kernel_size x kernel_size`` patches, each scaled to unit variance, and
    their negatives (so a following ReLU keeps both signs). Starting the
    first convolution here instead of at random decorrelates the features the
    rest of the network learns from (see docs/performance.md#whitening). The
    idea is from Keller Jordan's ``airbench``, which freezes such a layer.

    The patch covariance is accumulated 256 images at a time, so memory stays
    small whatever the number of images.

    Args:
        images: ``(N, H, W, C)`` floats, scaled as the convolution sees them.
        kernel_size: Spatial size of the convolution's (square) kernel.
        filters: Output channels of the convolution (``2 * components``; at
            most ``2 * kernel_size**2 * C``).
        eps: Added to each component's variance before the division (keeps
            near-constant directions from being amplified without bound).

    Returns:
        ``(kernel_size, kernel_size, C, filters)`` ``float32`` kernel, the
        layout of a Keras ``Conv2D`` kernel under either data format.

    Raises:
        ValueError: ``filters`` is odd or asks for more components than a patch has.
    """
    k, channels = kernel_size, images.shape[-1]
    half = filters // 2
    if filters % 2 or half > k * k * channels:
        raise ValueError(f"cannot whiten {k}x{k}x{channels} patches into {filters} filters")
    dims = k * k * channels
    rows, total, outer = 0, np.zeros(dims), np.zeros((dims, dims))
    # About 256 32x32 images' patches a chunk, whatever the image size (bounded memory).
    per_chunk = max(1, WHITEN_PIXELS // 8 // max(1, images.shape[1] * images.shape[2]))
    for chunk in np.array_split(images, -(-len(images) // per_chunk)):
        patches = np.lib.stride_tricks.sliding_window_view(chunk, (k, k), axis=(1, 2))
        # (n, H', W', C, k, k) -> rows of (kh, kw, C), the order of a Conv2D kernel.
        patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, dims).astype(np.float64)
        rows, total = rows + len(patches), total + patches.sum(axis=0)
        outer += patches.T @ patches
    mean = total / rows
    variance, directions = np.linalg.eigh(outer / rows - np.outer(mean, mean))
    top = np.argsort(variance)[::-1][:half]
    scaled = directions[:, top] / np.sqrt(np.maximum(variance[top], 0.0) + eps)
    kernel = np.concatenate([scaled, -scaled], axis=1).reshape(k, k, channels, filters)
    return kernel.astype(np.float32)


def whiten_first_conv(
    model: keras.Model,
    layer_name: str,
    images: np.ndarray,
    *,
    max_images: int = 2000,
    seed: int = 0,
) -> int:
    """Set convolution ``layer_name``'s kernel to :func:`whitening_kernel` of local images.

    The layer must be the model's first convolution, fed by the model's
    pixel scaling (every registry model maps 0-255 to [-1, 1] first).

    Args:
        model: Registry model, changed in place.
        layer_name: The convolution (searched in nested models too).
        images: ``uint8`` local training images, ``(N, H, W, 3)``.
        max_images: Images used (a seeded random subset if there are more); fewer
            for images over 32x32, so that at most :data:`WHITEN_PIXELS` pixels are.
        seed: Subset seed.

    Returns:
        The number of images used (0 if there were none: the kernel stays).
    """
    if len(images) == 0:
        return 0
    max_images = min(max_images, max(1, WHITEN_PIXELS // (images.shape[1] * images.shape[2])))
    if len(images) > max_images:
        pick = np.random.default_rng(seed).choice(len(images), max_images, replace=False)
        images = images[np.sort(pick)]
    layer = find_layer(model, layer_name)
    kernel_size, _, _, filters = layer.kernel.shape
    scaled = images.astype(np.float32) / 127.5 - 1.0
    layer.kernel.assign(whitening_kernel(scaled, int(kernel_size), int(filters)))
    return len(images)
