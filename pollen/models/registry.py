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

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pollen.backend import set_random_seed

if TYPE_CHECKING:  # keras is imported where a model is built: listing names stays fast
    import keras
    import numpy as np

INPUT_SHAPE = (32, 32, 3)


@dataclass(frozen=True)
class Recipe:
    """The local-training settings a registry model is meant to be trained with.

    A run whose ``learning-rate``, ``batch-size`` or ``lr-schedule`` is left
    at 0 / ``"auto"`` takes them from its model's recipe (see
    ``pollen.config.RunConfig``).

    Attributes:
        optimizer: ``"adam"`` (Keras defaults but ``beta_2``) or ``"sgd"``
            (Nesterov momentum 0.9).
        learning_rate: Peak local learning rate.
        batch_size: Local batch size.
        lr_schedule: Learning rate across the run's local steps (see
            ``pollen.training.local.schedule_value``).
        label_smoothing: Label smoothing of the training loss (0 = none).
        weight_decay: Decoupled weight decay of the optimizer (0 = none).
        beta_2: Adam's decay rate of its second-moment estimates (Keras's
            default 0.999 averages over about 1,000 steps); unused by SGD.
    """

    optimizer: str = "adam"
    learning_rate: float = 0.001
    batch_size: int = 32
    lr_schedule: str = "cosine"
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    beta_2: float = 0.999


@dataclass(frozen=True)
class ModelSpec:
    """How to build and train one registry model.

    Attributes:
        build: ``build(num_classes, seed) -> keras.Model``; uncompiled. A
            builder that also takes ``fastest_layout`` (see
            :func:`build_model`) may lay out its tensors for speed on the
            current backend.
        description: One line for ``pollen models`` and the README.
        augment: Whether local training applies per-image random flips and shifts
            (``pollen.training.local.make_dataset``).
        recipe: Local-training settings (optimizer, learning rate, batch size,
            schedule, label smoothing) the model is tuned for.
        backend: Keras backend clients prefer for this model where it is
            installed and the process has not loaded Keras yet (measured
            fastest for the model where it is meant to run: a 2-core CPU, or
            a GPU for ``fastnet-wide``). Weights are the same arrays whatever
            the backend.
        whiten: Name of the first convolution, whose kernel the client that
            provides the initial weights sets from its local images (see
            :func:`whiten_first_conv`); ``""`` = random initialisation only.
        freeze_whitened: Whether local training keeps the whitened first
            convolution fixed (it is then never updated; the clients skip its
            weight gradients). Applies only when the run whitened it.
        flip_tta: Whether evaluation and prediction average the class
            probabilities of each image and its mirror image
            (:func:`pollen.training.local.predict_proba`); for models trained with
            random flips, or on classes that look the same mirrored (CIFAR-10:
            +1.7 to +2.2 points for ``mobilenetv2``, trained without flips).
    """

    build: Callable[..., keras.Model]
    description: str
    augment: bool = False
    recipe: Recipe = field(default_factory=Recipe)
    backend: str = "tensorflow"
    whiten: str = ""
    freeze_whitened: bool = False
    flip_tta: bool = False


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


def _zero_residual_branches(model: keras.Model) -> None:
    """Start every residual block of a ``keras.applications.MobileNetV2`` as the identity.

    Sets the scale (gamma) of the BatchNorm that ends each residual branch
    (``block_<i>_project_BN`` where ``block_<i>_add`` exists) to 0, so at
    the start each block passes its input through unchanged and the network
    behaves like a shallow one; the gammas are trained like any other weight
    (the "zero-init residual" of Goyal et al., 2017). Only the initial
    values change, not the architecture. For the reference configuration
    this lifted the federated model from 48.1% to 55.8% (single view) after
    3 rounds, in an in-process probe of seed 42 (see the README's How it learns).
    MobileNetV2 has 10 such blocks.
    """
    import numpy as np

    layers = {layer.name: layer for layer in model._flatten_layers(include_self=False)}  # noqa: SLF001
    for name in layers:
        if name.startswith("block_") and name.endswith("_add"):
            bn = layers[name.removesuffix("_add") + "_project_BN"]
            bn.gamma.assign(np.zeros(bn.gamma.shape, bn.gamma.dtype))


def build_mobilenetv2(num_classes: int, seed: int) -> keras.Model:
    """The reference model: ``keras.applications.MobileNetV2`` for 32x32x3.

    Exactly ``MobileNetV2(input_shape=(32, 32, 3), classes=num_classes,
    weights=None)`` (2.27M parameters for 10 classes), preceded by a weightless
    rescaling of pixels from [0, 255] to [-1, 1] (the range MobileNetV2 expects),
    with BatchNorm momentum 0.9 and every residual branch starting at zero
    (:func:`_zero_residual_branches`).

    Args:
        num_classes: Output classes.
        seed: Seed for the weight initialisers.

    Returns:
        An uncompiled model mapping ``(batch, 32, 32, 3)`` pixels to
        ``(batch, num_classes)`` softmax probabilities.
    """
    import keras

    set_random_seed(seed)
    inputs = keras.Input(INPUT_SHAPE, name="pixels")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_to_pm1")(inputs)
    base = keras.applications.MobileNetV2(
        input_shape=INPUT_SHAPE, classes=num_classes, weights=None
    )
    _set_batchnorm_momentum(base, 0.9)
    _zero_residual_branches(base)
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

    set_random_seed(seed)
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


