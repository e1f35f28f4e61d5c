"""``fastnet`` and ``fastnet-wide``: VGG-style nets built for fast 32x32 training."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pollen.backend import set_random_seed
from pollen.models.registry import INPUT_SHAPE, ModelSpec, Recipe, register

if TYPE_CHECKING:  # keras is imported where a model is built: listing names stays fast
    import keras


def _fastnet(  # parameters: the two builders below differ only in widths and name
    num_classes: int,
    seed: int,
    fastest_layout: bool,
    widths: tuple[int, int, int],
    name: str,
    input_shape: tuple[int, int, int] = INPUT_SHAPE,
) -> keras.Model:
    """The ``fastnet`` architecture with the given block widths (see :func:`build_fastnet`)."""
    import keras

    set_random_seed(seed)
    layers = keras.layers
    channels_first = fastest_layout and keras.backend.backend() == "torch"
    fmt = "channels_first" if channels_first else "channels_last"
    axis = 1 if channels_first else -1

    def conv_bn_relu(x, width: int, name: str, pool: bool = False):
        x = layers.Conv2D(
            width, 3, padding="same", use_bias=False, data_format=fmt, name=f"{name}_conv"
        )(x)
        if pool:
            x = layers.MaxPooling2D(data_format=fmt, name=f"{name}_pool")(x)
        x = layers.BatchNormalization(axis=axis, momentum=0.9, name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    inputs = keras.Input(input_shape, name="pixels")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_pm1")(inputs)
    if channels_first:
        x = layers.Permute((3, 1, 2), name="to_channels_first")(x)
    x = conv_bn_relu(x, 24, "stem")
    for i, width in enumerate(widths, start=1):
        x = conv_bn_relu(x, width, f"block{i}a", pool=True)
        x = conv_bn_relu(x, width, f"block{i}b")
    x = layers.GlobalMaxPooling2D(data_format=fmt, name="gmp")(x)
    x = layers.Dense(num_classes, name="logits")(x)
    x = layers.Rescaling(1.0 / 8.0, name="temperature")(x)
    # float32 probabilities under a mixed-precision policy too (Keras's advice for the last layer).
    outputs = layers.Softmax(name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def build_fastnet(
    num_classes: int,
    seed: int,
    fastest_layout: bool = False,
    input_shape: tuple[int, int, int] = INPUT_SHAPE,
) -> keras.Model:
    """The recommended model: a VGG-style net built for fast 32x32 training.

    A 3x3 stem of 24 channels, then three blocks of widths 32, 64 and 128,
    each ``conv -> 2x2 max-pool -> BN -> ReLU -> conv -> BN -> ReLU``
    (pooling straight after the first convolution keeps most of the
    arithmetic at low resolution), global max pooling and a dense layer whose
    logits are scaled by 1/8 before the softmax (0.30M parameters, about
    24M multiply-adds per image). The block design follows Keller Jordan's
    ``airbench`` CIFAR-10 speed-runs, narrowed to fit a 2-core CPU budget.

    With ``fastest_layout`` under the torch backend the convolutions run
    channels-first (faster there on a CPU, see
    docs/performance.md#fastnet-layout); clients train that way. Otherwise the
    model is channels-last, which every backend runs (TensorFlow's CPU kernels
    take nothing else), so a saved ``model.keras`` loads anywhere. Kernel
    shapes do not depend on the data format: the weights are the same arrays
    either way.

    Args:
        num_classes: Output classes.
        seed: Seed for the weight initialisers.
        fastest_layout: Channels-first under torch (for local training).
        input_shape: ``(height, width, 3)`` of the input (run config ``image-size``).

    Returns:
        An uncompiled model mapping ``(batch, 32, 32, 3)`` pixels (0-255) to
        ``(batch, num_classes)`` softmax probabilities.
    """
    return _fastnet(num_classes, seed, fastest_layout, (32, 64, 128), "pollen_fastnet", input_shape)


def build_fastnet_wide(
    num_classes: int,
    seed: int,
    fastest_layout: bool = False,
    input_shape: tuple[int, int, int] = INPUT_SHAPE,
) -> keras.Model:
    """``fastnet`` at the block widths of Keller Jordan's ``airbench94``: 64, 256 and 256.

    For accelerators: 1.98M parameters and about 147M multiply-adds per
    image, 6.7x the parameters and 6x the arithmetic of :func:`build_fastnet`,
    too slow for a 2-core CPU. Same recipe, layers and layer names otherwise.

    Returns:
        An uncompiled model mapping ``(batch, 32, 32, 3)`` pixels (0-255) to
        ``(batch, num_classes)`` softmax probabilities.
    """
    return _fastnet(
        num_classes, seed, fastest_layout, (64, 256, 256), "pollen_fastnet-wide", input_shape
    )


#: Local training of ``fastnet`` and ``fastnet-wide``.
FASTNET_RECIPE = Recipe(
    optimizer="sgd",
    learning_rate=0.1,
    batch_size=64,
    lr_schedule="onecycle",
    label_smoothing=0.2,
    weight_decay=5e-4,
)

register(
    "fastnet",
    ModelSpec(
        build_fastnet,
        "recommended: VGG-style net for 32x32 (0.30M params); SGD, batch 64, one-cycle lr",
        augment=True,
        recipe=FASTNET_RECIPE,
        backend="torch",
        whiten="stem_conv",
        freeze_whitened=True,
        flip_tta=True,
    ),
)
register(
    "fastnet-wide",
    ModelSpec(
        build_fastnet_wide,
        "for GPUs: fastnet at airbench94's widths 64/256/256 (1.98M params); same recipe",
        augment=True,
        recipe=FASTNET_RECIPE,
        backend="jax",  # XLA, the fastest on a GPU (see docs/performance.md#backend-choice)
        whiten="stem_conv",
        freeze_whitened=True,
        flip_tta=True,
    ),
)
