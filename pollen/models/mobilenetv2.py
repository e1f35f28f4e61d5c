"""``mobilenetv2``: the reference model, ``keras.applications.MobileNetV2`` for 32x32x3."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pollen.backend import set_random_seed
from pollen.compat.keras import flatten_layers
from pollen.models.registry import INPUT_SHAPE, ImagenetWeights, ModelSpec, Recipe, register

if TYPE_CHECKING:  # keras is imported where a model is built: listing names stays fast
    import keras


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> None:
    """Set the moving-statistics momentum of every BatchNormalization layer.

    Keras's default of 0.99 (0.999 inside ``keras.applications.MobileNetV2``)
    makes the moving statistics lag far behind the weights during the few
    hundred steps of one federated round, so the model in inference mode
    scores at chance level. 0.9 lets them follow the training.
    """
    import keras

    for layer in flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = momentum


def _zero_residual_branches(model: keras.Model) -> None:
    """Start every residual block of a ``keras.applications.MobileNetV2`` as the identity.

    Sets the scale (gamma) of the BatchNorm that ends each residual branch
    (``block_<i>_project_BN`` where ``block_<i>_add`` exists) to 0, so at
    the start each block passes its input through unchanged and the network
    behaves like a shallow one; the gammas are trained like any other weight
    (the "zero-init residual" of Goyal et al., 2017). Only the initial
    values change, not the architecture (see docs/performance.md#zero-init-residual).
    MobileNetV2 has 10 such blocks.
    """
    import numpy as np

    layers = {layer.name: layer for layer in flatten_layers(model)}
    for name in layers:
        if name.startswith("block_") and name.endswith("_add"):
            bn = layers[name.removesuffix("_add") + "_project_BN"]
            bn.gamma.assign(np.zeros(bn.gamma.shape, bn.gamma.dtype))


def build_mobilenetv2(
    num_classes: int, seed: int, input_shape: tuple[int, int, int] = INPUT_SHAPE
) -> keras.Model:
    """The reference model: ``keras.applications.MobileNetV2`` for 32x32x3.

    Exactly ``MobileNetV2(input_shape=(32, 32, 3), classes=num_classes,
    weights=None)`` (2.27M parameters for 10 classes), preceded by a weightless
    rescaling of pixels from [0, 255] to [-1, 1] (the range MobileNetV2 expects),
    with BatchNorm momentum 0.9 and every residual branch starting at zero
    (:func:`_zero_residual_branches`).

    Args:
        num_classes: Output classes.
        seed: Seed for the weight initialisers.
        input_shape: ``(height, width, 3)`` of the input (run config ``image-size``).

    Returns:
        An uncompiled model mapping ``(batch, *input_shape)`` pixels to
        ``(batch, num_classes)`` softmax probabilities.
    """
    import keras

    set_random_seed(seed)
    inputs = keras.Input(input_shape, name="pixels")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_pm1")(inputs)
    base = keras.applications.MobileNetV2(
        input_shape=input_shape, classes=num_classes, weights=None
    )
    set_batchnorm_momentum(base, 0.9)
    _zero_residual_branches(base)
    return keras.Model(inputs, base(x), name="pollen_mobilenetv2")


#: Local training of ``mobilenetv2``: the reference's Adam at 0.001, batch 32, with a
#: second-moment decay of 0.99. Every round starts a fresh Adam (its moments described
#: the previous global weights), and at 0.999 its second-moment estimates average over
#: more steps than the 782 of a round on half of CIFAR-10; at 0.99 they follow within
#: about 100 (see docs/performance.md#mobilenetv2-recipe).
MOBILENETV2_RECIPE = Recipe(beta_2=0.99)

#: Input sides Keras has ImageNet weight files of MobileNetV2 for; any other input
#: size loads the 224 file (the convolution weights do not depend on the input size).
MOBILENETV2_IMAGENET_SIDES = (96, 128, 160, 192, 224)


def mobilenetv2_imagenet_file(input_shape: tuple[int, int, int]) -> str:
    """The ``include_top=False`` ImageNet weight file Keras picks for ``input_shape``.

    Mirrors ``keras.applications.MobileNetV2``: the file of the input's side for
    a square input of a side it has a file for, else the 224 file (alpha 1.0).
    """
    height, width = input_shape[0], input_shape[1]
    side = height if height == width and height in MOBILENETV2_IMAGENET_SIDES else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{side}_no_top.h5"


register(
    "mobilenetv2",
    ModelSpec(
        build_mobilenetv2,
        "reference: keras.applications.MobileNetV2(32x32x3, weights=None), 2.27M params",
        recipe=MOBILENETV2_RECIPE,
        whiten="Conv1",
        flip_tta=True,
        image_size=96,
        head="predictions",
        imagenet=ImagenetWeights("MobileNetV2", mobilenetv2_imagenet_file),
    ),
)
