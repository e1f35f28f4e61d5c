"""``efficientnetb0``: ``keras.applications.EfficientNetB0``, for fine-tuning from ImageNet."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pollen.backend import set_random_seed
from pollen.compat.keras import flatten_layers
from pollen.models.mobilenetv2 import set_batchnorm_momentum
from pollen.models.registry import INPUT_SHAPE, ImagenetWeights, ModelSpec, Recipe, register

if TYPE_CHECKING:  # keras is imported where a model is built: listing names stays fast
    import keras

#: Per-channel mean and standard deviation of ImageNet pixels in [0, 1] (RGB), the
#: standardisation Keras's ImageNet weights of EfficientNet expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _standardise_like_imagenet(model: keras.Model) -> None:
    """Set the input ``Normalization`` layer to ImageNet's mean and variance.

    ``EfficientNetB0(weights=None)`` leaves it at mean 0, variance 1 (waiting
    for ``adapt``). Its ``weights="imagenet"`` file stores other values and
    corrects them with an extra rescaling layer that only that variant has;
    setting the layer here instead makes the architecture the same with
    or without pretrained weights, the input standardised the same way.
    The values are fixed: they are non-trainable weights every client holds alike.
    """
    import keras
    import numpy as np

    for layer in flatten_layers(model):
        if isinstance(layer, keras.layers.Normalization):
            shape = layer.adapt_mean.shape
            layer.adapt_mean.assign(np.reshape(IMAGENET_MEAN, shape).astype("float32"))
            std = np.reshape(IMAGENET_STD, shape).astype("float32")
            layer.adapt_variance.assign(std**2)


def build_efficientnetb0(
    num_classes: int, seed: int, input_shape: tuple[int, int, int] = INPUT_SHAPE
) -> keras.Model:
    """``keras.applications.EfficientNetB0(input_shape, classes=num_classes, weights=None)``.

    The application scales raw 0-255 pixels itself (its own rescaling and
    normalisation layers, set to ImageNet's statistics here), so nothing
    comes in front. BatchNorm momentum is 0.9 as in ``mobilenetv2`` (the
    moving statistics follow a federated round's few hundred steps).
    4.06M parameters for 10 classes; the classifier layer is ``predictions``.

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
    model = keras.applications.EfficientNetB0(
        input_shape=input_shape, classes=num_classes, weights=None
    )
    set_batchnorm_momentum(model, 0.9)
    _standardise_like_imagenet(model)
    return model


register(
    "efficientnetb0",
    ModelSpec(
        build_efficientnetb0,
        "keras.applications.EfficientNetB0, 4.06M params; for --weights imagenet at 96-224 px",
        recipe=Recipe(beta_2=0.99),
        flip_tta=True,
        image_size=96,
        head="predictions",
        imagenet=ImagenetWeights(
            "EfficientNetB0",
            lambda _shape: "efficientnetb0_notop.h5",
            file_hash="50bc09e76180e00e4465e1a485ddc09d",  # Keras's own, for b0 no-top
            keep=("Normalization",),
        ),
    ),
)