def _fastnet(
    num_classes: int, seed: int, fastest_layout: bool, widths: tuple[int, int, int], name: str
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

    inputs = keras.Input(INPUT_SHAPE, name="pixels")
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


def build_fastnet(num_classes: int, seed: int, fastest_layout: bool = False) -> keras.Model:
    """The recommended model: a VGG-style net built for fast 32x32 training.

    A 3x3 stem of 24 channels, then three blocks of widths 32, 64 and 128,
    each ``conv -> 2x2 max-pool -> BN -> ReLU -> conv -> BN -> ReLU``
    (pooling straight after the first convolution keeps most of the
    arithmetic at low resolution), global max pooling and a dense layer whose
    logits are scaled by 1/8 before the softmax (0.30M parameters, about
    24M multiply-adds per image). The block design follows Keller Jordan's
    ``airbench`` CIFAR-10 speed-runs, narrowed to fit a 2-core CPU budget.

    With ``fastest_layout`` under the torch backend the convolutions run
    channels-first (measured 1.2x faster on 2 CPU cores than channels-last
    there); clients train that way. Otherwise the model is channels-last,
    which every backend runs (TensorFlow's CPU kernels take nothing else), so
    a saved ``model.keras`` loads anywhere. Kernel shapes do not depend on the
    data format: the weights are the same arrays either way.

    Args:
        num_classes: Output classes.
        seed: Seed for the weight initialisers.
        fastest_layout: Channels-first under torch (for local training).

    Returns:
        An uncompiled model mapping ``(batch, 32, 32, 3)`` pixels (0-255) to
        ``(batch, num_classes)`` softmax probabilities.
    """
    return _fastnet(num_classes, seed, fastest_layout, (32, 64, 128), "pollen_fastnet")


def build_fastnet_wide(num_classes: int, seed: int, fastest_layout: bool = False) -> keras.Model:
    """``fastnet`` at the block widths of Keller Jordan's ``airbench94``: 64, 256 and 256.

    For accelerators: 1.98M parameters and about 147M multiply-adds per
    image, 6.7x the parameters and 6x the arithmetic of :func:`build_fastnet`,
    too slow for a 2-core CPU. Same recipe, layers and layer names otherwise.

    Returns:
        An uncompiled model mapping ``(batch, 32, 32, 3)`` pixels (0-255) to
        ``(batch, num_classes)`` softmax probabilities.
    """
    return _fastnet(num_classes, seed, fastest_layout, (64, 256, 256), "pollen_fastnet-wide")


#: Local training of ``mobilenetv2``: the reference's Adam at 0.001, batch 32, with a
#: second-moment decay of 0.99. Every round starts a fresh Adam (its moments described
#: the previous global weights), and at 0.999 its second-moment estimates average over
#: more steps than the 782 of a round on half of CIFAR-10; at 0.99 they follow within
#: about 100. Measured in the reference configuration (seed 42, in-process, 3 rounds):
#: 48.1% -> 51.4% with Keras's initial residual branches, 55.8% -> 57.6% with them
#: starting at zero (single view).
MOBILENETV2_RECIPE = Recipe(beta_2=0.99)

#: Local training of ``fastnet`` and ``fastnet-wide``.
FASTNET_RECIPE = Recipe(
    optimizer="sgd",
    learning_rate=0.1,
    batch_size=64,
    lr_schedule="onecycle",
    label_smoothing=0.2,
    weight_decay=5e-4,
)

MODELS: dict[str, ModelSpec] = {
    "mobilenetv2": ModelSpec(
        build_mobilenetv2,
        "reference: keras.applications.MobileNetV2(32x32x3, weights=None), 2.27M params",
        recipe=MOBILENETV2_RECIPE,
        whiten="Conv1",
        flip_tta=True,
    ),
    "fastnet": ModelSpec(
        build_fastnet,
        "recommended: VGG-style net for 32x32 (0.30M params); SGD, batch 64, one-cycle lr",
        augment=True,
        recipe=FASTNET_RECIPE,
        backend="torch",
        whiten="stem_conv",
        freeze_whitened=True,
        flip_tta=True,
    ),
    "fastnet-wide": ModelSpec(
        build_fastnet_wide,
        "for GPUs: fastnet at airbench94's widths 64/256/256 (1.98M params); same recipe",
        augment=True,
        recipe=FASTNET_RECIPE,
        backend="jax",  # XLA: 6.2x torch's images/s on an H200 (benchmarks/gpu.py)
        whiten="stem_conv",
        freeze_whitened=True,
        flip_tta=True,
    ),
    "cnn": ModelSpec(build_cnn, "small fast CNN (0.1M params) for quick runs and tests"),
    "cnn-gn": ModelSpec(
        build_cnn_gn,
        "the small CNN with GroupNorm (no moving statistics): for --dp and --secagg",
    ),
}


def build_model(
    name: str, num_classes: int = 10, seed: int = 42, *, fastest_layout: bool = False
) -> keras.Model:
    """Build registry model ``name`` (uncompiled).

    Args:
        name: Registry name.
        num_classes: Output classes.
        seed: Seed for the weight initialisers.
        fastest_layout: Let a builder that supports it pick the tensor layout
            fastest on the current backend (clients' local training). False
            gives a model that any backend can load from ``model.keras``.

    Raises:
        KeyError: ``name`` is not in :data:`MODELS` (the run config validates
            names before this is reached).
    """
    build = MODELS[name].build
    if fastest_layout and "fastest_layout" in inspect.signature(build).parameters:
        return build(num_classes, seed, fastest_layout=True)
    return build(num_classes, seed)


def preferred_backend(name: str) -> str:
    """The Keras backend to run registry model ``name`` on in a new process.

    ``KERAS_BACKEND`` if the user set it; else the model's preferred backend
    (:attr:`ModelSpec.backend`) if it is installed; else ``"tensorflow"``.
    """
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    preferred = MODELS[name].backend if name in MODELS else "tensorflow"
    if preferred != "tensorflow" and importlib.util.find_spec(preferred) is None:
        return "tensorflow"
    return preferred


def select_backend(name: str) -> str:
    """Choose the Keras backend of this process for registry model ``name``.

    Keras fixes its backend when it is first imported, from the
    ``KERAS_BACKEND`` environment variable. If Keras is not loaded yet, this
    sets that variable to :func:`preferred_backend`. Otherwise (Flower's
    simulation workers import TensorFlow, and with it Keras, before any app
    code runs: ``pollen simulate`` therefore sets the variable when it starts
    them) nothing changes.

    Returns:
        The backend Keras uses (or will use) in this process.
    """
    if "keras" in sys.modules:
        import keras

        return keras.backend.backend()
    os.environ["KERAS_BACKEND"] = preferred_backend(name)
    return os.environ["KERAS_BACKEND"]


def whitening_kernel(images: np.ndarray, kernel_size: int, filters: int, eps: float = 5e-4):
    """A convolution kernel whose outputs are the whitened principal components of patches.

    The ``filters // 2`` directions of largest variance among the images'
    ``kernel_size x kernel_size`` patches, each scaled to unit variance, and
    their negatives (so a following ReLU keeps both signs). Starting the
    first convolution here instead of at random decorrelates the features the
    rest of the network learns from: measured on CIFAR-10 with ``fastnet``,
    2 federated clients, 58.9% test accuracy after round 1 instead of 56.8%
    (79.4% instead of 79.1% after 5 rounds; trained centrally on a random
    25,000 images for 2 epochs, 70.5% instead of 69.5%). The idea is from
    Keller Jordan's ``airbench``, which freezes such a layer; here it is only
    the starting point and trains like the rest.

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
    """
    import numpy as np

    k, channels = kernel_size, images.shape[-1]
    half = filters // 2
    if filters % 2 or half > k * k * channels:
        raise ValueError(f"cannot whiten {k}x{k}x{channels} patches into {filters} filters")
    dims = k * k * channels
    rows, total, outer = 0, np.zeros(dims), np.zeros((dims, dims))
    for chunk in np.array_split(images, -(-len(images) // 256)):
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


def find_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    """The layer called ``name``, in ``model`` or in a model nested in it.

    ``keras.Model.get_layer`` looks at the top level only; the reference
    model's layers sit inside ``keras.applications.MobileNetV2``.

    Raises:
        ValueError: No layer has that name.
    """
    for layer in model._flatten_layers(include_self=False):  # noqa: SLF001 - Keras's own walker
        if layer.name == name:
            return layer
    raise ValueError(f"model {model.name!r} has no layer {name!r}")


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
        images: ``uint8`` local training images, ``(N, 32, 32, 3)``.
        max_images: Images used (a seeded random subset if there are more).
        seed: Subset seed.

    Returns:
        The number of images used (0 if there were none: the kernel stays).
    """
    import numpy as np

    if len(images) == 0:
        return 0
    if len(images) > max_images:
        pick = np.random.default_rng(seed).choice(len(images), max_images, replace=False)
        images = images[np.sort(pick)]
    layer = find_layer(model, layer_name)
    kernel_size, _, _, filters = layer.kernel.shape
    scaled = images.astype(np.float32) / 127.5 - 1.0
    layer.kernel.assign(whitening_kernel(scaled, int(kernel_size), int(filters)))
    return len(images)


def batchnorm_stat_indices(model: keras.Model) -> list[int]:
    """Positions in ``model.get_weights()`` of BatchNorm moving means/variances.

    These are the arrays that describe the data, not the function: clients
    re-estimate them for the aggregated weights (see
    ``pollen.training.local.calibrate_batchnorm``).
    """
    import keras

    stat_ids = set()
    for layer in model._flatten_layers(include_self=False):  # noqa: SLF001
        if isinstance(layer, keras.layers.BatchNormalization):
            stat_ids.update(id(v) for v in (layer.moving_mean, layer.moving_variance))
    return [i for i, v in enumerate(model.weights) if id(v) in stat_ids]
