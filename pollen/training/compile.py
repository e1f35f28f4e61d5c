"""A registry model ready for local training: optimizer, loss and metric from its recipe."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pollen.compat.keras import track_optimizer_variable
from pollen.models.registry import MODELS, Recipe, build_model, find_layer
from pollen.training.local import StepLearningRate

if TYPE_CHECKING:  # keras is imported where a model is compiled
    import keras


def build_client_model(
    name: str,
    num_classes: int,
    seed: int,
    *,
    whitened: bool = False,
    image_size: tuple[int, int] = (32, 32),
) -> keras.Model:
    """A client's compiled registry model: fastest layout, the recipe's optimizer and loss.

    Args:
        name: Registry name.
        num_classes: Output classes.
        seed: Seed for the weight initialisers.
        whitened: The run starts the first convolution whitened; a model with
            :attr:`ModelSpec.freeze_whitened` then trains with that layer frozen.
        image_size: ``(height, width)`` of the input images (run config ``image-size``).
    """
    spec = MODELS[name]
    model = build_model(name, num_classes, seed, fastest_layout=True, image_size=image_size)
    if whitened and spec.whiten and spec.freeze_whitened:
        find_layer(model, spec.whiten).trainable = False
    return compile_model(model, spec.recipe.learning_rate, spec.recipe)


def smoothed_sparse_crossentropy(label_smoothing: float, num_classes: int) -> Callable:
    """Sparse categorical cross-entropy with label smoothing.

    Keras's ``SparseCategoricalCrossentropy`` has no label smoothing; this
    one-hot encodes the integer labels ``(batch,)`` and applies
    ``categorical_crossentropy(..., label_smoothing=...)`` to the
    ``(batch, num_classes)`` probabilities.
    """
    import keras
    from keras import ops

    def loss(y_true, y_pred):
        onehot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), num_classes)
        return keras.losses.categorical_crossentropy(
            onehot, y_pred, label_smoothing=label_smoothing
        )

    return loss


def compile_model(
    model: keras.Model,
    learning_rate: float,
    recipe: Recipe | None = None,
    *,
    schedulable: bool = True,
) -> keras.Model:
    """Compile for local training: the recipe's optimizer and loss, accuracy metric.

    Args:
        model: Registry model.
        learning_rate: Initial learning rate (a run-wide schedule then sets it
            per step).
        recipe: Optimizer, label smoothing and weight decay; None = the
            reference recipe (Adam, plain sparse categorical cross-entropy).
        schedulable: Give the optimizer a ``pollen.training.local.StepLearningRate``
            so ``pollen.training.local.fit`` can follow a run-wide schedule. False
            keeps a plain number, for models that are only evaluated or
            saved: a ``model.keras`` then loads without Pollen installed.
    """
    import keras

    recipe = recipe or Recipe()
    weight_decay = recipe.weight_decay or None
    if schedulable:  # run-wide schedules, set per round
        learning_rate = StepLearningRate(learning_rate)
    if recipe.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(
            learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    else:
        optimizer = keras.optimizers.Adam(
            learning_rate, beta_2=recipe.beta_2, weight_decay=weight_decay
        )
    if schedulable:
        for variable in learning_rate.state:  # see StepLearningRate.state
            track_optimizer_variable(optimizer, variable)
    loss: str | Callable = "sparse_categorical_crossentropy"
    if recipe.label_smoothing > 0:
        loss = smoothed_sparse_crossentropy(recipe.label_smoothing, model.output_shape[-1])
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    return model
