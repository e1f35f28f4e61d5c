"""The model registry: every architecture a federation can train.

Each entry builds an *uncompiled* Keras model that takes raw ``uint8``-range
images of shape ``(32, 32, 3)`` (pixel values 0-255) and returns class
probabilities of shape ``(num_classes,)``. Input scaling lives inside the
model (a ``Rescaling`` layer, no weights), so a saved ``model.keras`` predicts
from raw pixels with nothing else to remember.

Every client of a federation builds the same entry, so their weight lists
line up; the server never needs this module to aggregate, only to evaluate
centrally or to write ``model.keras``.

Adding a model means adding one builder and one :data:`MODELS` entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keras is imported where a model is built: listing names stays fast
    import keras

INPUT_SHAPE = (32, 32, 3)


@dataclass(frozen=True)
class ModelSpec:
    """How to build and train one registry model.

    Attributes:
        build: ``build(num_classes, seed) -> keras.Model``; uncompiled.
        description: One line for ``pollen models`` and the README.
        augment: Whether local training applies random flips and shifts.
    """

    build: Callable[[int, int], keras.Model]
    description: str
    augment: bool = False


def _set_batchnorm_momentum(model: keras.Model, momentum: float) -> None:
    """Set the moving-statistics momentum of every BatchNormalization layer.

    Keras's default of 0.99 (0.999 inside ``keras.applications.MobileNetV2``)
    makes the moving statistics lag far behind the weights during the few
    hundred steps of one federated round, so the model in inference mode
    scores at chance level. 0.9 lets them follow the training.
    """
    import keras

    for layer in model._flatten_layers(include_self=False):  # noqa: SLF001 - Keras's own walker
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def build_mobilenetv2(num_classes: int, seed: int) -> keras.Model:
    """The reference model: ``keras.applications.MobileNetV2`` for 32x32x3.

    Exactly ``MobileNetV2(input_shape=(32, 32, 3), classes=num_classes,
    weights=None)`` (2.27M parameters for 10 classes), preceded by a weightless
    rescaling of pixels from [0, 255] to [-1, 1] (the range MobileNetV2 expects)
    and with BatchNorm momentum 0.9.

    Args:
        num_classes: Output classes.
        seed: Seed for the weight initialisers.

    Returns:
        An uncompiled model mapping ``(batch, 32, 32, 3)`` pixels to
        ``(batch, num_classes)`` softmax probabilities.
    """
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_pm1")(inputs)
    base = keras.applications.MobileNetV2(
        input_shape=INPUT_SHAPE, classes=num_classes, weights=None
    )
    _set_batchnorm_momentum(base, 0.9)
    return keras.Model(inputs, base(x), name="pollen_mobilenetv2")


def _small_cnn(num_classes: int, seed: int, norm: str) -> keras.Model:
    """Three conv-norm-ReLU-pool blocks (widths 32, 64, 128), GAP, dense softmax.

    Args:
        num_classes: Output classes.
        seed: Seed for the weight initialisers.
        norm: ``"batch"`` (BatchNorm, momentum 0.9) or ``"group"``
            (GroupNormalization with 8 groups: per-example, no moving statistics).

    Returns:
        An uncompiled model mapping ``(batch, 32, 32, 3)`` pixels to
        ``(batch, num_classes)`` softmax probabilities.
    """
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
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


def build_cnn(num_classes: int, seed: int) -> keras.Model:
    """A small, fast CNN for quick runs and tests (about 0.1M parameters).

    Three conv-BN-ReLU-pool blocks of widths 32, 64, 128, global average
    pooling and a dense softmax layer (see :func:`_small_cnn`).
    """
    return _small_cnn(num_classes, seed, "batch")


def build_cnn_gn(num_classes: int, seed: int) -> keras.Model:
    """The small CNN of :func:`build_cnn` with GroupNorm instead of BatchNorm.

    Same widths and about 0.1M parameters, but each normalisation is
    ``GroupNormalization(groups=8)``, which normalises per example and has no
    moving statistics. The choice for differential privacy and SecAgg+: every
    array is a trained weight, so clipping and noise apply to nothing else,
    and no client statistics need re-estimating.
    """
    return _small_cnn(num_classes, seed, "group")


MODELS: dict[str, ModelSpec] = {
    "mobilenetv2": ModelSpec(
        build_mobilenetv2,
        "reference: keras.applications.MobileNetV2(32x32x3, weights=None), 2.27M params",
    ),
    "cnn": ModelSpec(build_cnn, "small fast CNN (0.1M params) for quick runs and tests"),
    "cnn-gn": ModelSpec(
        build_cnn_gn,
        "the small CNN with GroupNorm (no moving statistics): for --dp and --secagg",
    ),
}


def build_model(name: str, num_classes: int = 10, seed: int = 42) -> keras.Model:
    """Build registry model ``name`` (uncompiled).

    Raises:
        KeyError: ``name`` is not in :data:`MODELS` (the run config validates
            names before this is reached).
    """
    return MODELS[name].build(num_classes, seed)


def compile_model(model: keras.Model, learning_rate: float) -> keras.Model:
    """Compile with the reference recipe: Adam, sparse categorical CE, accuracy."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def batchnorm_stat_indices(model: keras.Model) -> list[int]:
    """Positions in ``model.get_weights()`` of BatchNorm moving means/variances.

    These are the arrays that describe the data, not the function: clients
    re-estimate them for the aggregated weights (see
    ``pollen.training.calibrate_batchnorm``).
    """
    import keras

    stat_ids = set()
    for layer in model._flatten_layers(include_self=False):  # noqa: SLF001
        if isinstance(layer, keras.layers.BatchNormalization):
            stat_ids.update(id(v) for v in (layer.moving_mean, layer.moving_variance))
    return [i for i, v in enumerate(model.weights) if id(v) in stat_ids]
