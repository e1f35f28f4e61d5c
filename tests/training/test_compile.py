"""Tests for pollen.training.compile: optimizers, losses and schedules of compiled models."""

from __future__ import annotations

import keras
import numpy as np

from pollen.models.registry import MODELS, Recipe, build_model
from pollen.training.compile import compile_model
from pollen.training.local import StepLearningRate, reset_optimizer

RNG_IMAGES = np.random.default_rng(1234).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)


def test_optimizer_tracks_the_schedule_state() -> None:
    """JAX's compiled train step sees only tracked state: the schedule must be part of it."""
    model = compile_model(build_model("cnn", num_classes=2, seed=0), 1e-3)
    step_lr = model.optimizer._learning_rate
    tracked = {id(v) for v in model.optimizer.variables}
    assert step_lr.state and all(id(v) in tracked for v in step_lr.state)


def test_recipe_compiles_sgd_with_label_smoothing() -> None:
    recipe = Recipe(optimizer="sgd", learning_rate=0.1, label_smoothing=0.2, weight_decay=5e-4)
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 0.1, recipe)
    assert isinstance(model.optimizer, keras.optimizers.SGD) and model.optimizer.nesterov
    y_true = np.array([0, 2])
    y_pred = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype="float32")
    smoothed = np.array(
        [[1 - 0.2 + 0.2 / 3, 0.2 / 3, 0.2 / 3], [0.2 / 3, 0.2 / 3, 1 - 0.2 + 0.2 / 3]]
    )
    expected = -(smoothed * np.log(y_pred)).sum(axis=1)
    np.testing.assert_allclose(np.asarray(model.loss(y_true, y_pred)), expected, rtol=1e-5)
    plain = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3)
    assert isinstance(plain.optimizer, keras.optimizers.Adam)
    assert plain.loss == "sparse_categorical_crossentropy"


def test_mobilenetv2_recipe_is_adam_at_the_reference_rate_with_a_faster_second_moment() -> None:
    recipe = MODELS["mobilenetv2"].recipe
    assert (recipe.optimizer, recipe.learning_rate, recipe.batch_size) == ("adam", 1e-3, 32)
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3, recipe)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert model.optimizer.beta_2 == 0.99 and model.optimizer.beta_1 == 0.9
    model.train_on_batch(RNG_IMAGES[:8], np.arange(8) % 3)
    reset_optimizer(model, 1e-3)  # every round's fresh Adam keeps it
    assert model.optimizer.beta_2 == 0.99
    assert compile_model(build_model("cnn", 3, 0), 1e-3, Recipe()).optimizer.beta_2 == 0.999


def test_an_unschedulable_compiled_model_saves_and_loads_with_plain_keras(tmp_path) -> None:
    """The server's model.keras must load where Pollen (and its schedule class) is absent."""
    model = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3, schedulable=False)
    assert not isinstance(model.optimizer._learning_rate, StepLearningRate)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(RNG_IMAGES[:4], verbose=0),
                               model.predict(RNG_IMAGES[:4], verbose=0), atol=1e-6)  # fmt: skip
    trained = compile_model(build_model("cnn", num_classes=3, seed=0), 1e-3)
    assert isinstance(trained.optimizer._learning_rate, StepLearningRate)
