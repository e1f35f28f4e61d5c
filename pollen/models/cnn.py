"""``cnn`` and ``cnn-gn``: a small, fast CNN for quick runs and tests (BatchNorm or GroupNorm)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pollen.backend import set_random_seed
from pollen.models.registry import INPUT_SHAPE, ModelSpec, register

if TYPE_CHECKING:  # keras is imported where a model is built: listing names stays fast
    import keras


def _small_cnn(
    num_classes: int, seed: int, norm: str, input_shape: tuple[int, int, int] = INPUT_SHAPE
) -> keras.Model:
    """Three conv-norm-ReLU-pool blocks (widths 32, 64, 128), GAP, dense softmax.

    Args:
        num_classes: Output classes.
        seed: Seed for the weight initialisers.
        norm: ``"batch"`` (BatchNorm, momentum 0.9) or ``"group"``
            (GroupNormalization with 8 groups: per-example, no moving statistics).
        input_shape: ``(height, width, 3)`` of the input (run config ``image-size``).

    Returns:
        An uncompiled model mapping ``(batch, 32, 32, 3)`` pixels to
        ``(batch, num_classes)`` softmax probabilities.
    """
    import keras

    set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input(input_shape, name="pixels")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_pm1")(inputs)
    for i, width in enumerate((32, 64, 128)):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        if norm == "batch":
            x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        else:
            x = layers.GroupNormalization(groups=8, name=f"gn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        x = layers.MaxPooling2D(name=f"pool{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    name = "pollen_cnn" if norm == "batch" else "pollen_cnn_gn"
    return keras.Model(inputs, outputs, name=name)


def build_cnn(
    num_classes: int, seed: int, input_shape: tuple[int, int, int] = INPUT_SHAPE
) -> keras.Model:
    """A small, fast CNN for quick runs and tests (about 0.1M parameters).

    Three conv-BN-ReLU-pool blocks of widths 32, 64, 128, global average
    pooling and a dense softmax layer (see :func:`_small_cnn`).
    """
    return _small_cnn(num_classes, seed, "batch", input_shape)


def build_cnn_gn(
    num_classes: int, seed: int, input_shape: tuple[int, int, int] = INPUT_SHAPE
) -> keras.Model:
    """The small CNN of :func:`build_cnn` with GroupNorm instead of BatchNorm.

    Same widths and about 0.1M parameters, but each normalisation is
    ``GroupNormalization(groups=8)``, which normalises per example and has no
    moving statistics. The choice for differential privacy and SecAgg+: every
    array is a trained weight, so clipping and noise apply to nothing else,
    and no client statistics need re-estimating.
    """
    return _small_cnn(num_classes, seed, "group", input_shape)


register("cnn", ModelSpec(build_cnn, "small fast CNN (0.1M params) for quick runs and tests"))
register(
    "cnn-gn",
    ModelSpec(
        build_cnn_gn,
        "the small CNN with GroupNorm (no moving statistics): for --dp and --secagg",
    ),
)
