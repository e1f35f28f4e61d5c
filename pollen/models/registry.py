"""The model registry: every architecture a federation can train.

Each entry builds an *uncompiled* Keras model that takes raw ``uint8``-range
images of shape ``(32, 32, 3)`` (pixel values 0-255) and returns class
probabilities of shape ``(num_classes,)``. Input scaling lives inside the
model (a ``Rescaling`` layer, no weights), so a saved ``model.keras`` predicts
from raw pixels with nothing else to remember.

Every client of a federation builds the same entry, so their weight lists
line up; the server never needs this module to aggregate, only to evaluate
centrally or to write ``model.keras``.

An architecture registers itself: its own module in this package calls
:func:`register` at import, and ``pollen/models/__init__.py`` imports every
such module, so :data:`MODELS` is complete whenever this module is imported
(see docs/extending.md).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pollen.compat.keras import flatten_layers
from pollen.errors import PollenError

if TYPE_CHECKING:  # keras is imported where a model is built: listing names stays fast
    import keras

#: Shape of one input image: height, width, channels (pixels 0-255).
INPUT_SHAPE = (32, 32, 3)

#: Name of the last layer of a model's *fixed* transform, where a model has one: every
#: layer up to it has no weights and looks at no data (e.g. ``scatternet``'s scattering
#: transform). Training and evaluation compute that prefix once per image set and run
#: only the layers after it (:mod:`pollen.training.features`).
FIXED_FEATURES = "fixed_features"


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


#: Where ``keras.applications`` keeps its pretrained weight files.
KERAS_APPLICATIONS_URL = "https://storage.googleapis.com/keras-applications/"


@dataclass(frozen=True)
class ImagenetWeights:
    """The ImageNet weights of a registry model that wraps a ``keras.applications`` model.

    ``pollen.models.pretrained`` downloads the file into the Keras cache
    (``~/.keras/models``), builds the application's backbone
    (``include_top=False``) from it at the run's input size and copies its
    layers by name into the registry model; the classifier stays the model's own.

    Attributes:
        application: Name of the ``keras.applications`` constructor.
        file_name: ``file_name(input_shape)``: the ``include_top=False`` weight
            file Keras downloads for that input shape.
        file_hash: The file's hash as Keras checks it ("" = not checked).
        keep: Class names of layers whose values stay the registry model's own
            (preprocessing the registry builder sets itself).
        url: Folder the file is downloaded from.
    """

    application: str
    file_name: Callable[[tuple[int, int, int]], str]
    file_hash: str = ""
    keep: tuple[str, ...] = ()
    url: str = KERAS_APPLICATIONS_URL


@dataclass(frozen=True)
class ModelSpec:
    """How to build and train one registry model.

    Attributes:
        build: ``build(num_classes, seed) -> keras.Model``; uncompiled. A
            builder that also takes ``fastest_layout`` (see
            :func:`build_model`) may lay out its tensors for speed on the
            current backend.
        description: One line describing the model (for the README's model list).
        augment: Whether local training applies per-image random flips and shifts
            (``pollen.training.pipeline.make_dataset``).
        recipe: Local-training settings (optimizer, learning rate, batch size,
            schedule, label smoothing) the model is tuned for.
        backend: Keras backend clients prefer for this model where it is
            installed and the process has not loaded Keras yet (the fastest
            where the model is meant to run: a 2-core CPU, or a GPU for
            ``fastnet-wide``; see docs/performance.md#backend-choice). Weights
            are the same arrays whatever the backend.
        whiten: Name of the first convolution, whose kernel the client that
            provides the initial weights sets from its local images (see
            ``pollen.models.whitening.whiten_first_conv``); ``""`` = random
            initialisation only.
        freeze_whitened: Whether local training keeps the whitened first
            convolution fixed (it is then never updated; the clients skip its
            weight gradients). Applies only when the run whitened it.
        flip_tta: Whether evaluation and prediction average the class
            probabilities of each image and its mirror image
            (``pollen.training.evaluate.predict_proba``); for models trained
            with random flips, or on classes that look the same mirrored
            (see docs/performance.md#flip-tta).
        image_size: Side in pixels of the square images the model is built for when the
            data is not CIFAR-10 and ``image-size`` is ``auto`` (see
            ``pollen.config.auto_image_size``); CIFAR-10 always gets 32.
        head: Name of the classifier layer (the last one, ``num_classes``
            outputs): a pretrained file's head with another class count is
            left fresh, and ``freeze-rounds`` train only it
            (``pollen.training.finetune``). "" = no pretrained weights.
        imagenet: Where ``weights = "imagenet"`` comes from; None = the model
            has no ImageNet weights (a ``.keras``/``.h5`` file still loads).
    """

    build: Callable[..., keras.Model]
    description: str
    augment: bool = False
    recipe: Recipe = field(default_factory=Recipe)
    backend: str = "tensorflow"
    whiten: str = ""
    freeze_whitened: bool = False
    flip_tta: bool = False
    image_size: int = 32
    head: str = ""
    imagenet: ImagenetWeights | None = None


#: Every registered model by name, in registration order: the import order of the
#: architecture modules in ``pollen/models/__init__.py``.
MODELS: dict[str, ModelSpec] = {}


def register(name: str, spec: ModelSpec) -> ModelSpec:
    """Add model ``name`` to :data:`MODELS`; an architecture's module calls it at import.

    Args:
        name: Registry name (``--model`` on the command line, ``model`` in
            ``pyproject.toml``).
        spec: How to build and train it.

    Returns:
        ``spec``, unchanged.

    Raises:
        ValueError: ``name`` is already registered.
    """
    if name in MODELS:
        raise ValueError(f"a model called {name!r} is already registered")
    MODELS[name] = spec
    return spec


def build_model(
    name: str,
    num_classes: int = 10,
    seed: int = 42,
    *,
    fastest_layout: bool = False,
    image_size: tuple[int, int] = INPUT_SHAPE[:2],
) -> keras.Model:
    """Build registry model ``name`` (uncompiled).

    Args:
        name: Registry name.
        num_classes: Output classes.
        seed: Seed for the weight initialisers.
        fastest_layout: Let a builder that supports it pick the tensor layout
            fastest on the current backend (clients' local training). False
            gives a model that any backend can load from ``model.keras``.
        image_size: ``(height, width)`` of the input images (run config
            ``image-size``); a builder that takes ``input_shape`` gets
            ``(height, width, 3)``.

    Raises:
        KeyError: ``name`` is not in :data:`MODELS` (the run config validates
            names before this is reached).
        PollenError: ``image_size`` is not 32x32 and the builder takes no
            ``input_shape``.
    """
    build = MODELS[name].build
    params = inspect.signature(build).parameters
    kwargs: dict[str, object] = {}
    if fastest_layout and "fastest_layout" in params:
        kwargs["fastest_layout"] = True
    shape = (int(image_size[0]), int(image_size[1]), INPUT_SHAPE[2])
    if "input_shape" in params:
        kwargs["input_shape"] = shape
    elif shape != INPUT_SHAPE:
        raise PollenError(
            f"Model {name!r} is built for 32x32 images only, but the run asks for "
            f"{shape[0]}x{shape[1]}: use --image-size 32 or another model."
        )
    return build(num_classes, seed, **kwargs)


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


def find_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    """The layer called ``name``, in ``model`` or in a model nested in it.

    ``keras.Model.get_layer`` looks at the top level only; the reference
    model's layers sit inside ``keras.applications.MobileNetV2``.

    Raises:
        ValueError: No layer has that name.
    """
    for layer in flatten_layers(model):
        if layer.name == name:
            return layer
    raise ValueError(f"model {model.name!r} has no layer {name!r}")


def batchnorm_stat_indices(model: keras.Model) -> list[int]:
    """Positions in ``model.get_weights()`` of BatchNorm moving means/variances.

    These are the arrays that describe the data, not the function: clients
    re-estimate them for the aggregated weights (see
    ``pollen.training.evaluate.calibrate_batchnorm``).
    """
    import keras

    stat_ids = set()
    for layer in flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            stat_ids.update(id(v) for v in (layer.moving_mean, layer.moving_variance))
    return [i for i, v in enumerate(model.weights) if id(v) in stat_ids]
