"""``scatternet``: ScatterNet features + GroupNorm + a linear head (Tramer & Boneh), for DP-SGD.

A scattering transform (Mallat 2012; ``kymatio``'s ``Scattering2D`` with J=2,
L=8) turns a 32x32 RGB image into 3 x 81 = 243 channels of 8x8 wavelet
features. The transform is fixed and data-independent (no weights), so it
costs no privacy; Tramer & Boneh (2021, "Differentially Private Learning Needs
Better Features") train only a GroupNorm + linear classifier on these
features with DP-SGD and reach 67% CIFAR-10 test accuracy at epsilon = 3.

The GroupNorm has no scale or offset (Tramer & Boneh's ``affine=False``): it
normalises each image's features on their own, so it is part of the fixed
transform, and the only weights are the linear classifier's. The model takes
raw pixels like every registry model (a saved ``model.keras`` predicts from
images); under ``--dp example`` a client computes the features once
(:mod:`pollen.training.features`, up to the layer named
:data:`~pollen.models.registry.FIXED_FEATURES`) and DP-SGD trains only the
classifier, whose per-example
gradients have a closed form: that is what makes DP-SGD affordable on a CPU.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pollen.backend import set_random_seed
from pollen.models.registry import FIXED_FEATURES, INPUT_SHAPE, ModelSpec, Recipe, register

if TYPE_CHECKING:  # keras is imported where a model is built: listing names stays fast
    import keras

#: Scattering scales (J) and orientations (L): 1 + J*L + L*L*J*(J-1)/2 = 81 maps per channel.
J, L = 2, 8
#: Name of the last layer of the fixed transform (its output: the features DP-SGD trains on).
HEAD_INPUT = FIXED_FEATURES
#: GroupNorm groups over the 243 scattering channels, and its epsilon. Tramer & Boneh's
#: GroupNorm uses 27 groups (PyTorch's epsilon, 1e-5); measured here (DP-SGD on one client's
#: 25,000 CIFAR-10 images, 60 epochs, batch 4096, C = 0.1), 81 groups reach 61.6% at
#: epsilon 8 and 58.0% at epsilon 3, about as well as standardising every feature with
#: statistics of the data (63.4% / 58.2%), which would cost privacy, while 27 groups with
#: Keras's default epsilon (1e-3, large next to second-order coefficients) stall near 55%.
GROUPS, GROUP_EPSILON = 81, 1e-5


def _kymatio_module(backend: str) -> Any:
    """``kymatio``'s ``Scattering2D`` frontend for the Keras ``backend``.

    kymatio 0.3 imports its 3-D module, which needs ``scipy.special.sph_harm``,
    removed in SciPy 1.15 in favour of ``sph_harm_y`` (argument order changed).
    The 2-D transform never uses it; the alias below only lets the import
    succeed (kymatio has no newer release that fixes the import).
    """
    import scipy.special

    if not hasattr(scipy.special, "sph_harm"):

        def sph_harm(m, n, theta, phi):  # old order: azimuth theta, polar phi
            return scipy.special.sph_harm_y(n, m, phi, theta)

        scipy.special.sph_harm = sph_harm
    if backend == "torch":
        from kymatio.torch import Scattering2D
    elif backend == "jax":
        from kymatio.jax import Scattering2D
    else:
        from kymatio.tensorflow import Scattering2D
    return Scattering2D


@functools.cache
def scattering_layer_class():
    """The Keras layer class of the scattering transform (defined on first use)."""
    import keras

    @keras.saving.register_keras_serializable(package="pollen")
    class Scattering(keras.layers.Layer):
        """Fixed ScatterNet features: ``(B, H, W, 3)`` in [0, 1] -> ``(B, H/4, W/4, 243)``."""

        def __init__(self, image_size: tuple[int, int] = INPUT_SHAPE[:2], **kwargs) -> None:
            kwargs["trainable"] = False
            super().__init__(**kwargs)
            self.image_size = tuple(int(s) for s in image_size)
            frontend = _kymatio_module(keras.backend.backend())
            self._scattering = frontend(J=J, shape=self.image_size, L=L)

        def call(self, x):
            from keras import ops

            x = ops.transpose(x, (0, 3, 1, 2))  # kymatio wants channels first
            s = self._scattering(x)  # (B, 3, 81, H/4, W/4)
            s = ops.reshape(s, (-1, 3 * 81, self.image_size[0] // 4, self.image_size[1] // 4))
            return ops.transpose(s, (0, 2, 3, 1))

        def compute_output_shape(self, input_shape):
            return (input_shape[0], self.image_size[0] // 4, self.image_size[1] // 4, 3 * 81)

        def get_config(self) -> dict:
            return {**super().get_config(), "image_size": list(self.image_size)}

    return Scattering


def build_scatternet(
    num_classes: int, seed: int, input_shape: tuple[int, int, int] = INPUT_SHAPE
) -> keras.Model:
    """Pixels -> [0, 1] -> scattering (243 x 8 x 8) -> GroupNorm(81) -> flatten -> softmax.

    The only weights are the linear classifier's (15552 x classes + classes;
    about 156k for 10 classes); no BatchNorm and no GroupNorm scale/offset,
    so every weight is trained by DP-SGD and nothing describes the data.
    """
    import keras

    set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input(input_shape, name="pixels")
    x = layers.Rescaling(1.0 / 255.0, name="scale_to_unit")(inputs)
    x = scattering_layer_class()(input_shape[:2], name="scattering")(x)
    x = layers.GroupNormalization(
        groups=GROUPS, epsilon=GROUP_EPSILON, center=False, scale=False, name="gn"
    )(x)
    x = layers.Flatten(name=HEAD_INPUT)(x)
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_initializer="zeros", name="classifier"
    )(x)
    return keras.Model(inputs, outputs, name="pollen_scatternet")


register(
    "scatternet",
    ModelSpec(
        build_scatternet,
        "ScatterNet features (kymatio, fixed) + GroupNorm + linear head: for --dp example",
        recipe=Recipe(optimizer="sgd", learning_rate=4.0, batch_size=1024, lr_schedule="constant"),
        # CIFAR-like classes look the same mirrored: evaluation averages both views, and
        # DP-SGD averages each example's gradient over both (augmentation multiplicity).
        flip_tta=True,
    ),
)
